"""The seam's streaming exec in a guest (a pty, stdin while it runs): an SSH connection, as root with the sensor's
access key, to the guest's sshd, made from inside the VM's network namespace (nothing routes there from the host)
and only when such an exec is asked for. The honeypot's own commands go by the guest agent (agent.py)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import asyncssh

from sandtrap.errors import SandboxError
from sandtrap.sandbox.base import STDERR, STDOUT, Argv, Chunk, ExitStatus, TermSize
from sandtrap.sandbox.host import netns

SSH_PORT = 22
CONNECT_TIMEOUT_S = 5.0
READ_SIZE = 64 * 1024
WINDOW = 1 << 20  # per channel: what a reader that does not read leaves buffered here (asyncssh's default 2 MiB)
QUEUE_CHUNKS = 8  # per process: a reader that does not read stops the channel's window (back-pressure)
KILL_TIMEOUT_S = 10.0
# Before a command without a pty: its pid (the session's, as sshd setsid()s it) on stderr, read back by GuestProcess.
PID_FIRST = b"printf '%d\\n' $$ >&2; "
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_USER_NAME = re.compile(r"[a-z_][a-z0-9_.-]*\$?")


def _tcp(address: str) -> Callable[[], socket.socket]:
    def work() -> socket.socket:
        sock = socket.create_connection((address, SSH_PORT), timeout=CONNECT_TIMEOUT_S)
        sock.setblocking(False)
        return sock

    return work


async def connect(
    pid: int, is_same_vm: Callable[[], bool], address: str, key: asyncssh.SSHKey, name: str
) -> asyncssh.SSHClientConnection:
    """An SSH connection to the guest's sshd at ``address``:22 inside the namespace of QEMU ``pid``."""
    try:
        sock = await netns.in_box_netns(pid, is_same_vm, _tcp(address), f"{name}'s sshd", CONNECT_TIMEOUT_S + 2)
    except (SandboxError, TimeoutError) as exc:
        raise SandboxError(f"cannot reach {name}'s sshd: {exc}") from exc
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S * 4):
            return await asyncssh.connect(
                sock=sock,
                username="root",
                client_keys=[key],
                known_hosts=None,  # the namespace holds only this VM: nothing else can answer there
                agent_path=None,
                config=None,
                preferred_auth="publickey",
                keepalive_interval=30,
            )
    except (OSError, asyncssh.Error, TimeoutError) as exc:
        sock.close()
        raise SandboxError(f"SSH to {name}'s sshd failed: {exc!r}") from exc


def _quote(word: str | bytes) -> bytes:
    data = word.encode() if isinstance(word, str) else word
    return b"'" + data.replace(b"'", b"'\\''") + b"'"


def command_line(argv: Argv, env: Mapping[str, str] | None, user: str, workdir: str | None) -> bytes:
    """The exec request's command for root's shell: ``cd``, ``env``, ``runuser`` around ``argv``, as bytes
    (an attacker's command that is not UTF-8 reaches the guest as its exact bytes)."""
    if not argv:
        raise SandboxError("exec: empty argv")
    words: list[bytes] = []
    if env:
        for name in env:
            if not _ENV_NAME.fullmatch(name):
                raise SandboxError(f"exec: {name!r} is not an environment variable name")
        words += [b"env", *(_quote(f"{k}={v}") for k, v in env.items())]
    if user != "root":
        if not _USER_NAME.fullmatch(user):
            raise SandboxError(f"exec: {user!r} is not a user name")
        words += [b"runuser", b"-u", user.encode(), b"--"]
    words += [_quote(a) for a in argv]
    line = b"exec " + b" ".join(words)
    if workdir:
        line = b"cd " + _quote(workdir) + b" && " + line
    return line


def exit_status_of(proc: asyncssh.SSHClientProcess[bytes]) -> ExitStatus:
    sig = proc.exit_signal
    if sig is not None:
        name = sig[0]
        try:
            number = signal.Signals[f"SIG{name}"].value
        except KeyError:
            number = 0
        return ExitStatus(128 + number, name)
    code = proc.exit_status
    return ExitStatus(255 if code is None or code < 0 else code)


class GuestProcess:
    """A process in the guest on its own SSH channel: :class:`~sandtrap.sandbox.base.Process`."""

    def __init__(
        self, proc: asyncssh.SSHClientProcess[bytes], conn: asyncssh.SSHClientConnection | None = None
    ) -> None:
        """``conn``: the process was started with :data:`PID_FIRST` (no pty): it prints its pid first on stderr,
        and :meth:`kill` kills its process group over ``conn`` (the guest's sshd refuses ``signal`` for root, and
        a closed channel without a pty leaves its process running)."""
        self._proc = proc
        self._conn = conn
        self._pid: int | None = None
        self._queue: asyncio.Queue[Chunk | None] = asyncio.Queue(QUEUE_CHUNKS)
        self._open_streams = 2
        self._pumps = [
            asyncio.create_task(self._pump(proc.stdout, STDOUT)),
            asyncio.create_task(self._pump(proc.stderr, STDERR, pid_first=conn is not None)),
        ]

    async def _pump(self, reader: asyncssh.SSHReader[bytes], stream: int, pid_first: bool = False) -> None:
        try:
            if pid_first:
                with contextlib.suppress(
                    asyncssh.Error, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError
                ):
                    line = await reader.readuntil(b"\n")
                    if line[:-1].isdigit() and len(line) <= 12:
                        self._pid = int(line[:-1])
            while data := await reader.read(READ_SIZE):
                await self._queue.put(Chunk(stream, data))
        except (asyncssh.Error, OSError):
            pass
        finally:
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(None)

    async def read(self) -> Chunk | None:
        while self._open_streams:
            item = await self._queue.get()
            if item is not None:
                return item
            self._open_streams -= 1
        return None

    async def write(self, data: bytes) -> None:
        try:
            self._proc.stdin.write(data)
            await self._proc.stdin.drain()
        except (asyncssh.Error, OSError, BrokenPipeError) as exc:
            raise SandboxError(f"write to the guest's process: {exc!r}") from exc

    async def close_stdin(self) -> None:
        with contextlib.suppress(asyncssh.Error, OSError):
            self._proc.stdin.write_eof()

    async def resize(self, size: TermSize) -> None:
        with contextlib.suppress(asyncssh.Error, OSError):
            self._proc.change_terminal_size(size.cols, size.rows)

    async def wait(self) -> ExitStatus:
        await self._proc.wait_closed()
        return exit_status_of(self._proc)

    async def signal(self, name: str) -> None:
        with contextlib.suppress(asyncssh.Error, OSError):
            self._proc.send_signal(name)

    async def kill(self) -> None:
        await self.signal("KILL")
        if self._conn is not None and self._pid is not None and self._proc.exit_status is None:
            with contextlib.suppress(asyncssh.Error, OSError, TimeoutError):
                async with asyncio.timeout(KILL_TIMEOUT_S):  # its session's group: sshd made it a session leader
                    await self._conn.run(f"kill -KILL -- -{self._pid} 2>/dev/null", check=False)
        self._proc.close()
        for task in self._pumps:
            task.cancel()
        with contextlib.suppress(asyncssh.Error, OSError, asyncio.CancelledError):
            await asyncio.gather(*self._pumps, return_exceptions=True)


async def start(
    conn: asyncssh.SSHClientConnection,
    argv: Argv,
    *,
    tty: TermSize | None,
    env: Mapping[str, str] | None,
    user: str,
    workdir: str | None,
) -> GuestProcess:
    command = command_line(argv, env, user, workdir)
    if tty is None:
        command = PID_FIRST + command
    options: dict[str, Any] = {"encoding": None, "window": WINDOW}
    if tty is not None:
        options.update(term_type="xterm", term_size=(tty.cols, tty.rows))
    try:
        # asyncssh sends a bytes command as it is (its String() takes bytes); its type says str.
        proc = await conn.create_process(cast(str, command), **options)
    except (asyncssh.Error, OSError) as exc:
        raise SandboxError(f"exec in the guest: {exc!r}") from exc
    return GuestProcess(cast("asyncssh.SSHClientProcess[bytes]", proc), conn if tty is None else None)


def load_access_key(path: Path) -> asyncssh.SSHKey:
    """The sensor's key for the guests' root (generated once, mode 0600)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = asyncssh.generate_private_key("ssh-ed25519", comment="ops@ws-ops-114")
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(key.export_private_key("openssh"))
        tmp.chmod(0o600)
        tmp.replace(path)
    return asyncssh.read_private_key(str(path))
