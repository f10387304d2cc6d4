"""Debian's OpenSSH server with a throw-away config on a spare loopback port.

Debian bookworm's defaults, except what a benchmark on loopback needs: its own host keys and pid
file, ``ListenAddress 127.0.0.1``, ``AllowUsers`` the test user only, ``MaxStartups`` raised so a
flood is measured rather than dropped, and ``UsePAM no`` (sshd checks /etc/shadow itself; PAM would
add pam_unix's ~2 s delay after each failed password and the update-motd scripts at each login).
The test user gets a random password for this run (Debian's default hash) and is locked again after.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import psutil

from bench.systems.base import HOST, BenchError, Server, check_loopback_only, free_port, wait_port

SSHD = Path("/usr/sbin/sshd")
USER = os.environ.get("BENCH_USER", "sandtrap-bench")

DEBIAN_DEFAULTS = """\
KbdInteractiveAuthentication no
X11Forwarding yes
PrintMotd no
AcceptEnv LANG LC_*
Subsystem sftp /usr/lib/openssh/sftp-server
"""


def version() -> str:
    out = subprocess.run([str(SSHD), "-V"], capture_output=True, text=True, timeout=10, check=False)
    return (out.stderr or out.stdout).strip().split(",")[0]


def set_password(password: str) -> str:
    """Give the test user this run's password; return the hash scheme (``$y$`` is yescrypt)."""
    subprocess.run(["chpasswd"], input=f"{USER}:{password}\n", text=True, check=True, timeout=30)
    subprocess.run(["usermod", "-U", USER], capture_output=True, check=False, timeout=30)
    for line in Path("/etc/shadow").read_text().splitlines():
        if line.startswith(USER + ":"):
            field = line.split(":")[1]
            return field[: field.find("$", 1) + 1] if field.startswith("$") else "?"
    raise BenchError(f"test user {USER} not in /etc/shadow: run bench/setup.sh")


def lock_user() -> None:
    subprocess.run(["passwd", "-l", USER], capture_output=True, check=False, timeout=30)


def _host_keys(directory: Path) -> list[Path]:
    keys = []
    for kind in ("rsa", "ecdsa", "ed25519"):
        path = directory / f"ssh_host_{kind}_key"
        if not path.exists():
            subprocess.run(
                ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "", "-f", str(path)],
                check=True,
                timeout=60,
                stdin=subprocess.DEVNULL,
                capture_output=True,
            )
        keys.append(path)
    return keys


def _is_sshd(p: psutil.Process) -> bool:
    return bool(p.name() == "sshd")


def _prepare(work: Path, password: str) -> tuple[int, Path, str]:
    """Host keys, config (checked with ``sshd -t``) and this run's password: (port, config, hash scheme)."""
    if not SSHD.exists():
        raise BenchError(f"{SSHD} not found: run bench/setup.sh (installs Debian's openssh-server)")
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o700)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    scheme = set_password(password)
    port = free_port()
    keys = _host_keys(work)
    lines = [
        f"Port {port}",
        f"ListenAddress {HOST}",
        *(f"HostKey {k}" for k in keys),
        f"PidFile {work / 'sshd.pid'}",
        "MaxStartups 1000:100:1000",
        f"AllowUsers {USER}",
        "UsePAM no",
        DEBIAN_DEFAULTS,
    ]
    config = work / "sshd_config"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    check = subprocess.run([str(SSHD), "-t", "-f", str(config)], capture_output=True, text=True, check=False)
    if check.returncode != 0:
        raise BenchError(f"sshd -t rejected {config}: {check.stderr.strip()}")
    return port, config, scheme


async def start(work: Path, password: str) -> Server:
    port, config, scheme = await asyncio.to_thread(_prepare, work, password)
    sshd_version = await asyncio.to_thread(version)
    log = work / "sshd.log"
    with log.open("wb") as f:
        process = await asyncio.create_subprocess_exec(
            str(SSHD), "-D", "-e", "-f", str(config),
            stdin=asyncio.subprocess.DEVNULL, stdout=f, stderr=f, start_new_session=True,
        )  # fmt: skip
    server = Server(
        name="openssh",
        label="OpenSSH",
        version=sshd_version + " (Debian)",
        port=port,
        username=USER,
        password=password,
        process=process,
        log=log,
        is_server_process=_is_sshd,
    )
    server.notes.append(f"test user {USER}, password hash {scheme} (Debian's default); UsePAM no")
    try:
        await wait_port(port, process, 30.0, log)
        server.listening = check_loopback_only("sshd", process.pid)
    except BaseException:
        await server.stop()
        raise
    return server
