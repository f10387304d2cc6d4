"""The nspawn backend from outside and inside: the honeypot with ``sandbox.backend: nspawn`` and the stock OpenSSH
client (exec, a shell, scp recorded), the hardening (capabilities, seccomp, io_uring, mounts, network, limits),
and systemd-nspawn killed mid-session. Isolation is shown by inspection only; no packet leaves loopback."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_recording import PROMPT, sandtrap, sandtrap_run, write_config

from nspawn_fixtures import CACHE, needs_nspawn, nspawn_cleanup, nspawn_factory, nspawn_tree, remove_nspawn_boxes  # noqa: F401  (fixtures)
from sandtrap.events import CHANNEL_EXEC, LOGIN_SUCCESS, SANDBOX_ASSIGNED, SESSION_CLOSED, SESSION_FILE_UPLOAD
from sandtrap.sandbox.base import STDOUT, ClientAddress, ExitStatus, Login
from sandtrap.sandbox.nspawn import state
from sandtrap.sandbox.nspawn.backend import NspawnBackend
from sandtrap.sandbox.nspawn.mounts import mount_points
from sandtrap.sandbox.nspawn.sandbox import NspawnSandbox

from helpers import box_of, run
from sandbox_suite import read_all
from sshclient import asyncssh_connected, free_port, remote, scp_argv, ssh_argv, tmux_session
from sshclient import run as client

pytestmark = [*needs_nspawn, pytest.mark.timeout(240)]

Honeypot = Callable[..., Any]
HOSTNAME = "db-nspawn-2"
CAP_BITS = {"CHOWN": 0, "DAC_OVERRIDE": 1, "FOWNER": 3, "FSETID": 4, "KILL": 5, "SETGID": 6, "SETUID": 7,
            "NET_BIND_SERVICE": 10, "SYS_CHROOT": 18, "AUDIT_WRITE": 29}  # fmt: skip


def nspawn_settings(data: Path, **sandbox: Any) -> dict[str, Any]:
    return {
        "image": {"cache_dir": str(CACHE)},
        "sandbox": {"backend": "nspawn", "hostname": HOSTNAME, "pool_size": 1, **sandbox},
        "storage": {"data_dir": str(data)},
    }


def mounts_below(path: Path) -> list[str]:
    return [p for p in mount_points() if p.startswith(str(path) + "/")]


# -- the honeypot on nspawn, and OpenSSH --------------------------------------------------------------------
async def test_openssh_exec_shell_and_scp_upload_are_served_and_recorded(
    nspawn_tree: Path, nspawn_cleanup: None, honeypot: Honeypot, tmp_path: Path
) -> None:
    data_dir = tmp_path / "hp"
    hp = await honeypot(**nspawn_settings(data_dir, affinity="source_ip"))
    r = await client(ssh_argv(hp.port, "hostname; id -un; cat /proc/1/cmdline | tr '\\0' ' '; ls /run/host"))
    assert r.out.splitlines()[:3] == [HOSTNAME, "root", "/sbin/init "], r.out + r.err
    assert "No such file" in r.err  # nspawn's /run/host is gone
    await hp.wait_for(LOGIN_SUCCESS, username="root", password="hunter2")
    await hp.wait_for(CHANNEL_EXEC, input="hostname; id -un; cat /proc/1/cmdline | tr '\\0' ' '; ls /run/host")

    shell = await client(ssh_argv(hp.port, None, ["-tt"]), stdin=b"echo shell-$((6*7)); exit 3\n", timeout_s=60)
    assert "shell-42" in shell.out and shell.returncode == 3, shell.out + shell.err

    payload = os.urandom(512 * 1024)
    local = tmp_path / "tool.bin"
    local.write_bytes(payload)
    up = await client(scp_argv(hp.port, "-O", str(local), remote("/root/tool.bin")), timeout_s=60)
    assert up.returncode == 0, up.err
    [upload] = await hp.wait_for(SESSION_FILE_UPLOAD, count=1)
    assert upload.get("shasum") == hashlib.sha256(payload).hexdigest()
    # The same box (affinity by source address) holds it, in its overlay's upper directory on the host.
    assigned = await hp.wait_for(SANDBOX_ASSIGNED, count=3)
    [box_id] = {e.get("sandbox_id") for e in assigned}
    upper = data_dir / "nspawn" / "boxes" / box_id / "disk" / "upper" / "root" / "tool.bin"
    assert upper.read_bytes() == payload
    await hp.wait_for(SESSION_CLOSED, count=3)


async def test_killing_systemd_nspawn_ends_the_session_recorded_and_leaks_no_box_or_mount(
    nspawn_tree: Path, nspawn_cleanup: None, honeypot: Honeypot, tmp_path: Path
) -> None:
    data_dir = tmp_path / "hp"
    hp = await honeypot(**nspawn_settings(data_dir))
    async with asyncssh_connected(hp) as conn:
        proc = await conn.create_process(term_type="xterm")
        proc.stdin.write("echo before-$((6*7))\n")
        out = ""
        async with asyncio.timeout(30):
            while "before-42" not in out:
                out += await proc.stdout.read(1024)
        box = await box_of(hp)
        assert isinstance(box, NspawnSandbox)
        os.kill(box.record.nspawn_pid, signal.SIGKILL)
        async with asyncio.timeout(30):
            await proc.wait_closed()
    [closed] = await hp.wait_for(SESSION_CLOSED, count=1)
    assert closed.get("reason"), closed
    assert not await box.is_running()
    async with asyncio.timeout(30):
        while hp.services.pool.active:
            await asyncio.sleep(0.1)
    # Stopped and kept for forensics: the overlay still answers; removing it leaves no mount behind.
    assert (await box.get_file("/etc/hostname", 100)) is not None
    await box.remove()
    assert not (data_dir / "nspawn" / "boxes" / box.id).exists()
    assert mounts_below(data_dir / "nspawn" / "boxes" / box.id) == []


# -- hardening, from inside the box ------------------------------------------------------------------------
async def test_capabilities_seccomp_io_uring_mounts_network_and_limits(
    nspawn_factory: Callable[..., NspawnBackend],
) -> None:
    backend = nspawn_factory({"disk_size": "64m"}, memory=200 * 1024 * 1024, pids_limit=100)
    box = await backend.create()
    try:
        _, status, _ = await run(box, "grep -E '^(CapEff|CapBnd|CapPrm|Seccomp|NoNewPrivs):' /proc/self/status")
        fields = dict(line.split(":\t") for line in status.splitlines())
        want = sum(1 << bit for bit in CAP_BITS.values())
        assert int(fields["CapBnd"], 16) == want and int(fields["CapEff"], 16) == want, fields
        assert fields["Seccomp"] == "2", fields  # a filter on every process of the box

        probe = "import ctypes;l=ctypes.CDLL(None,use_errno=True);print(l.syscall(425,1,0),ctypes.get_errno())"
        _, uring, _ = await run(box, f'python3 -c "{probe}"')
        # io_uring_setup: ENOSYS (sandtrap's filter, seccomp.py), refused before the kernel sees it, as on Docker
        assert uring.split() == ["-1", "38"], uring
        probe = "import ctypes;l=ctypes.CDLL(None,use_errno=True);print(l.syscall(56,0x10000011,0,0,0,0),ctypes.get_errno())"
        _, newuser, _ = await run(box, f'python3 -c "{probe}"')
        assert newuser.split() == ["-1", "1"], newuser  # clone(CLONE_NEWUSER): EPERM

        code, _, err = await run(box, "mount -t tmpfs x /mnt")
        assert code != 0, err  # no CAP_SYS_ADMIN
        _, mounts, _ = await run(box, "cat /proc/self/mountinfo")
        assert "/run/host" not in mounts
        sources = {line.split(" - ")[1].split()[1] for line in mounts.splitlines()}
        assert not any(s.startswith("/dev/") and s not in ("/dev/pts",) for s in sources), sources  # no host disk

        _, links, _ = await run(box, "cat /proc/net/dev | tail -n +3 | cut -d: -f1")
        assert [x.strip() for x in links.split()] == ["lo"]
        _, routes, _ = await run(box, "tail -n +2 /proc/net/route")
        assert routes.strip() == ""

        # The box's own namespaces: not the host's.
        for ns in ("pid", "ipc", "uts", "net", "mnt"):
            assert os.readlink(f"/proc/{box.record.init_pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns

        # The limits on the box's parent cgroup, and the box's processes below it.
        assert backend.parents is not None
        parent = backend.parents.root / "memory" / backend.parents.prefix / box.id
        assert (parent / "memory.limit_in_bytes").read_text().strip() == str(200 * 1024 * 1024)
        pids = backend.parents.root / "pids" / backend.parents.prefix / box.id / "pids.max"
        assert pids.read_text().strip() == "100"
        assert f"memory:/{backend.parents.prefix}/{box.id}" in Path(f"/proc/{box.record.init_pid}/cgroup").read_text()

        # The disk bound: the upper directory is a tmpfs of sandbox.nspawn.disk_size; a full one is ENOSPC in the box.
        code, _, err = await run(box, "head -c 100M /dev/zero > /root/fill")
        assert code != 0 and "No space left" in err, err
    finally:
        await box.remove()
    assert mounts_below(box.directory) == []


async def test_a_login_gets_its_scope_its_connection_and_a_cgroup_root_of_its_own(
    nspawn_factory: Callable[..., NspawnBackend],
) -> None:
    box = await nspawn_factory().create()
    try:
        assert box.features.login_scopes and box.features.connection_in_box
        _, own, _ = await run(box, "cat /proc/1/cgroup")
        assert {line.split(":", 2)[2] for line in own.splitlines()} == {"/"}, own  # a private cgroup namespace
        login = Login(uid=0, session_id=7, client=ClientAddress("127.0.0.9", 40022, "127.0.0.1"))
        proc = await box.exec(
            ["sh", "-c", "sleep 1; cat /proc/self/cgroup; cat /proc/net/tcp"], env={"XDG_SESSION_ID": "7"}, login=login
        )
        await proc.close_stdin()
        out = (await read_all(proc))[STDOUT].decode()
        assert "name=systemd:/user.slice/user-0.slice/session-7.scope" in out, out
        assert "pids:/user.slice/user-0.slice/session-7.scope" in out, out
        # the login's connection: 127.0.0.9:40022 -> 127.0.0.1:22, established (state 01), both ends in the box
        assert "0900007F:9C56 0100007F:0016 01" in out.upper(), out
        assert await proc.wait() == ExitStatus(0)
    finally:
        await box.remove()


async def test_a_memory_hog_is_oom_killed_and_its_box_and_another_keep_working(
    nspawn_factory: Callable[..., NspawnBackend],
) -> None:
    backend = nspawn_factory(memory=128 * 1024 * 1024)
    hog_box, bystander = await backend.create(), await backend.create()
    try:
        hog = "python3 -c 'import itertools; hog = [b\"x\" * (16 << 20) for _ in itertools.count()]'"
        code, _, _ = await run(hog_box, hog)
        assert code == 137  # SIGKILL from the OOM killer
        assert backend.parents is not None
        memory = backend.parents.root / "memory" / backend.parents.prefix / hog_box.id
        assert int((memory / "memory.max_usage_in_bytes").read_text()) <= 128 * 1024 * 1024
        kills = 0  # counted in the victim's cgroup: summed over the box's cgroups
        for control in memory.rglob("memory.oom_control"):
            kills += sum(
                int(line.split()[1]) for line in control.read_text().splitlines() if line.startswith("oom_kill ")
            )
        assert kills >= 1
        assert await hog_box.is_running() and await bystander.is_running()
        assert (await run(hog_box, "echo still here"))[:2] == (0, "still here\n")
        assert (await run(bystander, "echo fine"))[:2] == (0, "fine\n")
    finally:
        await hog_box.remove()
        await bystander.remove()


async def test_what_the_box_shows_of_nspawn_and_the_host(nspawn_factory: Callable[..., NspawnBackend]) -> None:
    box = await nspawn_factory().create()
    try:
        _, environ, _ = await run(box, "tr '\\0' '\\n' < /proc/1/environ")
        assert "container" not in environ and "NOTIFY_SOCKET" not in environ, environ  # a kernel's environment
        assert "TERM=linux" in environ.splitlines()
        _, mounts, _ = await run(box, "cat /proc/mounts")
        for tell in ("sandtrap", "/run/host", str(box.directory), "nspawn"):
            assert tell not in mounts, (tell, mounts)
        assert mounts.startswith("overlay / overlay ")
        sizes = {line.split()[1]: line.split()[3] for line in mounts.splitlines()}
        assert "size=16384k" in sizes["/run"] and "size=65536k" in sizes["/dev/shm"]
        _, stat, _ = await run(box, "cat /proc/1/stat")
        assert stat.rsplit(")", 1)[1].split()[4] == "0"  # tty_nr: PID 1 has no terminal
        code, _, _ = await run(box, "test -e /dev/console")
        assert code != 0
        _, virt, _ = await run(box, "systemd-detect-virt --container")
        assert virt == "none\n"  # the named cgroup hierarchy's root files, as Docker's mask_cgroupns
        _, fqdn, _ = await run(box, "hostname -f; domainname")
        assert fqdn == "web-prod-03.corp.internal\ncorp.internal\n"  # init's /etc/hosts, from the UTS domain name
        assert not {"/etc/hosts", "/etc/resolv.conf"} & {c.path for c in await box.changed_files()}
        await run(box, "echo '192.0.2.1 update.example' >> /etc/hosts")
        assert ("/etc/hosts", "C") in {(c.path, c.kind) for c in await box.changed_files()}
    finally:
        await box.remove()


async def test_the_honeypot_killed_mid_session_leaves_its_box_preserved_and_the_next_start_leaks_nothing(
    nspawn_tree: Path, sensor: str, tmp_path: Path
) -> None:
    port = free_port()
    data_dir = tmp_path / "hp"
    config = write_config(
        tmp_path / "sandtrap.yaml",
        {
            "sensor": sensor,
            "ssh": {"listen": f"127.0.0.1:{port}", "host_key_dir": str(tmp_path / "hostkeys")},
            "api": {"listen": "127.0.0.1:0"},
            "auth": {"credentials": [{"username": "root", "password": "hunter2"}], "accept_all_after": 0},
            **nspawn_settings(data_dir),
        },
    )
    boxes = data_dir / "nspawn" / "boxes"
    try:
        async with sandtrap_run(config, tmp_path / "run-1.log") as first:
            async with tmux_session(ssh_argv(port, options=["-tt"]), width=100, height=30) as term:
                await term.wait_for(PROMPT, timeout_s=30)
                await term.line("echo alpha-$((3*4)) | tee /root/evidence")
                await term.wait_for(r"^alpha-12$")
                first.kill()
                async with asyncio.timeout(10):
                    assert await first.wait() == -signal.SIGKILL
        [active] = [s for s in map(state.load, boxes.iterdir()) if s is not None and s.session]
        assert state.is_alive(active.init_pid, active.init_start)  # the box outlived the honeypot

        async with sandtrap_run(config, tmp_path / "run-2.log"):
            listed = await sandtrap(config, "sessions", "list", "--json")
            rows = [json.loads(line) for line in listed.out.splitlines()]
            assert [r["close_reason"] for r in rows] == ["crash"], listed.out
            after = state.load(boxes / active.id)
            assert after is not None and after.state == "preserved"  # reconciled: stopped, kept for forensics
            assert not state.is_alive(active.init_pid, active.init_start)
            assert not state.is_alive(active.nspawn_pid, active.nspawn_start)
            assert (boxes / active.id / "disk" / "upper" / "root" / "evidence").read_text() == "alpha-12\n"
        # The second run's warm box went with it; only the preserved box is left, and it goes on remove.
        left = [s for s in map(state.load, boxes.iterdir()) if s is not None]
        assert [s.id for s in left] == [active.id]
    finally:
        await remove_nspawn_boxes(data_dir / "nspawn")
    assert mounts_below(data_dir) == []
    assert not any(f"--machine=sandtrap-{sensor}" in _cmdline(p) for p in os.listdir("/proc") if p.isdigit())


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


async def test_a_box_whose_pid_1_was_never_recorded_still_goes_with_its_cgroup(
    nspawn_factory: Callable[..., NspawnBackend],
) -> None:
    """A create cancelled between nspawn's start and finding the box's PID 1: killing nspawn alone would leave the
    box running, orphaned; the box's cgroup finds it."""
    backend = nspawn_factory()
    box = await backend.create()
    init_pid, init_start = box.record.init_pid, box.record.init_start
    box.record.init_pid = box.record.init_start = 0  # as if never found
    os.kill(box.record.nspawn_pid, signal.SIGKILL)  # what a cancelled create did before: the box lives on
    async with asyncio.timeout(10):
        while state.is_alive(box.record.nspawn_pid, box.record.nspawn_start):
            await asyncio.sleep(0.05)
    assert state.is_alive(init_pid, init_start)
    await box.remove()
    assert not state.is_alive(init_pid, init_start)
    assert backend.parents is not None
    assert not (backend.parents.root / "pids" / backend.parents.prefix / box.id).exists()
    assert mounts_below(box.directory) == []


async def test_namespaces_mounts_and_keyrings_are_refused_as_on_docker(
    nspawn_factory: Callable[..., NspawnBackend],
) -> None:
    box = await nspawn_factory().create()
    try:
        for flags in ("-U", "-m", "-n", "-p", "-r"):
            code, _, err = await run(box, f"unshare {flags} id")
            assert code == 1 and "unshare failed: Operation not permitted" in err, (flags, err)
        probe = (
            "import ctypes,os;l=ctypes.CDLL(None,use_errno=True)\n"
            "for name,nr,args in (('setns',308,(os.open('/proc/1/ns/mnt',0),0)),('keyctl',250,(0,0)),"
            "('bpf',321,(0,0,0)),('mount',165,(0,0,0,0,0))):\n"
            " print(name,l.syscall(nr,*args),ctypes.get_errno())"
        )
        _, out, _ = await run(box, f'python3 -c "{probe}"')
        assert out.split("\n")[:4] == ["setns -1 1", "keyctl -1 1", "bpf -1 1", "mount -1 1"], out
        _, whoami, _ = await run(box, "sh -c 'sleep 0 & wait; id -u'")  # fork and exec still work
        assert whoami == "0\n"
    finally:
        await box.remove()
