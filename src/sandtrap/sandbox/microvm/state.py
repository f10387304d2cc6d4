"""One VM's state directory: what a restarted honeypot needs to find it again.

``<root>/<id>/`` holds ``vm.json`` (name, QEMU's pid, MAC, machine uuid, the image it runs, session), the
VM's qcow2 overlay ``disk.qcow2`` (kept after stop for forensics, deleted by remove), the QMP and serial
sockets, ``console.log`` (bounded), ``qemu.log`` and ``baseline`` (the file listing taken when it was warmed).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sandtrap.sandbox.host import records

RECORD = "vm.json"


@dataclass
class VMRecord:
    id: str
    name: str
    created: str  # ISO 8601, UTC
    image: str  # the image directory the overlay sits on
    mac: str
    machine_uuid: str
    pid: int = 0
    state: str = "warm"  # warm, active, preserved
    session: str = ""
    src_ip: str = ""
    acquired: str = ""
    released: str = ""

    @staticmethod
    def now() -> str:
        return datetime.now(UTC).isoformat()


def save(directory: Path, record: VMRecord) -> None:
    records.save(directory / RECORD, record)


def load(directory: Path) -> VMRecord | None:
    return records.load(directory / RECORD, VMRecord)


when = records.when


def panic_line(path: Path) -> str:
    """The console's "Kernel panic" line (a panic before the pvpanic driver loads leaves the VM running, hung)."""
    try:
        with open(path, "rb") as f:
            for line in f:
                if b"Kernel panic - not syncing" in line:
                    return line.decode(errors="replace").strip()[:300]
    except OSError:
        pass
    return ""


def tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_bytes()[-limit:].decode(errors="replace").strip() or "(no output)"
    except OSError:
        return "(no qemu.log)"
