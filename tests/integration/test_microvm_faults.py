"""The micro-VM backend under attack and when a VM dies, through the real honeypot on 127.0.0.1.

One honeypot (``sandbox.backend: microvm``, a pool of 2 VMs under TCG here) serves the whole module; each test is
one attacker session, so VMs are booted once per session and the faults share the pool's refills:

- the hardening of a VM (its cgroup, QEMU's view of the host's files) and the escape battery run in the guest, a
  console flood, 100 channels on one connection and a disk filler, in one session;
- a VM that dies under its session: a guest kernel panic, QEMU killed, QEMU out of memory at its cgroup's limit,
  a guest that stops answering (QEMU stopped). Each ends its session in bounded time with the reason recorded
  (``sandbox_failed: ...``) and the cast and events whole.

The VM's isolation is shown by inspection only: its namespace's links, routes and listening sockets, the guest's
devices and mounts, QEMU's open files and root. The only packets sent go to loopback addresses (the honeypot's,
and the guest's own), never to the VM's gateway or anywhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import pytest
import pytest_asyncio
from test_escape import SYSCALL_PROBE

from sandtrap.app import running
from sandtrap.config import Settings, merge
from sandtrap.events import COMMAND_INPUT, LOG_CLOSED, SANDBOX_ASSIGNED, SESSION_CLOSED, SESSION_CONNECT, CaptureSink
from sandtrap.sandbox.microvm import qemu
from sandtrap.sandbox.microvm.backend import MicroVMBackend
from sandtrap.sandbox.microvm.limits import PREFIX, VMCgroups, vm_limits
from sandtrap.sandbox.microvm.sandbox import MicroVMSandbox

from sandtrap_fixtures import Honeypot

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "microvm-test"  # as test_microvm.py: the same access key, so the same cached image
OUTPUT = ROOT / "test-output"
CGROUPS = Path("/sys/fs/cgroup")
CONSOLE_MAX = 256 * 1024
MiB = 1024 * 1024

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1800),
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(os.geteuid() != 0, reason="a VM's network namespace, tap and cgroups need root"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="apt-get install qemu-system-x86"),
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def hp() -> AsyncIterator[Honeypot]:
    overrides: dict[str, Any] = {
        "sensor": f"test-vm-{secrets.token_hex(4)}",  # its own capture gateway namespace
        "storage": {"data_dir": str(DATA)},
        "image": {"cache_dir": str(ROOT / "data" / "cache")},
        "ssh": {"listen": "127.0.0.1:0"},
        "api": {"listen": "127.0.0.1:0"},
        "sandbox": {
            "backend": "microvm",
            "affinity": "session",  # a VM per connection, released when it closes (source_ip holds it ip_ttl_s)
            "pool_size": int(os.environ.get("SANDTRAP_TEST_VM_POOL", "2")),
            "microvm": {
                "memory": "512m",
                "vcpus": 1,
                "console_log_max": CONSOLE_MAX,
                "unresponsive_s": 10,
                "boot_timeout_s": 900,
            },
        },
        "auth": {
            "credentials": [{"username": "root", "password": "hunter2"}],
            "accept_all_after": 0,
            "failure_delay_s": 0,
            "success_delay_s": 0,
        },
    }
    settings = Settings.model_validate(merge({}, overrides))
    capture = CaptureSink()
    async with running(settings, sinks=[capture]) as services:
        yield Honeypot(settings, services, capture)
    for directory in (DATA / "microvm" / "vms").iterdir():  # released VMs are kept for forensics: not here
        shutil.rmtree(directory, ignore_errors=True)


# -- the attacker's side --------------------------------------------------------------------------------------
def options() -> dict[str, Any]:
    return {
        "known_hosts": None,
        "username": "root",
        "password": "hunter2",
        "client_keys": None,
        "agent_path": None,
        "config": [],
        "preferred_auth": "password",
        "login_timeout": 900,
    }


@contextlib.asynccontextmanager
async def login(hp: Honeypot) -> AsyncIterator[asyncssh.SSHClientConnection]:
    async with asyncio.timeout(900):  # the pool's VM may still be booting under TCG (minutes on a busy host)
        conn = await asyncssh.connect("127.0.0.1", hp.port, **options())
    try:
        yield conn
    finally:
        conn.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(30):
                await conn.wait_closed()


async def sh(conn: asyncssh.SSHClientConnection, cmd: str, timeout_s: int = 60, stdin: str | None = None) -> Any:
    async with asyncio.timeout(timeout_s + 60):
        return await conn.run(f"timeout -k 2 {timeout_s} bash -c {shlex.quote(cmd)}", input=stdin, check=False)


async def session_of(hp: Honeypot, conn: asyncssh.SSHClientConnection) -> str:
    port = conn.get_extra_info("sockname")[1]
    return str((await hp.wait_for(SESSION_CONNECT, src_port=port, timeout_s=60))[0].session)


async def vm_of(hp: Honeypot, session: str) -> MicroVMSandbox:
    [assigned] = await hp.wait_for(SANDBOX_ASSIGNED, session=session, timeout_s=900)
    backend = hp.services.backend
    assert isinstance(backend, MicroVMBackend)
    return backend.sandbox(str(assigned.get("sandbox_id")), str(assigned.get("sandbox_name")))


async def host(*argv: str) -> str:
    """A command on the host (inspection only)."""
    done = await asyncio.to_thread(subprocess.run, list(argv), capture_output=True, text=True, check=True)
    return done.stdout


def cgroup_dirs(name: str) -> list[Path]:
    return [CGROUPS / c / PREFIX / name for c in ("memory", "pids", "cpu") if (CGROUPS / c / PREFIX / name).is_dir()]


@dataclass
class Row:
    attempt: str
    outcome: str
    how: str


BATTERY: list[Row] = []


def write_battery() -> str:
    width = max(len(r.attempt) for r in BATTERY)
    lines = [f"escape battery in the guest (microvm): {len(BATTERY)} attempts over SSH through the honeypot"]
    lines += [f"  {r.attempt:<{width}}  {r.outcome:<10} {r.how}" for r in BATTERY]
    text = "\n".join(lines)
    OUTPUT.mkdir(exist_ok=True)
    (OUTPUT / "escape-battery-microvm.txt").write_text(text + "\n", encoding="utf-8")
    return text


# -- 1. a VM's bounds, and the escape battery in the guest ----------------------------------------------------
async def test_vm_is_bounded_and_the_guest_reaches_neither_host_files_nor_network(hp: Honeypot) -> None:
    settings = hp.settings.sandbox.microvm
    async with login(hp) as conn:
        session = await session_of(hp, conn)
        vm = await vm_of(hp, session)
        pid = vm.record.pid

        # The cgroup: QEMU (and only QEMU) in each hierarchy, the limits read back.
        dirs = cgroup_dirs(vm.name)
        assert [d.parts[-3] for d in dirs] == ["memory", "pids", "cpu"], dirs
        for d in dirs:
            assert (d / "cgroup.procs").read_text().split() == [str(pid)], d
        mem_limit = int((dirs[0] / "memory.limit_in_bytes").read_text())
        want = settings.memory + settings.tcg_cache + settings.memory_overhead
        assert want - 4096 < mem_limit <= want
        assert (dirs[1] / "pids.max").read_text().strip() == str(settings.pids_max)
        assert (dirs[2] / "cpu.cfs_quota_us").read_text().strip() == str(100_000 * settings.vcpus)
        BATTERY.append(Row("QEMU's resources", "bounded",
                           f"cgroup {PREFIX}/{vm.name}: memory {mem_limit // MiB} MiB (RAM + TCG cache + overhead), "
                           f"pids {settings.pids_max}, cpu {settings.vcpus} CPU"))  # fmt: skip

        # QEMU: unprivileged, filtered, chrooted into an empty directory; its only files the overlay and the base.
        status = Path(f"/proc/{pid}/status").read_text()
        fields = {ln.split(":")[0]: ln.split(":", 1)[1].split() for ln in status.splitlines() if ":" in ln}
        assert fields["Uid"][0] != "0" and fields["CapEff"] == ["0000000000000000"] and fields["Seccomp"] == ["2"]
        root = os.readlink(f"/proc/{pid}/root")
        assert root == str(vm.directory / "chroot") and os.listdir(root) == [], root
        st = os.stat(root)
        assert st.st_uid == 0 and st.st_mode & 0o777 == 0o555
        files = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("/") and not target.startswith("/dev/"):
                    files.add(target)
        image = Path(vm.record.image)
        allowed = {
            os.path.realpath(p) for p in (vm.directory / "disk.qcow2", image / "disk.qcow2", vm.directory / "qemu.log")
        }
        if vm.restored_from:  # its overlay's backing file is the template's disk (itself on the image's base)
            allowed.add(os.path.realpath(Path(vm.restored_from) / "disk.qcow2"))
        allowed.add("/memfd:memory-backend-memfd (deleted)")  # the guest's RAM, shared with virtiofsd (the lure)
        assert files <= allowed and os.path.realpath(vm.directory / "disk.qcow2") in files, files - allowed
        BATTERY.append(Row("QEMU's view of the host's files", "contained",
                           f"uid {fields['Uid'][0]}, no capabilities, seccomp 2, root = an empty root-owned 0555 "
                           f"directory (-chroot); open files: its overlay, the base, qemu.log only"))  # fmt: skip

        # In the guest: root of its own kernel. What root can do stays in the VM.
        uname = str((await sh(conn, "uname -r")).stdout).strip()
        assert uname != os.uname().release
        # test_escape's probe, with setns() given the caller's own namespace (root in the guest may not open pid
        # 1's: the guest's sshd runs sandboxed by systemd).
        probe_src = SYSCALL_PROBE.replace('"/proc/1/ns/mnt"', '"/proc/self/ns/mnt"')
        r = await sh(conn, "python3 -", stdin=probe_src)
        assert r.exit_status == 0, r.stderr
        probe = json.loads(str(r.stdout))
        allowed_calls = sorted(k for k, v in probe.items() if v == "OK")
        BATTERY.append(Row("kernel-facing syscalls (mount, unshare, modules, raw sockets, ...)", "contained",
                           f"{len(allowed_calls)}/{len(probe)} succeed, on the guest's own kernel {uname} "
                           f"(host: {os.uname().release})"))  # fmt: skip

        devices = str((await sh(conn, "lsblk -dn -o NAME,TYPE; cat /proc/partitions")).stdout)
        assert devices.split()[:2] == ["vda", "disk"] and "sda" not in devices and "nvme" not in devices, devices
        mounts = str((await sh(conn, "cat /proc/mounts")).stdout)
        shared = [ln for ln in mounts.splitlines() if ln.split()[2] in {"9p", "virtiofs", "nfs", "nfs4", "cifs"}]
        assert all(",".join(ln.split()[3:4]).startswith("ro") for ln in shared), shared  # a lure share is read-only
        pci = str((await sh(conn, "cat /sys/bus/pci/devices/*/uevent | grep ^DRIVER= | sort | uniq -c")).stdout)
        assert "9pnet" not in pci and "ivshmem" not in pci, pci
        BATTERY.append(Row("host files from the guest (disks, shares, devices)", "contained",
                           f"one disk (vda: its own overlay), shared file systems: {len(shared)} (read-only), "
                           f"PCI drivers: {' '.join(pci.split()[1::2])}"))  # fmt: skip

        r = await sh(conn, "modprobe -v dummy && ip link add d0 type dummy && ip -o link show d0; "
                     "mount -t tmpfs none /mnt && echo mounted; echo 1 > /proc/sys/net/ipv4/ip_forward; echo fwd")  # fmt: skip
        host_links = await host("ip", "-o", "link")
        assert "mounted" in str(r.stdout) and " d0" not in host_links
        BATTERY.append(Row("module load, new links, mounts, ip_forward in the guest", "contained",
                           "all succeed inside the guest; the host has no such link, its mounts are unchanged"))  # fmt: skip

        r = await sh(conn, f"exec 3<>/dev/tcp/127.0.0.1/{hp.port} && echo OPEN || echo refused")
        assert "refused" in str(r.stdout), r
        r = await sh(conn, "ls /var/run/docker.sock /run/docker.sock 2>&1; cat /proc/net/unix | grep -c docker")
        assert str(r.stdout).count("No such file") == 2
        BATTERY.append(Row("the honeypot's port and the Docker socket", "refused",
                           f"127.0.0.1:{hp.port} in the guest is the guest's own loopback: refused; no docker.sock"))  # fmt: skip

        # The VM's namespace, inspected from the host: lo and the tap, no listener, no route out, no forwarding.
        def ns(*argv: str) -> str:
            done = subprocess.run(["nsenter", "-t", str(pid), "-n", *argv], capture_output=True, text=True, check=True)
            return done.stdout

        links = sorted(ln.split(":")[1].strip() for ln in ns("ip", "-o", "link").splitlines())
        routes = ns("ip", "route", "show", "table", "all")
        listening = ns("ss", "-Hltnup")
        # "local default dev lo": the capture gateway's catch-all (network/vmtap.py), answered here, not a route out
        out_routes = [r for r in routes.splitlines() if r.startswith("default") or " via " in r]
        assert links == ["lo", "tap0"] and not out_routes, (links, routes)
        # What listens there is the capture gateway's (this process: the honeypot), nothing else
        others = [ln for ln in listening.splitlines() if ln.strip() and f"pid={os.getpid()}," not in ln]
        assert others == [], listening
        assert ns("cat", "/proc/sys/net/ipv4/ip_forward").strip() == "0"
        assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
        BATTERY.append(Row("the host's network from the guest", "contained",
                           "its gateway is the tap's far side in the VM's own namespace: links lo+tap0, no default "
                           "route, nothing listening, forwarding off (inspected, no packet sent)"))  # fmt: skip
        print("\n" + write_battery())
        assert all(row.outcome in ("bounded", "contained", "refused") for row in BATTERY)

        # A console flood: the guest writes to its serial port as fast as it can; the log stops at its cap and the
        # session answers meanwhile.
        flood = asyncio.create_task(sh(conn, "yes 'console flood console flood' > /dev/ttyS0", timeout_s=20))
        await asyncio.sleep(5)
        t0 = time.monotonic()
        during = await sh(conn, "echo answered-$((6*7))")
        answered_s = time.monotonic() - t0
        await flood
        assert str(during.stdout) == "answered-42\n"
        console = vm.directory / "console.log"
        assert console.stat().st_size <= CONSOLE_MAX, console.stat().st_size

        # A disk filler fills its own overlay, up to the disk's fixed virtual size, and no further.
        t0 = time.monotonic()
        fill = await sh(conn, "dd if=/dev/zero of=/root/fill bs=4M oflag=direct status=none; sync; df -B1 / | tail -1",
                        timeout_s=600)  # fmt: skip
        fill_s = time.monotonic() - t0
        assert "No space left on device" in str(fill.stderr), fill.stderr
        info = json.loads(await host("qemu-img", "info", "-U", "--output=json", str(vm.directory / "disk.qcow2")))
        virtual, actual = info["virtual-size"], info["actual-size"]
        assert virtual == settings.disk_size and actual <= virtual, (virtual, actual)

        # 100 channels on one connection, all at once: each answers or is refused; none hangs, the session goes on.
        async def channel(i: int) -> str:
            try:
                async with asyncio.timeout(240):
                    r = await conn.run(f"echo ch-{i}", check=False)
                return "ok" if str(r.stdout) == f"ch-{i}\n" else f"status {r.exit_status} {r.stderr!r:.60}"
            except asyncssh.ChannelOpenError as exc:
                return f"refused: {exc.reason}"
            except TimeoutError:
                return "HUNG"

        t0 = time.monotonic()
        outcomes = await asyncio.gather(*(channel(i) for i in range(100)))
        channels_s = time.monotonic() - t0
        counts = {o: outcomes.count(o) for o in sorted(set(outcomes))}
        assert "HUNG" not in counts, counts  # each ended
        # ssh.max_sessions (OpenSSH's MaxSessions, 10): the rest refused as sshd refuses them, the connection goes on
        assert counts.get("ok", 0) >= 10 and set(counts) <= {"ok", "refused: open failed"}, counts
        try:
            after = str((await sh(conn, "echo still-$((6*7))")).stdout).strip()
        except (asyncssh.Error, OSError) as exc:
            after = f"{type(exc).__name__}: {exc}"

    [closed] = await hp.wait_for(SESSION_CLOSED, session=session, timeout_s=120)
    assert after == "still-42" and closed.get("reason") == "client_closed", (after, closed)
    casts = [
        (hp.settings.data_dir / str(e.get("ttylog"))).read_text("utf-8") for e in hp.events(LOG_CLOSED, session=session)
    ]
    assert any("answered-42" in cast for cast in casts), len(casts)  # the record survived the flood and the channels
    dropped = console.read_bytes()[-200:]
    print(
        f"[microvm] console flood: log held at {console.stat().st_size} bytes (cap {CONSOLE_MAX}), "
        f"{dropped.decode(errors='replace').strip().splitlines()[-1]!r}; an exec during it answered in "
        f"{answered_s:.1f}s\n"
        f"[microvm] 100 channels at once on one connection: {counts} in {channels_s:.0f}s; then {after!r}; the "
        f"session closed as {closed.get('reason')!r}\n"
        f"[microvm] disk filler: ENOSPC after {fill_s:.0f}s; overlay {actual / MiB:.0f} MiB on the host, virtual "
        f"size {virtual / MiB:.0f} MiB; guest df: {str(fill.stdout).split()[1:4]}"
    )
    # Released: stopped, its cgroups gone, its overlay kept.
    async with asyncio.timeout(60):
        while cgroup_dirs(vm.name) or qemu.is_alive(pid, vm.name):
            await asyncio.sleep(0.5)
    assert (vm.directory / "disk.qcow2").exists()
    assert b"more bytes of console output dropped" in console.read_bytes()[-200:]  # noted when the copy ended


# -- 2. a VM that dies under its session ----------------------------------------------------------------------
@dataclass
class Death:
    session: str
    vm: MicroVMSandbox
    ended_s: float
    client_saw: str
    closed: Any


async def die(hp: Honeypot, kill: Any, timeout_s: float = 90.0) -> Death:
    """An interactive shell, a command, then ``kill(vm, channel)``; how the session ended."""
    async with login(hp) as conn:
        session = await session_of(hp, conn)
        vm = await vm_of(hp, session)
        shell = await conn.create_process(term_type="xterm", term_size=(100, 30))
        shell.stdin.write("echo before-$((6*7))\n")
        async with asyncio.timeout(900):  # the shell comes when the pool has a warm VM
            while "before-42" not in (await shell.stdout.readline()):
                pass
        t0 = time.monotonic()
        await kill(vm, shell)
        try:
            async with asyncio.timeout(timeout_s):
                await shell.wait_closed()
                [closed] = await hp.wait_for(SESSION_CLOSED, session=session, timeout_s=timeout_s)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(vm.record.pid, signal.SIGCONT)
        ended_s = time.monotonic() - t0
        saw = f"exit-status {shell.exit_status}" if shell.exit_signal is None else f"exit-signal {shell.exit_signal}"
    return Death(session, vm, ended_s, saw, closed)


def check_record(hp: Honeypot, death: Death, reason: str) -> None:
    got = str(death.closed.get("reason"))
    assert got.startswith("sandbox_failed: ") and reason in got, got
    inputs = [e.get("input") for e in hp.events(COMMAND_INPUT, session=death.session)]
    assert "echo before-$((6*7))" in inputs, inputs
    [log_closed] = hp.events(LOG_CLOSED, session=death.session)
    cast = (hp.settings.data_dir / str(log_closed.get("ttylog"))).read_text(encoding="utf-8")
    assert "before-42" in cast
    assert not qemu.is_alive(death.vm.record.pid, death.vm.name)
    print(f"\n[microvm] {reason}: session ended {death.ended_s:.1f}s after, client saw {death.client_saw}, "
          f"recorded {got!r}")  # fmt: skip


async def test_guest_kernel_panic_ends_the_session_with_the_reason(hp: Honeypot) -> None:
    async def panic(vm: MicroVMSandbox, shell: Any) -> None:
        shell.stdin.write("echo c > /proc/sysrq-trigger\n")

    death = await die(hp, panic)
    check_record(hp, death, "guest kernel panic")
    assert "Kernel panic" in (death.vm.directory / "console.log").read_text(errors="replace")


async def test_qemu_killed_ends_the_session_with_the_reason(hp: Honeypot) -> None:
    async def kill(vm: MicroVMSandbox, shell: Any) -> None:
        os.kill(vm.record.pid, signal.SIGKILL)

    check_record(hp, await die(hp, kill), "QEMU killed by SIGKILL")


async def test_qemu_out_of_memory_ends_the_session_with_the_reason(hp: Honeypot) -> None:
    async def starve(vm: MicroVMSandbox, shell: Any) -> None:
        # The guest's RAM is a memfd QEMU holds whole once the guest has touched it (at boot, its page cache):
        # a limit above what it holds is never reached. A hog that the guest frees at once hands large free
        # blocks back (free-page reporting punches them out of the memfd); once that has settled, a limit just
        # above what QEMU still holds (its own memory and the memfd's pages: no swap here, nothing reclaimable)
        # is passed when the same hog makes the guest touch those pages again.
        memory = CGROUPS / "memory" / PREFIX / vm.name

        def held() -> int:
            stat = dict(line.split() for line in (memory / "memory.stat").read_text().splitlines())
            return int(stat["total_rss"]) + int(stat["total_shmem"])

        hog = "python3 -c 'b = bytearray(300 << 20); b[::4096] = bytes([1]) * len(b[::4096])'"
        shell.stdin.write(f"{hog}; echo freed-$((6*7))\n")
        async with asyncio.timeout(120):
            while "freed-42" not in (await shell.stdout.readline()):
                pass
            before, now = held() + 1, held()
            while now < before:  # until the reports stop
                await asyncio.sleep(3)
                before, now = now, held()
        (memory / "memory.limit_in_bytes").write_text(str(now + 32 * MiB))
        shell.stdin.write(hog + "\n")

    death = await die(hp, starve)
    check_record(hp, death, "QEMU out of memory")


async def test_guest_that_stops_answering_ends_the_session_with_the_reason(hp: Honeypot) -> None:
    async def stop(vm: MicroVMSandbox, shell: Any) -> None:
        os.kill(vm.record.pid, signal.SIGSTOP)

    death = await die(hp, stop)
    check_record(hp, death, "guest stopped answering")
    assert death.ended_s < hp.settings.sandbox.microvm.unresponsive_s + 60


async def test_reconciliation_removes_the_cgroups_of_vms_that_no_longer_run(hp: Honeypot) -> None:
    backend = hp.services.backend
    assert isinstance(backend, MicroVMBackend)
    stopped = [i for i in await backend.list_managed() if i.state == "preserved"]
    assert stopped, "the faults above left stopped VMs"
    cgroups = VMCgroups()
    cgroups.create(stopped[0].name, vm_limits(hp.settings.sandbox.microvm, tcg=True))  # as left by a crash
    assert cgroup_dirs(stopped[0].name)
    await backend.list_managed()
    assert not cgroup_dirs(stopped[0].name)
    running_vms = [i for i in await backend.list_managed() if i.state != "preserved"]
    for info in running_vms:
        assert cgroup_dirs(info.name), info.name
