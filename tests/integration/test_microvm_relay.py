"""The attacker's SSH session is the guest's own sshd (issue 15, step 3): the honeypot on 127.0.0.1 with
``sandbox.backend: microvm`` (TCG here), driven by OpenSSH's ssh, scp and sftp and by asyncssh (window changes,
signals), then checked inside the guest: sshd's auth.log and journal lines, ``w``, ``last``, ``ss``.

One VM serves every check (affinity source_ip: every connection from 127.0.0.1 lands in it): a boot costs ~30 s.
A client on loopback reaches the guest from the host side of its tap (10.20.1.1), with its own source port; an
address off loopback is bound as it is inside the VM's namespace (checked with the sandbox's own relay: no packet
leaves that namespace, the guest answers an address local to it).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from sandtrap.app import running
from sandtrap.config import Settings, merge
from sandtrap.events import (
    CHANNEL_EXIT,
    CHANNEL_SIGNAL,
    COMMAND_INPUT,
    LOG_CLOSED,
    SANDBOX_ASSIGNED,
    SESSION_CLOSED,
    SESSION_CONNECT,
    SESSION_FILE_UPLOAD,
    CaptureSink,
    Event,
)
from sandtrap.sandbox.base import ClientAddress, Login, run
from sandtrap.sandbox.microvm import qemu
from sandtrap.sandbox.microvm.backend import MicroVMBackend
from sandtrap.sandbox.microvm.sandbox import MicroVMSandbox

from sshclient import HOST, PASSWORD, remote, scp_argv, sftp_argv, ssh_argv
from sshclient import run as client

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "microvm-test"  # as test_microvm.py: the same image (keyed by the same keys) serves both
GATEWAY = "10.20.1.1"  # the host side of the tap: where a loopback client comes from
GUEST = "10.20.1.13"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1500),
    pytest.mark.skipif(os.geteuid() != 0, reason="a VM's network namespace and tap need root"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="apt-get install qemu-system-x86"),
    pytest.mark.skipif(shutil.which("sshpass") is None, reason="apt-get install sshpass"),
]


def _settings() -> Settings:
    base: dict[str, Any] = {
        "sensor": f"vmrelay-{secrets.token_hex(3)}",  # a capture gateway namespace of its own
        "storage": {"data_dir": str(DATA)},
        "image": {"cache_dir": str(ROOT / "data" / "cache")},
        "ssh": {"listen": "127.0.0.1:0"},
        "api": {"listen": "127.0.0.1:0"},
        "sandbox": {
            "backend": "microvm",
            "microvm": {"memory": "512m", "vcpus": 1},
            "pool_size": 0,  # the one VM is made for the first connection: no second one booting alongside
            "affinity": "source_ip",
        },
        "auth": {
            "credentials": [{"username": "root", "password": PASSWORD}, {"username": "deploy", "password": "*"}],
            "accept_all_after": 0,
            "failure_delay_s": 0,
            "success_delay_s": 0,
        },
    }
    return Settings.model_validate(merge(base, {}))


def _last(capture: CaptureSink, eventid: str) -> Event:
    found = [e for e in capture.events if e.eventid == eventid]
    assert found, f"no {eventid}"
    return found[-1]


async def _wait(capture: CaptureSink, eventid: str, timeout_s: float = 60.0, **fields: Any) -> Event:
    async with asyncio.timeout(timeout_s):
        while True:
            for e in capture.events:
                if e.eventid == eventid and all(e.get(k) == v for k, v in fields.items()):
                    return e
            await asyncio.sleep(0.1)


class _Tries(asyncssh.SSHClient):
    """Two wrong passwords, then the right one, on one connection."""

    def __init__(self) -> None:
        self._left = ["wrong-1", "wrong-2", PASSWORD]

    def password_auth_requested(self) -> str | None:
        return self._left.pop(0) if self._left else None


async def _guest(box: MicroVMSandbox, command: str) -> str:
    """A command as root in the guest by the honeypot's own way in (not an attacker's login)."""
    result = await run(box, ["sh", "-c", command], timeout_s=120)
    return result.stdout.decode(errors="replace")


async def test_attacker_session_is_the_guests_own_sshd(tmp_path: Path) -> None:
    capture = CaptureSink()
    settings = _settings()
    vms = DATA / "microvm" / "vms"
    try:
        async with running(settings, sinks=[capture]) as services:
            port = services.ssh.port
            backend = services.backend
            assert isinstance(backend, MicroVMBackend)

            # -- exec: exit status, stdout/stderr apart, what the session sees of its connection ----------------
            r = await client(ssh_argv(port, 'echo "$SSH_CONNECTION"; echo err >&2; exit 3'), timeout_s=300)
            connect = _last(capture, SESSION_CONNECT)
            src_port = connect.get("src_port")
            assert r.returncode == 3, r.err
            assert r.out == f"{GATEWAY} {src_port} {GUEST} 22\n" and r.err == "err\n", (r.out, r.err)
            assigned = _last(capture, SANDBOX_ASSIGNED)
            box = backend.sandbox(str(assigned.get("sandbox_id")), str(assigned.get("sandbox_name")))
            assert box.features.own_sshd
            first_session = connect.session
            await _wait(capture, SESSION_CLOSED, session=first_session)

            # -- exit signal: the shell killed by a signal, as sshd reports it -----------------------------------
            r = await client(ssh_argv(port, "kill -TERM $$"), timeout_s=120)
            assert r.returncode == 255, r.err  # OpenSSH's client for a remote killed by a signal
            await _wait(capture, CHANNEL_EXIT, signal="TERM", session=_last(capture, SESSION_CONNECT).session)

            # -- refused passwords before the right one: the guest's sshd is asked them too (relay.py) ------------
            async with asyncssh.connect(
                HOST, port, username="root", client_factory=_Tries, preferred_auth="password", known_hosts=None,
                agent_path=None, config=None,
            ) as conn:  # fmt: skip
                tries_port = conn.get_extra_info("sockname")[1]
                assert (await conn.run("echo in", check=False)).stdout == "in\n"

            # -- env: what Debian's sshd accepts (AcceptEnv LANG LC_*), and nothing else -----------------------
            env_argv = ssh_argv(
                port, 'echo "[$LANG][$LC_TIME][$SANDTRAP_X]"', ["-o", "SendEnv=LANG LC_TIME SANDTRAP_X"]
            )
            r = await _with_env(env_argv, LANG="fr_FR.UTF-8", LC_TIME="C", SANDTRAP_X="no")
            assert r.out == "[fr_FR.UTF-8][C][]\n", r.out

            # -- pty shell: a real pty of the guest's sshd, the login's motd, exit status ----------------------
            r = await client(ssh_argv(port, None, ["-tt"]), stdin=b'tty; echo "T=$TERM"; exit 5\n', timeout_s=120)
            assert r.returncode == 5, r.err
            assert re.search(r"/dev/pts/\d+", r.out) and "Linux web-prod-03" in r.out, r.out
            shell_session = _last(capture, SESSION_CONNECT).session
            await _wait(capture, COMMAND_INPUT, session=shell_session, input='tty; echo "T=$TERM"; exit 5')
            await _wait(capture, LOG_CLOSED, session=shell_session)

            # -- asyncssh: window changes and a signal request on one connection ------------------------------
            async with asyncssh.connect(
                HOST, port, username="root", password=PASSWORD, known_hosts=None, agent_path=None, config=None
            ) as conn:
                proc = await conn.create_process(term_type="xterm", term_size=(80, 24), encoding=None)
                proc.stdin.write(b"stty size\n")
                await _read_until(proc, b"24 80")
                proc.change_terminal_size(132, 43)
                await asyncio.sleep(1)  # the window-change goes out before the next line (both on one channel)
                proc.stdin.write(b"stty size\n")
                await _read_until(proc, b"43 132")
                proc.close()
            # A signal request reaches the session's process group, as OpenSSH's sshd delivers it: for an account
            # that is not root (sshd serves root's session from its privileged monitor, which refuses signals).
            async with asyncssh.connect(
                HOST, port, username="deploy", password="any", known_hosts=None, agent_path=None, config=None
            ) as conn:
                sleeper = await conn.create_process("echo started; exec sleep 600", encoding=None)
                await _read_until(sleeper, b"started", timeout_s=180)  # running: sshd has a process to signal
                sleeper.send_signal("INT")
                await asyncio.wait_for(sleeper.wait_closed(), 60)
                assert sleeper.exit_signal is not None and sleeper.exit_signal[0] == "INT", sleeper.exit_signal
            await _wait(capture, CHANNEL_SIGNAL, signal="INT")

            # -- scp and sftp uploads, into the guest and recorded ---------------------------------------------
            payload = secrets.token_bytes(200_000)
            local = tmp_path / "tool.bin"
            local.write_bytes(payload)
            digest = hashlib.sha256(payload).hexdigest()
            r = await client(scp_argv(port, str(local), remote("/tmp/scp-tool.bin")), timeout_s=180)
            assert r.returncode == 0, r.err
            await _wait(capture, SESSION_FILE_UPLOAD, destfile="/tmp/scp-tool.bin", shasum=digest)
            r = await client(sftp_argv(port), stdin=f"put {local} /tmp/sftp-tool.bin\nbye\n".encode(), timeout_s=180)
            assert r.returncode == 0, r.err
            await _wait(capture, SESSION_FILE_UPLOAD, destfile="/tmp/sftp-tool.bin", shasum=digest)
            got = await box.get_file("/tmp/sftp-tool.bin", 1 << 20)
            assert got is not None and got.data == payload

            # -- another password for that account: set first, sshd lets it in with it ---------------------------
            r = await client(ssh_argv(port, "id -un; echo $HOME", user="deploy", password="s3cret!"), timeout_s=120)
            assert r.out == "deploy\n/home/deploy\n", (r.out, r.err)

            # -- inside the guest: what a real server shows of these logins ------------------------------------
            await _wait(capture, SESSION_CLOSED, session=_last(capture, SESSION_CONNECT).session)
            auth = await _guest(box, "cat /var/log/auth.log")
            assert f"Accepted password for root from {GATEWAY} port {src_port} ssh2" in auth, auth[-3000:]
            assert f"Disconnected from user root {GATEWAY} port {src_port}" in auth, auth[-3000:]
            assert re.search(rf"Accepted password for deploy from {GATEWAY} port \d+ ssh2", auth), auth[-3000:]
            journal = await _guest(box, "journalctl -u ssh --no-pager -o cat")
            assert f"Accepted password for root from {GATEWAY} port {src_port} ssh2" in journal, journal[-2000:]
            last = await _guest(box, "last -i -w")
            assert re.search(rf"^root\s+pts/\d+\s+{re.escape(GATEWAY)}\s", last, re.M), last
            tried = [
                line.split(": ", 1)[-1]
                for line in auth.splitlines()
                if f"from {GATEWAY} port {tries_port} ssh2" in line and ("Failed" in line or "Accepted" in line)
            ]
            expected = [f"{what} password for root from {GATEWAY} port {tries_port} ssh2" for what in ("Failed",) * 2]
            assert tried == [*expected, f"Accepted password for root from {GATEWAY} port {tries_port} ssh2"], tried
            # The honeypot's own commands (these checks included) go by the guest agent: no login of ours shows,
            # and the agent's own log lines are held back (its unit's LogLevelMax).
            assert f"Accepted publickey for root from {GATEWAY}" not in auth, auth[-3000:]
            agent_log = await _guest(box, "journalctl -o cat -t qemu-ga; journalctl -o cat | grep -c guest-exec")
            assert agent_log.strip() == "0", agent_log[-2000:]
            helper = await _guest(box, "test -e /usr/lib/openssh/sshd-session && echo present || echo absent")
            assert helper.strip() == "absent"

            # A live login: `w` and `ss` in the guest show it, with the client's port; its close ends it there.
            async with asyncssh.connect(
                HOST, port, username="root", password=PASSWORD, known_hosts=None, agent_path=None, config=None
            ) as conn:
                live_port = conn.get_extra_info("sockname")[1]
                shell = await conn.create_process(term_type="xterm", term_size=(80, 24), encoding=None)
                shell.stdin.write(b"echo ready\n")
                await _read_until(shell, b"ready")
                w = await _guest(box, "w -h -i")
                assert re.search(rf"^root\s+pts/\d+\s+{re.escape(GATEWAY)}\s", w, re.M), w
                ss = await _guest(box, "ss -tnH state established '( sport = :22 )'")
                assert f"{GUEST}:22 {GATEWAY}:{live_port}".replace(" ", "") in ss.replace(" ", ""), ss
                assert len(ss.strip().splitlines()) == 1, ss  # the attacker's: the honeypot has no connection there
                shell.close()
            await _wait(capture, SESSION_CLOSED, session=_last(capture, SESSION_CONNECT).session)
            ss = await _guest(box, "sleep 2; ss -tnH state established '( sport = :22 )'")
            assert f"{GATEWAY}:{live_port}" not in ss, ss

            # -- the relay itself, off loopback and by publickey (no packet leaves the VM's namespace) ----------
            await _relay_off_loopback(box)
    finally:
        for directory in vms.iterdir() if vms.exists() else ():
            shutil.rmtree(directory, ignore_errors=True)
    left = [n for n, pid in qemu.find_qemus("sandtrap-vm-").items() if str(DATA) in _cmdline(pid)]
    assert left == [], f"QEMUs left running: {left}"


async def _relay_off_loopback(box: MicroVMSandbox) -> None:
    """An attacker at 198.51.100.7:40123 who logged in by publickey: the guest sees that address and port."""
    await run(box, ["sh", "-c", "id ops >/dev/null 2>&1 || useradd -m -s /bin/bash ops"], timeout_s=60)
    peer = ClientAddress("198.51.100.7", 40123, GUEST)
    login = Login(
        session="relay-test", peer=peer, username="ops", auth_method="publickey", kind="exec",
        command=b'echo "$SSH_CONNECTION"; id -un',
    )  # fmt: skip
    proc = await box.exec(["unused"], login=login)
    out = b""
    while (chunk := await proc.read()) is not None:
        out += chunk.data
    assert (await proc.wait()).code == 0
    assert out == b"198.51.100.7 40123 10.20.1.13 22\nops\n", out
    await box.end_login("relay-test")
    auth = await _guest(box, "sleep 1; cat /var/log/auth.log")
    assert re.search(r"Accepted publickey for ops from 198\.51\.100\.7 port 40123 ssh2: ED25519 SHA256:", auth), auth[
        -2000:
    ]
    await box.end_login("relay-test")  # harmless twice


async def _with_env(argv: list[str], **env: str) -> Any:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return await client(argv, timeout_s=120)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


async def _read_until(proc: asyncssh.SSHClientProcess[bytes], needle: bytes, timeout_s: float = 60.0) -> bytes:
    seen = b""
    async with asyncio.timeout(timeout_s):
        while needle not in seen:
            data = await proc.stdout.read(4096)
            if not data:
                break
            seen += data
    assert needle in seen, seen
    return seen


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    return ""
