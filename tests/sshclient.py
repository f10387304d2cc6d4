"""SSH clients against a honeypot on 127.0.0.1: the real OpenSSH client (ssh, scp, sftp) and tmux, driven as
subprocesses, and the asyncssh connection options and context manager the Python-side tests share.

Passwords go in through ``sshpass -p``. ``sftp -b`` would imply BatchMode (no passwords), so sftp
reads its commands on stdin instead. Every wait is bounded; every process started is ended in ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import shlex
import socket
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

HOST = "127.0.0.1"
USER = "root"
PASSWORD = "hunter2"
EXIT_MARK = "sshclient-exit-status="


def client_options(log_level: str = "ERROR") -> list[str]:
    """Options shared by ssh, scp and sftp: no user config, no host key checks, no keys, only errors logged.

    (OpenSSH keeps the first value it is given for an option, so these cannot be overridden later.)
    """
    return [
        "-F",
        "/dev/null",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        f"LogLevel={log_level}",
        "-o",
        "PubkeyAuthentication=no",
        "-o",
        "NumberOfPasswordPrompts=1",
        "-o",
        "ConnectTimeout=10",
    ]


def ssh_argv(
    port: int,
    command: str | None = None,
    options: Sequence[str] = (),
    password: str = PASSWORD,
    user: str = USER,
    log_level: str = "ERROR",
) -> list[str]:
    """``sshpass -p PASSWORD ssh OPTIONS -p PORT [options] user@127.0.0.1 [command]``."""
    common = client_options(log_level)
    argv = ["sshpass", "-p", password, "ssh", *common, "-p", str(port), *options, f"{user}@{HOST}"]
    return argv if command is None else [*argv, command]


def scp_argv(port: int, *args: str, password: str = PASSWORD) -> list[str]:
    return ["sshpass", "-p", password, "scp", *client_options(), "-P", str(port), *args]


def sftp_argv(port: int, password: str = PASSWORD, user: str = USER) -> list[str]:
    return ["sshpass", "-p", password, "sftp", *client_options(), "-P", str(port), f"{user}@{HOST}"]


def remote(path: str, user: str = USER) -> str:
    """An scp remote path on the honeypot."""
    return f"{user}@{HOST}:{path}"


@dataclass
class Completed:
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def err(self) -> str:
        return self.stderr.decode("utf-8", "replace")


async def run(argv: Sequence[str], stdin: bytes | None = None, timeout_s: float = 60.0) -> Completed:
    """Run a client to completion (killed if it takes longer than ``timeout_s``)."""
    async with started(argv, stdin=stdin is not None) as proc:
        async with asyncio.timeout(timeout_s):
            out, err = await proc.communicate(stdin)
        assert proc.returncode is not None
        return Completed(proc.returncode, out, err)


@contextlib.asynccontextmanager
async def started(argv: Sequence[str], stdin: bool = True) -> AsyncIterator[asyncio.subprocess.Process]:
    """A client process with pipes; terminated (then killed) on exit if it is still running."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        await stop(proc)


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()  # sshpass passes SIGTERM on to its ssh
    try:
        async with asyncio.timeout(5):
            await proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Tmux:
    """One detached tmux session on a private server socket, running one command in one pane."""

    def __init__(self, socket_name: str, config: Path) -> None:
        self.socket_name = socket_name
        self.config = config
        self.target = "main"

    async def tmux(self, *args: str, check: bool = True) -> str:
        proc = await asyncio.create_subprocess_exec(
            "tmux",
            "-L",
            self.socket_name,
            "-f",
            str(self.config),
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(10):
            out, err = await proc.communicate()
        if check and proc.returncode != 0:
            raise RuntimeError(f"tmux {shlex.join(args)} failed ({proc.returncode}): {err.decode(errors='replace')}")
        return out.decode("utf-8", "replace")

    async def start(self, argv: Sequence[str], width: int, height: int) -> None:
        command = f"{shlex.join(argv)}; echo {EXIT_MARK}$?"
        await self.tmux("new-session", "-d", "-s", self.target, "-x", str(width), "-y", str(height), command)

    async def type(self, text: str) -> None:
        """Type ``text`` literally (no key names)."""
        await self.tmux("send-keys", "-t", self.target, "-l", text)

    async def keys(self, *names: str) -> None:
        """Press keys by tmux name: ``Enter``, ``BSpace``, ``C-c``."""
        await self.tmux("send-keys", "-t", self.target, *names)

    async def line(self, text: str) -> None:
        await self.type(text)
        await self.keys("Enter")

    async def screen(self) -> str:
        """The pane's text (with its scroll-back), wrapped lines joined, escapes dropped."""
        return await self.tmux("capture-pane", "-p", "-J", "-S", "-1000", "-t", self.target)

    async def resize(self, width: int, height: int) -> None:
        await self.tmux("resize-window", "-t", self.target, "-x", str(width), "-y", str(height))

    async def pane(self, fmt: str) -> str:
        return (await self.tmux("display-message", "-p", "-t", self.target, fmt)).strip()

    async def wait_for(self, pattern: str, timeout_s: float = 20.0) -> re.Match[str]:
        """Wait until ``pattern`` (a regex, multi-line) matches the pane's text; the error shows the pane."""
        regex = re.compile(pattern, re.MULTILINE)
        text = ""
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    text = await self.screen()
                    if m := regex.search(text):
                        return m
                    await asyncio.sleep(0.1)
        except TimeoutError:
            raise AssertionError(f"{pattern!r} did not appear within {timeout_s}s; pane:\n{text}") from None

    async def wait_exit(self, timeout_s: float = 20.0) -> int:
        """Wait until the pane's command exited; return its exit status."""
        # The status comes from the wrapper shell (see start): tmux 3.3a sometimes misses the pane's
        # SIGCHLD, leaving #{pane_dead_status} empty and the process a zombie.
        m = await self.wait_for(rf"^{EXIT_MARK}(\d+)$", timeout_s)
        return int(m.group(1))


@contextlib.asynccontextmanager
async def tmux_session(argv: Sequence[str], width: int, height: int) -> AsyncIterator[Tmux]:
    """Run ``argv`` in a fresh tmux server of its own (a pane ``width`` x ``height``); kill the server after."""
    with tempfile.TemporaryDirectory(prefix="sandtrap-tmux-") as tmp:
        config = Path(tmp) / "tmux.conf"
        config.write_text("set -g remain-on-exit on\nset -g history-limit 5000\nset -g status off\n")
        t = Tmux(f"sandtrap-test-{secrets.token_hex(4)}", config)
        socket_path = ""
        try:
            await t.start(argv, width, height)
            socket_path = await t.pane("#{socket_path}")
            yield t
        finally:
            await t.tmux("kill-server", check=False)
            if socket_path:
                Path(socket_path).unlink(missing_ok=True)  # tmux 3.3a leaves it behind


# -- asyncssh ------------------------------------------------------------------------------------------------
def asyncssh_options(login_timeout: float = 30, **kw: Any) -> dict[str, Any]:
    """asyncssh.connect arguments for the honeypot, with nothing picked up from this machine's ~/.ssh."""
    base: dict[str, Any] = {
        "known_hosts": None,
        "username": USER,
        "password": PASSWORD,
        "client_keys": None,
        "agent_path": None,
        "config": [],
        "preferred_auth": "password",
        "login_timeout": login_timeout,
    }
    return {**base, **kw}


@contextlib.asynccontextmanager
async def asyncssh_connected(hp: Any, **kw: Any) -> AsyncIterator[asyncssh.SSHClientConnection]:
    """A connection to honeypot ``hp`` (anything with a ``port``), closed and awaited on the way out."""
    async with asyncio.timeout(60):
        conn = await asyncssh.connect(HOST, hp.port, **asyncssh_options(**kw))
    try:
        yield conn
    finally:
        conn.close()
        await conn.wait_closed()
