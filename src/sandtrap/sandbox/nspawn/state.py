"""One box's state directory: what a restarted honeypot needs to find it again.

``<root>/boxes/<id>/`` holds ``box.json`` (name, the pids of systemd-nspawn and of the box's PID 1 with their
start times, the parent cgroup, the tree it sits on, session), ``seed/`` (the per-box lower layer: hostname,
hosts, the sensor's planted files), ``disk/`` (a size-limited tmpfs holding the overlay's ``upper`` and ``work``:
what the box wrote, kept after the stop for forensics), ``root/`` (the overlay the box runs in, mounted until
the box is removed) and ``nspawn.log``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sandtrap.sandbox.host import records

RECORD = "box.json"


@dataclass
class BoxRecord:
    id: str
    name: str
    created: str  # ISO 8601, UTC
    tree: str  # the image's tree: the overlay's lowest layer
    nspawn_pid: int = 0
    nspawn_start: int = 0  # /proc/<pid>/stat field 22: tells a reused pid apart
    init_pid: int = 0  # the box's PID 1 as this host sees it
    init_start: int = 0
    cgroup: str = ""  # the per-box parent cgroup's name (host/cgroups.py), '' without one
    cgroup_prefix: str = ""  # the directory of the sensor's parents in each hierarchy
    address: str = ""  # its eth0's address on the capture gateway (network.mode capture), '' = lo only
    state: str = "warm"  # warm, active, preserved
    session: str = ""
    src_ip: str = ""
    acquired: str = ""
    released: str = ""

    @staticmethod
    def now() -> str:
        return datetime.now(UTC).isoformat()


def save(directory: Path, record: BoxRecord) -> None:
    records.save(directory / RECORD, record)


def load(directory: Path) -> BoxRecord | None:
    return records.load(directory / RECORD, BoxRecord)


when = records.when


def start_time(pid: int) -> int:
    """A process's start time (clock ticks after boot), 0 when it is gone: a pid and this name one process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return 0
    try:
        return int(raw[raw.rindex(b")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return 0


def is_alive(pid: int, started: int) -> bool:
    """Is ``pid`` still the process that started at ``started`` (and not a zombie)?"""
    if pid <= 0 or started <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
        rest = raw[raw.rindex(b")") + 2 :].split()
    except (OSError, ValueError):
        return False
    return rest[0] != b"Z" and int(rest[19]) == started
