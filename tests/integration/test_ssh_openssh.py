"""The honeypot as an attacker meets it: the real OpenSSH client (ssh, scp, sftp; 9.2p1) against a real box.

Each test starts its own honeypot on 127.0.0.1 (random port) with every event captured, drives the
stock client as a subprocess (passwords through ``sshpass``; interactive sessions inside ``tmux``),
and checks three things: what the client sees, what was recorded, and what the engine really holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiodocker
import pytest

from sandtrap.events import (
    CHANNEL_EXEC,
    CHANNEL_SUBSYSTEM,
    CLIENT_FINGERPRINT,
    CLIENT_SIZE,
    COMMAND_INPUT,
    DIRECT_TCPIP_REQUEST,
    FORWARD_REQUEST,
    LIMIT_HIT,
    LOGIN_SUCCESS,
    SANDBOX_ASSIGNED,
    SESSION_CLOSED,
    SESSION_FILE_CHANGED,
    Event,
)
from sandtrap.sandbox.docker import engine
from sandtrap.ssh.algorithms import OPENSSH_KEX_ALGS

from sandtrap_fixtures import BACKEND
from sshclient import free_port, remote, run, scp_argv, sftp_argv, ssh_argv, started, stop, tmux_session

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024
HOSTNAME = "db-test-7"
Honeypot = Callable[..., Any]


# -- the engine's side of things -------------------------------------------------------------------------
async def container_file(hp: Any, sandbox_id: str, path: str) -> bytes | None:
    """A file's bytes as the engine has them in the container (running or stopped); None if absent. A backend
    without an engine (nspawn): as the host reads them from the box's file system, through the seam."""
    if BACKEND != "docker":
        got = await hp.services.backend.sandbox(sandbox_id, "").get_file(path, 64 * MiB)
        return None if got is None else got.data
    async with engine.engine() as client:
        try:
            tar = await client.containers.container(sandbox_id).get_archive(path)
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return None
            raise
        with tar:
            member = tar.getmembers()[0]
            f = tar.extractfile(member)
            return None if f is None else f.read()


async def container_running(hp: Any, sandbox_id: str) -> bool:
    if BACKEND != "docker":
        return bool(await hp.services.backend.sandbox(sandbox_id, "").is_running())
    async with engine.engine() as client:
        info = await client.containers.container(sandbox_id).show()
        return bool(info["State"]["Running"])


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def by_session(events: list[Event]) -> dict[str, Event]:
    return {e.session: e for e in events}


async def eventually(check: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    """Poll a predicate until it holds."""
    try:
        async with asyncio.timeout(timeout_s):
            while not check():
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"{what} did not hold within {timeout_s}s") from None


# -- 1. what the box says about itself ---------------------------------------------------------------------
async def test_exec_reports_configured_hostname_root_and_debian_bookworm(honeypot: Honeypot) -> None:
    hp = await honeypot(sandbox={"hostname": HOSTNAME})
    command = "hostname; id -un; cat /etc/os-release"
    r = await run(ssh_argv(hp.port, command))
    assert r.returncode == 0, r.err
    lines = r.out.splitlines()
    assert lines[:2] == [HOSTNAME, "root"], r.out
    os_release = dict(line.split("=", 1) for line in lines[2:] if "=" in line)
    assert os_release["PRETTY_NAME"] == '"Debian GNU/Linux 12 (bookworm)"'
    assert os_release["ID"] == "debian"
    assert os_release["VERSION_ID"] == '"12"'
    assert os_release["VERSION_CODENAME"] == "bookworm"
    # Recorded as Cowrie records it: the login and the exact command line.
    await hp.wait_for(LOGIN_SUCCESS, username="root", password="hunter2")
    await hp.wait_for(COMMAND_INPUT, input=command)


# -- 2. exec semantics: exit status, separate streams, bulk stdin ------------------------------------------
async def test_exec_returns_exit_status_and_keeps_stdout_and_stderr_apart(honeypot: Honeypot) -> None:
    hp = await honeypot()
    r = await run(ssh_argv(hp.port, "exit 7"))
    assert r.returncode == 7, r.err
    assert (r.stdout, r.stderr) == (b"", b"")
    r = await run(ssh_argv(hp.port, "echo out; echo err >&2"))
    assert r.returncode == 0
    assert r.stdout == b"out\n"
    assert r.stderr == b"err\n"
    await hp.wait_for(CHANNEL_EXEC, input="exit 7")


async def test_exec_relays_20_mib_of_stdin_intact(honeypot: Honeypot) -> None:
    hp = await honeypot()
    data = os.urandom(20 * MiB)
    r = await run(ssh_argv(hp.port, "sha256sum"), stdin=data, timeout_s=90)
    assert r.returncode == 0, r.err
    assert r.out == f"{sha256(data)}  -\n"
    [closed] = await hp.wait_for(SESSION_CLOSED)
    assert closed.get("bytes_in") >= len(data)


# -- 3. file transfer: sftp and scp, and the file really is in the box ---------------------------------------
async def test_sftp_put_and_get_round_trip_and_the_file_is_in_the_box(honeypot: Honeypot, tmp_path: Path) -> None:
    hp = await honeypot(sandbox={"affinity": "source_ip"})
    data = os.urandom(5 * MiB)
    local, back = tmp_path / "payload.bin", tmp_path / "payload.back"
    local.write_bytes(data)
    commands = f"put {local} /root/payload.bin\nget /root/payload.bin {back}\nbye\n"
    r = await run(sftp_argv(hp.port), stdin=commands.encode(), timeout_s=60)
    assert r.returncode == 0, r.err
    assert sha256(back.read_bytes()) == sha256(data)
    await hp.wait_for(CHANNEL_SUBSYSTEM, subsystem="sftp")

    # The next connection from 127.0.0.1 lands in the same box, and the file is there.
    r = await run(ssh_argv(hp.port, "sha256sum /root/payload.bin"))
    assert r.returncode == 0, r.err
    assert r.out == f"{sha256(data)}  /root/payload.bin\n"
    assigned = await hp.wait_for(SANDBOX_ASSIGNED, count=2)
    assert len({e.get("sandbox_id") for e in assigned}) == 1
    # And the engine agrees.
    assert await container_file(hp, assigned[0].get("sandbox_id"), "/root/payload.bin") == data


@pytest.mark.parametrize("legacy", [False, True], ids=["sftp-protocol", "legacy-O"])
async def test_scp_upload_and_download_round_trip_and_the_file_is_in_the_box(
    honeypot: Honeypot, tmp_path: Path, legacy: bool
) -> None:
    hp = await honeypot(sandbox={"affinity": "source_ip"})
    flags = ["-O"] if legacy else []
    data = os.urandom(5 * MiB)
    local, back = tmp_path / "tool.bin", tmp_path / "tool.back"
    local.write_bytes(data)
    up = await run(scp_argv(hp.port, *flags, str(local), remote("/root/tool.bin")), timeout_s=60)
    assert up.returncode == 0, up.err
    down = await run(scp_argv(hp.port, *flags, remote("/root/tool.bin"), str(back)), timeout_s=60)
    assert down.returncode == 0, down.err
    assert sha256(back.read_bytes()) == sha256(data)
    # The client really used the protocol the test is about.
    if legacy:
        await hp.wait_for(CHANNEL_EXEC, input="scp -t /root/tool.bin")
        await hp.wait_for(CHANNEL_EXEC, input="scp -f /root/tool.bin")
        assert not hp.events(CHANNEL_SUBSYSTEM)
    else:
        await hp.wait_for(CHANNEL_SUBSYSTEM, count=2, subsystem="sftp")
        assert not hp.events(CHANNEL_EXEC)

    r = await run(ssh_argv(hp.port, "sha256sum /root/tool.bin"))
    assert r.out == f"{sha256(data)}  /root/tool.bin\n", r.err
    assigned = await hp.wait_for(SANDBOX_ASSIGNED, count=3)
    assert len({e.get("sandbox_id") for e in assigned}) == 1
    assert await container_file(hp, assigned[0].get("sandbox_id"), "/root/tool.bin") == data


# -- 4. an interactive login on a pty, as a person at a terminal sees it --------------------------------------
async def test_pty_login_looks_real_takes_typing_and_follows_window_changes(honeypot: Honeypot) -> None:
    hp = await honeypot(sandbox={"hostname": HOSTNAME})
    prompt = rf"root@{re.escape(HOSTNAME)}:~# "
    async with tmux_session(ssh_argv(hp.port, options=["-tt"]), width=100, height=30) as term:
        await term.wait_for(rf"^{prompt}", timeout_s=30)
        login_screen = await term.screen()

        await term.line("stty size | sed 's/^/size=/'")
        await term.wait_for(r"^size=30 100$")
        await term.resize(132, 43)
        await hp.wait_for(CLIENT_SIZE, width=132, height=43)
        await term.line("stty size | sed 's/^/size=/'")
        await term.wait_for(r"^size=43 132$")

        await term.line("echo $((6*7))")
        await term.wait_for(r"^42$")
        # A typo fixed with backspace before Enter: the shell runs the corrected line.
        await term.type("ehco")
        await term.keys("BSpace", "BSpace", "BSpace")
        await term.line("cho fixed-$((40+2))")
        await term.wait_for(r"^fixed-42$")
        await term.wait_for(rf"^{prompt}$")  # and a fresh prompt after it
        assert "command not found" not in await term.screen()

        await term.line("exit")
        assert await term.wait_exit() == 0
    await hp.wait_for(SESSION_CLOSED)
    # The login printed the box's own /etc/motd, as PAM does on a real login (read from the stopped box).
    [assigned] = hp.events(SANDBOX_ASSIGNED)
    motd = await container_file(hp, assigned.get("sandbox_id"), "/etc/motd")
    assert motd is not None and motd.strip(), "the image has no /etc/motd"
    for line in motd.decode().splitlines():
        assert line.strip() in login_screen, f"motd line {line!r} not shown at login; pane:\n{login_screen}"


# -- 5. one box per connection, or per source address ----------------------------------------------------------
async def test_simultaneous_logins_get_separate_boxes(honeypot: Honeypot) -> None:
    hp = await honeypot(sandbox={"pool_size": 2})

    def command(tag: str) -> str:
        # Leave a mark, say so, then wait for the go (so both sessions are surely live at once) and look.
        return f"echo {tag} > /root/mark-{tag}; echo ready; read -r go; ls /root"

    async with (
        started(ssh_argv(hp.port, command("alpha"))) as alpha,
        started(ssh_argv(hp.port, command("beta"))) as beta,
    ):
        async with asyncio.timeout(60):
            for proc in (alpha, beta):
                assert proc.stdout is not None
                assert await proc.stdout.readline() == b"ready\n"
            assert not hp.events(SESSION_CLOSED)  # both connections are up, each has written its mark
            (a_out, a_err), (b_out, b_err) = await asyncio.gather(alpha.communicate(b"go\n"), beta.communicate(b"go\n"))
    assert alpha.returncode == 0 and beta.returncode == 0, (a_err, b_err)
    assert b"mark-alpha" in a_out and b"mark-beta" not in a_out
    assert b"mark-beta" in b_out and b"mark-alpha" not in b_out

    assigned = by_session(await hp.wait_for(SANDBOX_ASSIGNED, count=2))
    assert len(assigned) == 2
    assert len({e.get("sandbox_id") for e in assigned.values()}) == 2
    # Each box (now stopped for forensics) holds its own session's file and not the other's.
    await hp.wait_for(SESSION_CLOSED, count=2)
    for session, event in assigned.items():
        [cmd] = hp.events(COMMAND_INPUT, session=session)
        tag, other = ("alpha", "beta") if "alpha" in cmd.get("input") else ("beta", "alpha")
        assert await container_file(hp, event.get("sandbox_id"), f"/root/mark-{tag}") == f"{tag}\n".encode()
        assert await container_file(hp, event.get("sandbox_id"), f"/root/mark-{other}") is None


async def test_source_ip_affinity_reconnect_finds_the_previous_sessions_files(honeypot: Honeypot) -> None:
    hp = await honeypot(sandbox={"affinity": "source_ip"})
    token = secrets.token_hex(8)
    first = await run(ssh_argv(hp.port, f"echo {token} > /root/notes.txt"))
    assert first.returncode == 0, first.err
    await hp.wait_for(SESSION_CLOSED)
    second = await run(ssh_argv(hp.port, "cat /root/notes.txt"))
    assert second.returncode == 0, second.err
    assert second.out == f"{token}\n"
    await hp.wait_for(SESSION_CLOSED, count=2)  # the second session's record is closed too
    a1, a2 = await hp.wait_for(SANDBOX_ASSIGNED, count=2)
    assert a1.session != a2.session
    assert a1.get("sandbox_id") == a2.get("sandbox_id")
    assert (a1.get("reused"), a2.get("reused")) == (False, True)


# -- 6. forwarding is refused, and recorded ------------------------------------------------------------------------
async def test_local_forward_is_refused_and_recorded(honeypot: Honeypot) -> None:
    hp = await honeypot()
    local_port = free_port()
    forward = f"127.0.0.1:{local_port}:127.0.0.1:22"
    # OpenSSH reports a refused channel at log level INFO.
    argv = ssh_argv(hp.port, options=["-N", "-o", "ExitOnForwardFailure=yes", "-L", forward], log_level="INFO")
    async with started(argv, stdin=False) as proc:
        # Once logged in, the client listens locally; a connection there makes it ask for a channel.
        async with asyncio.timeout(30):
            while True:
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", local_port)
                    break
                except ConnectionRefusedError:
                    assert proc.returncode is None, "ssh exited before listening"
                    await asyncio.sleep(0.1)
        try:
            orig_port = writer.get_extra_info("sockname")[1]
            async with asyncio.timeout(15):
                assert await reader.read() == b""  # the refused channel: the client hangs up on us
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        [event] = await hp.wait_for(DIRECT_TCPIP_REQUEST, dst_ip="127.0.0.1", dst_port=22)
        assert (event.get("orig_ip"), event.get("orig_port")) == ("127.0.0.1", orig_port)
        await stop(proc)
        assert proc.stderr is not None
        stderr = (await proc.stderr.read()).decode(errors="replace")
    assert "open failed: administratively prohibited" in stderr


async def test_remote_forward_is_refused_and_recorded(honeypot: Honeypot) -> None:
    hp = await honeypot()
    remote_port = free_port()
    forward = f"127.0.0.1:{remote_port}:127.0.0.1:22"
    argv = ssh_argv(hp.port, options=["-N", "-o", "ExitOnForwardFailure=yes", "-R", forward])
    r = await run(argv, timeout_s=30)
    assert r.returncode == 255
    assert f"remote port forwarding failed for listen port {remote_port}" in r.err
    await hp.wait_for(FORWARD_REQUEST, kind="remote", dst_ip="127.0.0.1", dst_port=remote_port)


# -- 7. limits: idle timeout, connections per source address ---------------------------------------------------
async def test_idle_session_is_closed_recorded_and_its_box_released(honeypot: Honeypot) -> None:
    hp = await honeypot(limits={"idle_timeout_s": 2})
    started_at = time.monotonic()
    r = await run(ssh_argv(hp.port, "sleep 60"), timeout_s=30)
    elapsed = time.monotonic() - started_at
    assert r.returncode == 255, r.err  # the connection went away under it
    assert 2 <= elapsed < 15
    await hp.wait_for(LIMIT_HIT, limit="idle_timeout_s")
    await hp.wait_for(SESSION_CLOSED, reason="idle_timeout_s")
    [assigned] = hp.events(SANDBOX_ASSIGNED)
    pool = hp.services.pool
    # Released: no longer active, stopped and kept for forensics.
    released = {"active": 0, "preserved": 1}
    await eventually(lambda: pool.stats().items() >= released.items(), what=f"pool stats include {released}")
    assert not await container_running(hp, assigned.get("sandbox_id"))


async def test_reading_a_live_box_costs_the_session_neither_its_record_nor_its_release(honeypot: Honeypot) -> None:
    # Regression: a read through the engine's archive API makes its diff list /proc/stat etc.; reading
    # those failed with tarfile.ReadError, which killed the session's finishing task (fixed in 71335e4).
    hp = await honeypot()
    async with started(ssh_argv(hp.port, "read -r line; echo bye")) as proc:
        assert proc.stdout is not None and proc.stdin is not None
        [assigned] = await hp.wait_for(SANDBOX_ASSIGNED)
        sandbox_id = assigned.get("sandbox_id")
        await hp.wait_for(CHANNEL_EXEC)
        # A forensic read while the session runs (what the artifact store or an analyst does).
        assert await container_file(hp, sandbox_id, "/etc/hostname") is not None
        proc.stdin.write(b"\n")
        async with asyncio.timeout(30):
            assert await proc.stdout.read() == b"bye\n"
            assert await proc.wait() == 0
    await hp.wait_for(SESSION_CLOSED, reason="client_closed")
    pool = hp.services.pool
    released = {"active": 0, "preserved": 1}
    await eventually(lambda: pool.stats().items() >= released.items(), what=f"pool stats include {released}")
    assert not await container_running(hp, sandbox_id)
    # The engine's diff lists the lxcfs /proc bind targets once the box was read; they are not the attacker's.
    changed = [e.get("filename") for e in hp.events(SESSION_FILE_CHANGED)]
    assert changed and not [f for f in changed if f.startswith("/proc")], changed


async def test_connection_over_the_per_ip_limit_is_closed_and_the_first_keeps_working(honeypot: Honeypot) -> None:
    hp = await honeypot(limits={"max_sessions_per_ip": 1})
    echo = 'while read -r line; do echo "got $line"; done'
    async with started(ssh_argv(hp.port, echo)) as first:
        assert first.stdin is not None and first.stdout is not None

        async def say(text: str) -> bytes:
            assert first.stdin is not None and first.stdout is not None
            first.stdin.write(f"{text}\n".encode())
            await first.stdin.drain()
            async with asyncio.timeout(30):
                return await first.stdout.readline()

        assert await say("one") == b"got one\n"
        second = await run(ssh_argv(hp.port, "echo second"), timeout_s=30)
        assert second.returncode != 0
        assert "second" not in second.out
        await hp.wait_for(LIMIT_HIT, limit="max_sessions_per_ip")
        await hp.wait_for(SESSION_CLOSED, reason="max_sessions_per_ip")
        assert await say("two") == b"got two\n"
        first.stdin.close()
        async with asyncio.timeout(30):
            assert await first.wait() == 0
    assert len(hp.events(LOGIN_SUCCESS)) == 1
    assert len(hp.events(SANDBOX_ASSIGNED)) == 1


# -- 7. the key exchanges and auth methods sshd offers ----------------------------------------------------
async def test_every_kex_sshd_offers_logs_in_one_at_a_time(honeypot: Honeypot) -> None:
    """OpenSSH's client with ``-o KexAlgorithms=X`` for each X of sshd's list, both sntrup761 names included:
    its sntrup761 decapsulates what ssh/sntrup761.py encapsulated, or the keys would not match."""
    hp = await honeypot(sandbox={"pool_size": 2})
    for alg in OPENSSH_KEX_ALGS:
        r = await run(ssh_argv(hp.port, "echo logged-in", options=["-o", f"KexAlgorithms={alg}"], log_level="DEBUG"))
        assert r.returncode == 0 and r.out == "logged-in\n", (alg, r.err[-2000:])
        assert f"debug1: kex: algorithm: {alg}\n" in r.err.replace("\r", ""), alg
    assert len(hp.events(LOGIN_SUCCESS)) == len(OPENSSH_KEX_ALGS)


async def test_default_client_negotiates_sntrup761(honeypot: Honeypot) -> None:
    hp = await honeypot()
    r = await run(ssh_argv(hp.port, "true", log_level="DEBUG"))
    assert r.returncode == 0, r.err[-2000:]
    assert "debug1: kex: algorithm: sntrup761x25519-sha512\n" in r.err.replace("\r", "")


async def test_host_bound_public_key_is_accepted_and_recorded(honeypot: Honeypot, tmp_path: Path) -> None:
    """OpenSSH signs with publickey-hostbound-v00@openssh.com once EXT_INFO announces it, as sshd does."""
    hp = await honeypot(auth={"accept_publickey": True})
    key = tmp_path / "id_ed25519"
    await run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(key)])
    argv = [
        *("ssh", "-F", "/dev/null", "-vvv", "-p", str(hp.port), "-i", str(key)),
        *("-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes"),
        *("-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-o", "PasswordAuthentication=no"),
        *("root@127.0.0.1", "id -un"),
    ]
    r = await run(argv)
    assert r.returncode == 0 and r.out == "root\n", r.err[-3000:]
    assert "publickey-hostbound@openssh.com=<0>" in r.err
    assert "using publickey-hostbound-v00@openssh.com with ED25519" in r.err
    fingerprint = (await run(["ssh-keygen", "-l", "-E", "sha256", "-f", f"{key}.pub"])).out.split()[1]
    (offered,) = hp.events(CLIENT_FINGERPRINT)
    assert offered.get("fingerprint_sha256") == fingerprint
    (ok,) = await hp.wait_for(LOGIN_SUCCESS)
    assert (ok.get("method"), ok.get("fingerprint_sha256")) == ("publickey", fingerprint)
