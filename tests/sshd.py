"""A throw-away real OpenSSH server (Debian's ``/usr/sbin/sshd``) on a free loopback port.

Used to compare sandtrap's wire behaviour with the server it imitates, side by side:

    async with real_sshd(tmp_path) as sshd:
        reader, writer = await asyncio.open_connection("127.0.0.1", sshd.port)

The config is Debian bookworm's default ``/etc/ssh/sshd_config`` (crypto defaults untouched), with
throw-away host keys, a pid file in the temporary directory and ``MaxStartups`` raised so that
probe tests never hit sshd's early-drop. sshd is stopped in ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

SSHD = Path("/usr/sbin/sshd")
SSH_KEYGEN = "ssh-keygen"
PRIVSEP_DIR = Path("/run/sshd")  # sshd refuses to start without its privilege separation directory

# In sshd's default HostKey order (rsa, ecdsa, ed25519): the order decides the host key list it offers.
HOST_KEY_TYPES = ("rsa", "ecdsa", "ed25519")

# Debian bookworm's /etc/ssh/sshd_config, without its comments and its Include of sshd_config.d.
DEBIAN_DEFAULTS = """\
KbdInteractiveAuthentication no
UsePAM no
X11Forwarding yes
PrintMotd no
AcceptEnv LANG LC_*
Subsystem sftp /usr/lib/openssh/sftp-server
"""


class SSHDUnavailable(RuntimeError):
    """The real sshd is not installed or did not start."""


@dataclass
class RealSSHD:
    port: int
    directory: Path
    process: asyncio.subprocess.Process
    log: list[str] = field(default_factory=list)  # sshd's stderr (it runs with -e), one line per entry


def is_available() -> bool:
    return SSHD.exists() and shutil.which(SSH_KEYGEN) is not None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def version() -> str:
    """What ``sshd -V`` prints, e.g. ``OpenSSH_9.2, OpenSSL 3.0.19 27 Jan 2026``."""
    out = subprocess.run([str(SSHD), "-V"], capture_output=True, text=True, timeout=10, check=False)
    return (out.stderr or out.stdout).strip()


def _generate_host_keys(directory: Path) -> list[Path]:
    paths = []
    for kind in HOST_KEY_TYPES:
        path = directory / f"ssh_host_{kind}_key"
        subprocess.run(
            [SSH_KEYGEN, "-q", "-t", kind, "-N", "", "-C", "", "-f", str(path)],
            check=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )
        paths.append(path)
    return paths


def write_config(directory: Path, port: int, extra: str = "") -> Path:
    keys = _generate_host_keys(directory)
    lines = [
        f"Port {port}",
        "ListenAddress 127.0.0.1",
        *(f"HostKey {k}" for k in keys),
        f"PidFile {directory / 'sshd.pid'}",
        "MaxStartups 100:30:200",
        DEBIAN_DEFAULTS,
        extra,
    ]
    path = directory / "sshd_config"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


async def _drain(stream: asyncio.StreamReader, log: list[str], ready: asyncio.Event) -> None:
    while line := await stream.readline():
        text = line.decode("utf-8", "backslashreplace").rstrip()
        log.append(text)
        if text.startswith("Server listening on"):
            ready.set()


async def _stop(process: asyncio.subprocess.Process) -> None:
    """SIGTERM to sshd's own process group (listener and per-connection children), SIGKILL if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            async with asyncio.timeout(10):
                await process.wait()
            return
        except TimeoutError:
            continue


@contextlib.asynccontextmanager
async def real_sshd(directory: Path, extra_config: str = "", start_timeout_s: float = 30.0) -> AsyncIterator[RealSSHD]:
    """Run ``sshd -D -e -f <config>`` on 127.0.0.1 until the block ends; ``directory`` holds its files."""
    if not is_available():
        raise SSHDUnavailable(f"{SSHD} not found: install Debian's openssh-server")
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    port = free_port()
    config = await asyncio.to_thread(write_config, directory, port, extra_config)
    check = await asyncio.create_subprocess_exec(
        str(SSHD), "-t", "-f", str(config), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    async with asyncio.timeout(start_timeout_s):
        out, _ = await check.communicate()
    if check.returncode != 0:
        raise SSHDUnavailable(f"sshd -t rejected {config}: {out.decode(errors='replace').strip()}")

    process = await asyncio.create_subprocess_exec(
        str(SSHD),
        "-D",
        "-e",
        "-f",
        str(config),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # its own process group: stopping it never reaches the test runner
    )
    sshd = RealSSHD(port, directory, process)
    ready = asyncio.Event()
    assert process.stderr is not None
    drain = asyncio.create_task(_drain(process.stderr, sshd.log, ready))
    try:
        try:
            async with asyncio.timeout(start_timeout_s):
                done = asyncio.ensure_future(process.wait())
                waiter = asyncio.ensure_future(ready.wait())
                await asyncio.wait({done, waiter}, return_when=asyncio.FIRST_COMPLETED)
                for task in (done, waiter):
                    task.cancel()
        except TimeoutError:
            raise SSHDUnavailable(f"sshd did not start in {start_timeout_s}s: {sshd.log}") from None
        if not ready.is_set():
            raise SSHDUnavailable(f"sshd exited ({process.returncode}): {sshd.log}")
        yield sshd
    finally:
        await _stop(process)
        drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drain
