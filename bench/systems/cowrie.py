"""Cowrie from PyPI (installed by bench/setup.sh into bench/.work/cowrie-venv), default emulated shell.

Its configuration is the bundled ``cowrie.cfg.dist`` with a small overlay: the SSH listener on a
spare loopback port (the default is ``tcp:2222:interface=0.0.0.0``), logs and state in this run's
directory, telnet off (its default). ``etc/userdb.txt`` accepts the benchmark's root password only,
as sandtrap's config does, so a flood fails (Cowrie's bundled example accepts nearly anything).
Everything else (JSON log, tty logs, Twisted's 1 s delay after a failed password) is its default.
Cowrie refuses to run as root: it runs as the benchmark's test user.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
from pathlib import Path

from bench.systems.base import HOST, BenchError, Server, check_loopback_only, free_port, wait_port

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / "bench" / ".work" / "cowrie-venv"
USER = os.environ.get("BENCH_USER", "sandtrap-bench")


def version() -> str:
    import re

    for path in (VENV / "lib").glob("python3*/site-packages/cowrie/_version.py"):
        m = re.search(r"^__version__ = version = ['\"]([^'\"]+)", path.read_text(), re.MULTILINE)
        if m:
            return m.group(1)
    return "?"


def _prepare(work: Path, password: str, account: pwd.struct_passwd) -> int:
    """A fresh state directory owned by the test user, with the config overlay and userdb: the port."""
    if work.exists():
        shutil.rmtree(work)
    for sub in ("etc", "var/log/cowrie", "var/lib/cowrie/downloads", "var/lib/cowrie/tty", "var/run"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    port = free_port()
    (work / "etc" / "cowrie.cfg").write_text(
        "[honeypot]\n"
        f"log_path = {work / 'var/log/cowrie'}\n"
        f"state_path = {work / 'var/lib/cowrie'}\n"
        "[ssh]\n"
        f"listen_endpoints = tcp:{port}:interface={HOST}\n"
        "[telnet]\n"
        "enabled = false\n",
        encoding="utf-8",
    )
    (work / "etc" / "userdb.txt").write_text(f"root:x:{password}\n", encoding="ascii")
    for dirpath, _, files in os.walk(work):
        os.chown(dirpath, account.pw_uid, account.pw_gid)
        for name in files:
            os.chown(os.path.join(dirpath, name), account.pw_uid, account.pw_gid)
    return port


async def start(work: Path, password: str) -> Server:
    twistd = VENV / "bin" / "twistd"
    if not await asyncio.to_thread(twistd.exists):
        raise BenchError(f"{twistd} not found: run bench/setup.sh (installs Cowrie)")
    try:
        account = pwd.getpwnam(USER)
    except KeyError:
        raise BenchError(f"test user {USER} missing: run bench/setup.sh") from None
    port = await asyncio.to_thread(_prepare, work, password, account)
    cowrie_version = await asyncio.to_thread(version)
    log = work / "twistd.out"
    env = {
        "HOME": account.pw_dir,
        "PATH": f"{VENV / 'bin'}:/usr/bin:/bin",
        "LANG": "C.UTF-8",
    }
    argv = [
        "setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--init-groups",
        str(twistd), "-n", "--umask=0022", "--pidfile=", "--logger", "cowrie.python.logfile.logger", "cowrie",
    ]  # fmt: skip
    with log.open("wb") as f:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=f, stderr=f, start_new_session=True, cwd=str(work), env=env
        )
    server = Server(
        name="cowrie",
        label="Cowrie",
        version=f"Cowrie {cowrie_version}",
        port=port,
        username="root",
        password=password,
        process=process,
        log=log,
    )
    server.notes.append("default emulated shell (backend = shell); 1 s delay after a failed password (Twisted's)")
    try:
        await wait_port(port, process, 60.0, log)
        server.listening = check_loopback_only("cowrie", process.pid)
    except BaseException:
        await server.stop()
        raise
    return server
