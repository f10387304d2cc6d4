"""Test doubles for pure-logic tests: an in-memory sandbox backend (no engine, no processes)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from datetime import UTC, datetime

from sandtrap.errors import SandboxError
from sandtrap.sandbox.base import ChangedFile, ExitStatus, Features, FileData, SandboxInfo, TermSize

_ids = itertools.count(1)


class FakeProcess:
    def __init__(self, output: bytes) -> None:
        self._output = output
        self.written = bytearray()
        self.size: TermSize | None = None

    async def read(self) -> None:
        return None

    async def write(self, data: bytes) -> None:
        self.written += data

    async def close_stdin(self) -> None:
        pass

    async def resize(self, size: TermSize) -> None:
        self.size = size

    async def wait(self) -> ExitStatus:
        return ExitStatus(0)

    async def kill(self) -> None:
        pass


class FakeSandbox:
    def __init__(self, backend: FakeBackend, name: str, labels: Mapping[str, str]) -> None:
        self.id = f"fake{next(_ids):08d}"
        self.name = name
        self.labels = dict(labels)
        self.running = True
        self.removed = False
        self.files: dict[str, bytes] = {}
        self.created_at = datetime.now(UTC)
        self.fail_stops = 0  # the next stops that fail (an overloaded engine)
        self.scopes: list[str] = []  # the cgroup units sessions were put into
        self._backend = backend

    async def exec(self, argv: list[str], **_: object) -> FakeProcess:
        if not self.running:
            raise SandboxError("not running")
        return FakeProcess(b"")

    features = Features()

    async def claim(self, session: str, src_ip: str) -> None:
        self.name = f"fake-s-{session}"

    address = ""  # the box's eth0 address ('' = none, as with sandbox.network: none)

    async def network_address(self) -> str:
        return self.address

    async def put_file(self, path: str, data: bytes, mode: int = 0o644, mtime: float | None = None) -> None:
        self.files[path] = data

    async def watch_reads(self, paths: object, report: object) -> None:
        return None

    async def get_file(self, path: str, max_bytes: int) -> FileData | None:
        data = self.files.get(path)
        if data is None:
            return None
        return FileData(path, len(data), 0o644, True, data if len(data) <= max_bytes else None)

    async def changed_files(self) -> list[ChangedFile]:
        return [ChangedFile(p, "A") for p in self.files]

    async def is_running(self) -> bool:
        return self.running

    async def stop(self) -> None:
        if self.fail_stops:
            self.fail_stops -= 1
            raise SandboxError("stop: engine did not answer within 30s")
        self.running = False

    async def remove(self) -> None:
        self.running = False
        self.removed = True
        self._backend.boxes.pop(self.id, None)


class FakeBackend:
    def __init__(self, fail_creates: int = 0) -> None:
        self.boxes: dict[str, FakeSandbox] = {}
        self.fail_creates = fail_creates
        self.created = 0

    async def create(self, session: str = "", src_ip: str = "") -> FakeSandbox:
        if self.fail_creates:
            self.fail_creates -= 1
            raise SandboxError("engine said no")
        self.created += 1
        name = f"fake-s-{session}" if session else f"fake-w-{next(_ids)}"
        box = FakeSandbox(self, name, {"sandtrap.session": session, "sandtrap.src_ip": src_ip})
        self.boxes[box.id] = box
        return box

    def sandbox(self, sandbox_id: str, name: str) -> FakeSandbox:
        return self.boxes[sandbox_id]

    async def list_managed(self) -> list[SandboxInfo]:
        out = []
        for b in self.boxes.values():
            is_session = "-s-" in b.name
            state = ("active" if is_session else "warm") if b.running else "preserved"
            out.append(SandboxInfo(b.id, b.name, state, b.created_at))  # type: ignore[arg-type]
        return out

    async def ping(self) -> None:
        pass

    async def close(self) -> None:
        pass
