"""The seam between the SSH side and any sandbox technology.

The pool, the bridge and the tests depend only on these protocols. No engine type (aiodocker,
nspawn, a VM monitor) crosses this seam: backends translate their errors into
:class:`~sandtrap.errors.SandboxError` where they enter.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol, runtime_checkable

from sandtrap.sandbox.personas import Persona

STDOUT = 1
STDERR = 2

# A command line: text, or bytes where an attacker's command is not UTF-8. A backend that can carry bytes
# (the box's listener) passes them exactly; one that carries text only (the engine's API) decodes them with
# U+FFFD for the bytes that are not UTF-8.
Argv = Sequence[str | bytes]

SandboxState = Literal["warm", "active", "preserved", "gone"]
# What a login channel asked sshd for ("": not a login's, or a terminal login that is not SSH's).
LoginKind = Literal["", "shell", "exec", "subsystem"]


@dataclass(frozen=True, slots=True)
class TermSize:
    cols: int
    rows: int


SSH_PORT = 22
TELNET_PORT = 23


@dataclass(frozen=True, slots=True)
class ClientAddress:
    """The client's end of a connection and the server address it reached (what SSH_CONNECTION says);
    ``server_port``: the box's port a login's connection shows on (22 for SSH, 23 for telnet)."""

    ip: str
    port: int
    server_ip: str
    server_port: int = SSH_PORT


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
class Snapshot:
    """A box's files at one moment, what :meth:`Sandbox.changed_files` compares against (``since``).

    ``files``: path -> its state. A backend lists what it needs to tell a later change: every path (a
    listing), or only the paths that differ from its image (the engine's diff). A state is :data:`GONE` for a
    path deleted from the image, else ``"<A|C> <type size mode mtime ctime>"``: added to or changed from the
    image (a full listing says ``A`` for all). The metadata are compared as opaque strings (a ctime cannot be
    set back)."""

    files: Mapping[str, str]


GONE = "D"


def state_of(kind: str, meta: str) -> str:
    return f"{kind} {meta}"


def diff_snapshots(before: Snapshot, after: Snapshot) -> list[ChangedFile]:
    """What changed from ``before`` to ``after``; a path missing from a snapshot is as the image has it."""
    out: list[ChangedFile] = []
    for path, now in after.files.items():
        was = before.files.get(path)
        if was == now or (was is not None and GONE not in (was, now) and was[2:] == now[2:]):
            continue  # the same file (the kind is a hint, for a path missing from the other snapshot)
        if now == GONE:
            out.append(ChangedFile(path, "D"))
        elif was is None:
            out.append(ChangedFile(path, "A" if now.startswith("A") else "C"))
        else:
            out.append(ChangedFile(path, "A" if was == GONE else "C"))
    for path, was in before.files.items():
        if path not in after.files:  # as the image has it again
            out.append(ChangedFile(path, "D" if was.startswith("A") else "A" if was == GONE else "C"))
    return sorted(out, key=lambda c: c.path)


@dataclass(frozen=True, slots=True)
class FileData:
    """A file read from a sandbox: its size and mode always, its bytes only if under the cap."""

    path: str
    size: int
    mode: int
    is_regular: bool
    data: bytes | None


@dataclass(frozen=True, slots=True)
class Login:
    """What makes a process a login's own (what sshd starts for a session channel).

    ``session_id``: the login's ``XDG_SESSION_ID``; a backend with :attr:`Features.login_scopes` places the
    login's processes where the box's init system would (``user.slice/user-<uid>.slice/session-<n>.scope``).
    ``client``: set for a connection's first login; a backend with :attr:`Features.connection_in_box` shows
    that client's TCP connection to the box's :22 while the process lives (a telnet login's: :23, held by
    ``telnetd`` under ``inetd``)."""

    uid: int = 0
    session_id: int | None = None
    client: ClientAddress | None = None
    # What sshd was asked, for a backend with :attr:`Features.own_sshd` (the box's own sshd serves the login:
    # ``argv`` is then only what sandtrap would run itself). The bridge fills these in for every login channel.
    session: str = ""  # the attacker's connection: its channels share one connection to the box's sshd
    peer: ClientAddress | None = None  # the attacker's address, on every channel (``client`` is the first's)
    username: str = ""
    password: str | None = None  # what the attacker logged in with (None: a publickey login)
    auth_method: str = ""  # as sshd names it: "password", "keyboard-interactive/pam", "publickey"
    kind: LoginKind = ""
    command: bytes | None = None  # exec: the client's command as it sent it; subsystem: the subsystem's name
    term: str | None = None  # the pty's TERM (None: no pty); its size is exec's ``tty``
    env: tuple[tuple[str, str], ...] = ()  # the client's variables sshd accepts (AcceptEnv LANG LC_*)
    # The connection's refused attempts before it got in, in order: (user name, method as sshd names it). The box's
    # sshd is asked the same (with wrong passwords), so it logs each "Failed password" as it would have.
    failed: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Features:
    """What a sandbox can do beyond the Protocol's minimum; the bridge asks, never checks a backend's type."""

    login_scopes: bool = False  # exec(login=Login(session_id=n)) puts the login in its own cgroup scope
    connection_in_box: bool = False  # exec(login=Login(client=...)) shows the login's TCP connection in the box
    box_ports: bool = False  # a BoxPorts sandbox: open_port() reaches a port on the box's own loopback
    # An OwnSshd sandbox: exec(login=Login(kind=...)) is served by the box's own sshd (argv unused), and its
    # processes take signals; the connection's end is end_login(session), not sandtrap's helper.
    own_sshd: bool = False
    # A RunsAside sandbox: run() goes by its own management channel (a VM's guest agent), not exec: none of the
    # honeypot's own commands shows in the box as a login (sshd, PAM, utmp, auth.log, a TCP connection).
    runs_aside: bool = False


class ReadWatch(Protocol):
    """A watch on reads of some files in a box (see :meth:`Sandbox.watch_reads`)."""

    def close(self) -> None:
        """Stop watching; harmless twice."""


# report(path in the box that a process of the box opened); a backend that sees more of the access may add
# keywords (the micro-VM's lure file system: op="open"|"opendir"|"read"|"suppressed", bytes=, offset=).
ReadReport = Callable[..., object]


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


# The signals SSH's exit-signal names (RFC 4254 6.10); any other signal is reported as an exit code.
_SSH_SIGNALS = {"KILL", "TERM", "HUP", "INT", "QUIT", "SEGV", "ABRT", "PIPE", "ALRM", "USR1", "USR2", "ILL", "FPE"}


def exit_status(code: int) -> ExitStatus:
    """An exit code as a shell reports it (a process killed by signal N: 128+N) as SSH wants it: the signal's name."""
    if 128 < code < 128 + 32:
        try:
            name = signal.Signals(code - 128).name.removeprefix("SIG")
        except ValueError:
            return ExitStatus(code)
        if name in _SSH_SIGNALS:
            return ExitStatus(code, name)
    return ExitStatus(code)


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
    def features(self) -> Features:
        """What this sandbox can do beyond the minimum (login scopes, the login's connection in the box)."""

    async def exec(
        self,
        argv: Argv,
        *,
        tty: TermSize | None = None,
        env: Mapping[str, str] | None = None,
        user: str = "root",
        workdir: str | None = None,
        login: Login | None = None,
    ) -> Process:
        """Start ``argv`` in the sandbox. ``login``: a login's own process (what sshd would start); a backend may
        start it another way (the box's init, its own sshd), with the same result."""

    async def network_address(self) -> str:
        """The box's own address on its network interface (eth0), '' when it has none or it is unknown."""

    async def put_file(self, path: str, data: bytes, mode: int = 0o644, mtime: float | None = None) -> None:
        """Write a file (its directory must exist), owned by root, dated ``mtime`` (default now)."""

    async def get_file(self, path: str, max_bytes: int) -> FileData | None:
        """A file's metadata (``None`` if missing) and, for a regular file up to ``max_bytes``, its bytes.

        Never reads more than ``max_bytes`` of content into memory.
        """

    async def snapshot(self) -> Snapshot:
        """The box's files now, for a later ``changed_files(since=...)``: taken when a session begins (after the
        honeypot's own setup and planting, before the attacker), so only what happened since is the session's."""

    async def changed_files(self, since: Snapshot | None = None) -> list[ChangedFile]:
        """What changed since ``since`` (a :meth:`snapshot`), else since the box was made (its warm state or
        its image, as the backend knows it)."""

    async def watch_reads(self, paths: Sequence[str], report: ReadReport) -> ReadWatch | None:
        """Report each open of one of ``paths`` by a process of the box, seen from outside it (nothing in the box
        can see or stop the watch); None where this backend cannot see them."""

    async def claim(self, session: str, src_ip: str) -> None:
        """A warm sandbox becomes a session's: recorded where reconciliation after a crash finds it."""

    async def is_running(self) -> bool: ...

    async def stop(self) -> None:
        """Stop, keeping the file system for forensics; stopping twice is harmless."""

    async def remove(self) -> None:
        """Delete for good; harmless if already gone."""


@runtime_checkable
class Signals(Protocol):
    """A :class:`Process` that takes SSH's ``signal`` requests (a backend with :attr:`Features.own_sshd`)."""

    async def signal(self, name: str) -> None:
        """Deliver the signal SSH names ``name`` (``INT``, ``TERM``...); harmless once it has ended."""


@runtime_checkable
class OwnSshd(Protocol):
    """A sandbox whose own sshd serves logins: asked through :attr:`Features.own_sshd`."""

    async def end_login(self, session: str) -> None:
        """The attacker's connection ``session`` is over: close its connection to the box's sshd (sshd logs the
        disconnect and the session's close itself); harmless when there is none."""


@runtime_checkable
class RunsAside(Protocol):
    """A sandbox that runs a command to its end by a channel of its own: asked through
    :attr:`Features.runs_aside`; :func:`run` uses it."""

    async def run_aside(
        self, argv: Argv, stdin: bytes, *, user: str, max_output: int, timeout_s: float | None
    ) -> RunResult:
        """As :func:`run`."""


Transport = Literal["tcp", "udp"]


@runtime_checkable
class BoxPorts(Protocol):
    """A sandbox whose own ports the honeypot can reach (raw TCP/UDP services), though the box has no network:
    asked through :attr:`Features.box_ports`."""

    async def open_port(
        self, port: int, transport: Transport = "tcp", client: ClientAddress | None = None
    ) -> socket.socket:
        """A non-blocking socket connected to ``port`` on the box's 127.0.0.1, made from inside the box's network
        namespace. ``client``: the attacker's address; a client on loopback is bound as the socket's source (the
        service in the box sees it), any other shows as 127.0.0.1. Raises SandboxError (nothing listening too)."""


class SandboxBackend(Protocol):
    """Creates sandboxes and finds the ones a previous run left behind. Names and labels are its business."""

    async def create(self, session: str = "", src_ip: str = "", persona: Persona | None = None) -> Sandbox:
        """Create and start a sandbox, ready for :meth:`Sandbox.exec`: a warm one without a session. ``persona``:
        what it is made as (hostname, image; None = the backend's own box)."""

    def sandbox(self, sandbox_id: str, name: str) -> Sandbox:
        """A handle on an existing sandbox (found by :meth:`list_managed`)."""

    async def list_managed(self) -> list[SandboxInfo]:
        """Every sandbox of this sensor, with its state now (warm, active, preserved)."""

    async def ping(self) -> None:
        """Raise :class:`~sandtrap.errors.SandboxUnavailable` if the backend cannot make sandboxes now."""

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class RunResult:
    """How a command run to its end went: its status and its output (each stream capped)."""

    status: ExitStatus
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.status.code == 0 and self.status.signal is None


async def run(
    sandbox: Sandbox,
    argv: Argv,
    stdin: bytes = b"",
    *,
    user: str = "root",
    max_output: int = 4 * 1024 * 1024,
    timeout_s: float | None = None,
    login: Login | None = None,
) -> RunResult:
    """Run ``argv`` to its end: write ``stdin``, close it, drain the output (each stream kept up to
    ``max_output`` bytes, the rest read and dropped so the process never blocks), return its status.
    With ``timeout_s`` the process is killed and :class:`TimeoutError` raised when it takes longer.
    ``login``: started as a login's processes are (``exec(login=)``: on Docker by the box's listener, about 2 ms
    where ``docker exec`` takes about 50, and under it, not with parent 0); a RunsAside sandbox ignores it."""
    if sandbox.features.runs_aside and isinstance(sandbox, RunsAside):
        return await sandbox.run_aside(argv, stdin, user=user, max_output=max_output, timeout_s=timeout_s)
    proc = await sandbox.exec(argv, user=user, login=login)
    try:
        async with asyncio.timeout(timeout_s):
            if stdin:
                await proc.write(stdin)
            await proc.close_stdin()
            out = {STDOUT: bytearray(), STDERR: bytearray()}
            while (chunk := await proc.read()) is not None:
                buf = out.get(chunk.stream, out[STDOUT])
                if len(buf) < max_output:
                    buf += chunk.data[: max_output - len(buf)]
            status = await proc.wait()
    except BaseException:
        await asyncio.shield(proc.kill())  # the process's I/O goes back even when this is cancelled
        raise
    return RunResult(status, bytes(out[STDOUT]), bytes(out[STDERR]))


# Each path given (never below it, never through a symlink): type, size, mode, mtime, ctime (as hostfs.meta).
_STAT_PATHS = r'exec find -P "$@" -maxdepth 0 -printf "%p\0%y %s %m %T@ %C@\0" 2>/dev/null'


async def stat_in_box(sandbox: Sandbox, paths: Sequence[str]) -> dict[str, str]:
    """Each path's metadata for a :class:`Snapshot`, listed by the box's own ``xargs`` and ``find`` (paths on
    stdin: no argv limit). They are the attacker's by a session's end: bounded in time and output; a path they do
    not answer for is missing (it then differs from any baseline: no change is lost)."""
    stdin = b"".join(p.encode("utf-8", "surrogateescape") + b"\0" for p in paths)
    try:
        result = await run(
            sandbox, ["xargs", "-0", "-r", "sh", "-c", _STAT_PATHS, "sh"], stdin, max_output=16 << 20, timeout_s=60
        )
    except TimeoutError:
        return {}
    parts = result.stdout.split(b"\0")
    return {
        parts[i].decode(errors="surrogateescape"): parts[i + 1].decode(errors="replace")
        for i in range(0, len(parts) - 1, 2)
    }
