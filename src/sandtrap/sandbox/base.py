"""The seam between the SSH side and any sandbox technology.

The pool, the bridge and the tests depend only on these protocols. No engine type (aiodocker,
nspawn, a VM monitor) crosses this seam: backends translate their errors into
:class:`~sandtrap.errors.SandboxError` where they enter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

STDOUT = 1
STDERR = 2

SandboxState = Literal["warm", "active", "preserved", "gone"]


@dataclass(frozen=True, slots=True)
class TermSize:
    cols: int
    rows: int


@dataclass(frozen=True, slots=True)
class ClientAddress:
    """The client's end of an SSH connection and the server address it reached (what SSH_CONNECTION says)."""

    ip: str
    port: int
    server_ip: str


@dataclass(frozen=True, slots=True)
class Chunk:
    """Bytes a process wrote: ``stream`` is :data:`STDOUT` or :data:`STDERR` (a TTY merges both)."""

    stream: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """How a process ended: an exit code, or a signal name as SSH's ``exit-signal`` names it."""

    code: int
    signal: str | None = None


@dataclass(frozen=True, slots=True)
class ChangedFile:
    """A path the session added (``A``), changed (``C``) or deleted (``D``) in the sandbox."""

    path: str
    kind: Literal["A", "C", "D"]


@dataclass(frozen=True, slots=True)
class FileData:
    """A file read from a sandbox: its size and mode always, its bytes only if under the cap."""

    path: str
    size: int
    mode: int
    is_regular: bool
    data: bytes | None


@dataclass(slots=True)
class SandboxInfo:
    """What the pool knows about a sandbox; persisted so a restart can reconcile."""

    id: str
    name: str
    state: SandboxState
    created: datetime
    session: str = ""
    src_ip: str = ""
    acquired: datetime | None = None
    released: datetime | None = None
    labels: dict[str, str] = field(default_factory=dict)


class Process(Protocol):
    """A process running in a sandbox, with or without a TTY."""

    async def read(self) -> Chunk | None:
        """The next chunk of output, or ``None`` at end of output. Bounded by the backend's buffer."""

    async def write(self, data: bytes) -> None:
        """Write to stdin; waits while the process does not read (back-pressure)."""

    async def close_stdin(self) -> None:
        """Send end-of-file on stdin; output keeps flowing."""

    async def resize(self, size: TermSize) -> None:
        """Change the TTY's window size (no-op without a TTY)."""

    async def wait(self) -> ExitStatus:
        """Wait for the process to end and return how it ended."""

    async def kill(self) -> None:
        """End the process and its I/O; harmless if it has ended."""


@runtime_checkable
class Sandbox(Protocol):
    """One isolated machine-like environment that one attacker (or one source IP) gets."""

    id: str
    name: str

    @property
    def session_scopes(self) -> bool:
        """Whether :meth:`enter_scope` moves processes (else it does nothing)."""

    async def exec(
        self,
        argv: list[str],
        *,
        tty: TermSize | None = None,
        env: Mapping[str, str] | None = None,
        user: str = "root",
        workdir: str | None = None,
        login: bool = False,
        client: ClientAddress | None = None,
    ) -> Process:
        """Start ``argv`` in the sandbox. ``login``: a login's own process (what sshd would start); a backend may
        start it another way (the box's init, ``sandbox.session_transport``), with the same result. ``client``
        (with ``login``, the connection's first login): where the backend can, the box also shows that client's
        TCP connection to its :22 while the process lives (``sandbox.connection_in_box``)."""

    async def enter_scope(self, session_id: int, unit: str) -> None:
        """Put the processes of login ``session_id`` (their ``XDG_SESSION_ID``) where the box's init system
        would (a cgroup ``unit`` such as ``user.slice/user-0.slice/session-3.scope``); a no-op where the
        backend cannot."""

    async def network_address(self) -> str:
        """The box's own address on its network interface (eth0), '' when it has none or it is unknown."""

    async def put_file(self, path: str, data: bytes, mode: int = 0o644, mtime: float | None = None) -> None:
        """Write a file (its directory must exist), owned by root, dated ``mtime`` (default now)."""

    async def host_root(self) -> Path | None:
        """The box's root file system as a directory on this host, if the backend has one here."""

    async def get_file(self, path: str, max_bytes: int) -> FileData | None:
        """A file's metadata (``None`` if missing) and, for a regular file up to ``max_bytes``, its bytes.

        Never reads more than ``max_bytes`` of content into memory.
        """

    async def changed_files(self) -> list[ChangedFile]: ...

    async def is_running(self) -> bool: ...

    async def stop(self) -> None:
        """Stop, keeping the file system for forensics; stopping twice is harmless."""

    async def remove(self) -> None:
        """Delete for good; harmless if already gone."""


class SandboxBackend(Protocol):
    """Creates sandboxes and finds the ones a previous run left behind."""

    async def create(self, labels: Mapping[str, str], name: str) -> Sandbox:
        """Create and start a sandbox, ready for :meth:`Sandbox.exec`."""

    def labels(self, session: str = "", src_ip: str = "") -> dict[str, str]:
        """The labels a new sandbox carries (sensor, created time, session and source if known)."""

    def new_name(self, session: str = "") -> str: ...

    def sandbox(self, sandbox_id: str, name: str) -> Sandbox:
        """A handle on an existing sandbox (found by :meth:`list_managed`)."""

    async def list_managed(self) -> list[SandboxInfo]:
        """Every sandbox of this sensor, with its state now (warm, active, preserved)."""

    async def assign(self, sandbox: Sandbox, session: str, src_ip: str) -> None:
        """Mark a warm sandbox as a session's (name, records); visible to reconciliation."""

    async def ping(self) -> None:
        """Raise :class:`~sandtrap.errors.SandboxUnavailable` if the engine does not answer."""

    async def close(self) -> None: ...
