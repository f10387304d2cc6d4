"""One VM's state directory: what a restarted honeypot needs to find it again.

``<root>/<id>/`` holds ``vm.json`` (name, QEMU's pid, MAC, machine uuid, the image it runs, session), the
VM's qcow2 overlay ``disk.qcow2`` (kept after stop for forensics, deleted by remove), the QMP and serial
sockets, ``console.log`` (bounded), ``qemu.log`` and ``baseline`` (the file listing taken when it was warmed).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

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
    tmp = directory / (RECORD + ".tmp")
    tmp.write_text(json.dumps(asdict(record), indent=1) + "\n")
    os.replace(tmp, directory / RECORD)


def load(directory: Path) -> VMRecord | None:
    try:
        raw = json.loads((directory / RECORD).read_text())
    except (OSError, ValueError):
        return None
    known = {f.name for f in fields(VMRecord)}
    try:
        return VMRecord(**{k: v for k, v in raw.items() if k in known})
    except TypeError:
        return None


def when(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text) if text else None
    except ValueError:
        return None


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
