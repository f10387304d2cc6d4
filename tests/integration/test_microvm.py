"""The micro-VM backend on this machine: build (or reuse) the image, boot one VM under whatever the probe picks
(TCG here), and look at it from inside and from outside.

Isolation is proven by inspection only (interfaces, routes, rules, the packet filter, forwarding in the VM's
namespace and in the guest); no packet is sent anywhere but to the guest's own sshd inside that namespace.
Figures ("[microvm] ...") are printed at the end of the run.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from rich.console import Console

from sandtrap.app import build_backend, cache_dir, running, vm_planted_files
from sandtrap.config import Settings, merge
from sandtrap.sandbox.base import STDOUT, TermSize, run
from sandtrap.sandbox.microvm import qemu, virtiofs
from sandtrap.sandbox.microvm.backend import MicroVMBackend, access_key_path, guest_files
from sandtrap.sandbox.microvm.guest import load_access_key
from sandtrap.sandbox.microvm.image import VMImage, build_vm_image
from sandtrap.sandbox.microvm.sandbox import MicroVMSandbox

ROOT = Path(__file__).resolve().parents[2]
# A data dir kept between runs (its access key and host keys key the image, which is reused while unchanged);
# the VMs' own state directories are removed by the test.
DATA = ROOT / "data" / "microvm-test"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1500),
    pytest.mark.skipif(os.geteuid() != 0, reason="a VM's network namespace and tap need root"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="apt-get install qemu-system-x86"),
    pytest.mark.skipif(shutil.which("qemu-img") is None, reason="apt-get install qemu-utils"),
]


def _settings(overrides: dict[str, Any] | None = None) -> Settings:
    base: dict[str, Any] = {
        "storage": {"data_dir": str(DATA)},
        "image": {"cache_dir": str(ROOT / "data" / "cache")},
        "sandbox": {"backend": "microvm", "microvm": {"memory": "512m", "vcpus": 1}},
    }
    return Settings.model_validate(merge(base, overrides or {}))


def _ns(pid: int, *argv: str) -> str:
    """A command run in the VM's network namespace (inspection only: ip, iptables, sysctl)."""
    out = subprocess.run(["nsenter", "-t", str(pid), "-n", *argv], capture_output=True, text=True, check=False)
    return out.stdout + out.stderr


def _host(*argv: str) -> str:
    return subprocess.run(list(argv), capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def vm_image() -> tuple[VMImage, float, bool]:
    settings = _settings()
    key = load_access_key(access_key_path(settings.data_dir / "microvm"))
    guest = guest_files(settings.sandbox, key, vm_planted_files(settings))
    t0 = time.monotonic()
    image, built = asyncio.run(build_vm_image(settings.image, guest, cache_dir(settings), console=Console(quiet=True)))
    return image, time.monotonic() - t0, built


@pytest.fixture
async def vm(vm_image: tuple[VMImage, float, bool]) -> AsyncIterator[tuple[MicroVMBackend, MicroVMSandbox]]:
    backend = build_backend(_settings())
    assert isinstance(backend, MicroVMBackend)
    sandbox = await backend.create()
    try:
        yield backend, sandbox
    finally:
        await sandbox.remove()
        await backend.close()


async def test_vm_boots_its_own_kernel_in_a_network_with_no_way_out(
    vm_image: tuple[VMImage, float, bool], vm: tuple[MicroVMBackend, MicroVMSandbox]
) -> None:
    image, build_s, built = vm_image
    backend, box = vm
    pid = box.record.pid
    print(f"[microvm] image {image.directory.name}: {'built' if built else 'reused'} in {build_s:.0f}s")
    print(f"[microvm] accel {backend.accel.name} ({backend.accel.reason})")
    how = "restored from the template" if box.restored_from else "cold boot"
    print(f"[microvm] {how} to sshd ready: {box.boot_s:.1f}s; baseline listing {box.baseline_s:.1f}s")

    # QEMU itself: the unprivileged user, no capabilities, its syscall filter on.
    status = Path(f"/proc/{pid}/status").read_text()
    fields = {ln.split(":")[0]: ln.split(":", 1)[1].split() for ln in status.splitlines() if ":" in ln}
    assert fields["Uid"][0] != "0" and fields["CapEff"] == ["0000000000000000"] and fields["Seccomp"] == ["2"], fields

    # The guest's own Debian kernel, and its modules directory.
    uname = await run(box, ["uname", "-a"])
    assert uname.ok, uname
    text = uname.stdout.decode()
    assert f" {image.release} " in text and "Debian" in text and os.uname().release not in text
    modules = await run(box, ["sh", "-c", 'test -d "/lib/modules/$(uname -r)/kernel" && echo yes'])
    assert modules.stdout == b"yes\n"
    ident = await run(box, ["sh", "-c", "hostname; cat /etc/machine-id; cat /proc/1/comm; systemd-detect-virt"])
    hostname, machine_id, init, virt = ident.stdout.decode().split("\n")[:4]
    assert hostname == "web-prod-03" and len(machine_id) == 32 and init == "systemd", ident
    assert machine_id == box.record.machine_uuid.replace("-", ""), "machine-id comes from the VM's own -uuid"
    print(f"[microvm] guest: {text.strip()}; virt {virt}")

    # The guest: eth0 with its address, a default route to the host side of its tap; nothing else.
    addr = (await run(box, ["ip", "-o", "-4", "addr", "show"])).stdout.decode()
    assert " eth0 " in addr and "inet 10.20.1.13/24" in addr, addr
    links = (await run(box, ["ls", "/sys/class/net"])).stdout.decode().split()
    assert sorted(links) == ["eth0", "lo"]
    routes = (await run(box, ["ip", "route"])).stdout.decode()
    assert routes.startswith("default via 10.20.1.1 dev eth0"), routes

    # The VM's namespace (QEMU's): lo and the tap, one connected route, no default, no rules, no forwarding.
    assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    ns_links = _ns(pid, "ip", "-o", "link", "show")
    assert sorted(line.split(":")[1].strip() for line in ns_links.splitlines()) == ["lo", "tap0"], ns_links
    ns_routes = _ns(pid, "ip", "route", "show", "table", "all")
    assert "default" not in ns_routes and "10.20.1.0/24 dev tap0 proto kernel scope link src 10.20.1.1" in ns_routes
    assert "via" not in ns_routes, ns_routes
    ns_rules = _ns(pid, "ip", "rule", "show")
    assert len(ns_rules.strip().splitlines()) == 3, ns_rules  # local, main, default: nothing added
    assert _ns(pid, "cat", "/proc/sys/net/ipv4/ip_forward").strip() == "0"
    if shutil.which("iptables-save"):
        rules = [ln for ln in _ns(pid, "iptables-save").splitlines() if ln.startswith("-A")]
        assert rules == [], rules  # no NAT, no forwarding rules
    # The host's own namespace has no tap of ours.
    assert "tap0" not in _host("ip", "-o", "link")

    # exec: a pty, exit codes and signals, env, user and working directory.
    proc = await box.exec(["tty"], tty=TermSize(80, 24))
    out = b""
    while (chunk := await proc.read()) is not None:
        out += chunk.data
    assert out.startswith(b"/dev/pts/") and (await proc.wait()).code == 0
    assert (await run(box, ["sh", "-c", "exit 3"])).status.code == 3
    killed = await run(box, ["sh", "-c", "kill -TERM $$"])
    assert killed.status.signal == "TERM", killed
    proc = await box.exec(["sh", "-c", 'echo "$GREETING"; id -un; pwd'], env={"GREETING": "hi there"},
                          user="admin", workdir="/tmp")  # fmt: skip
    lines = b""
    while (chunk := await proc.read()) is not None:
        assert chunk.stream == STDOUT
        lines += chunk.data
    assert lines == b"hi there\nadmin\n/tmp\n"

    # Files: put, get, and the change against the warm baseline.
    await box.put_file("/root/notes.bin", bytes(range(256)) * 4, 0o640, 1_600_000_000.0)
    got = await box.get_file("/root/notes.bin", 4096)
    assert got is not None and got.data == bytes(range(256)) * 4 and got.mode == 0o640
    assert await box.get_file("/root/absent", 10) is None
    changed = {c.path: c.kind for c in await box.changed_files()}
    assert changed.get("/root/notes.bin") == "A"

    boot = (await run(box, ["systemd-analyze"])).stdout.decode().splitlines()
    print(f"[microvm] guest {boot[0] if boot else '?'}")
    await asyncio.sleep(5)  # idle
    rss = _status_kib(pid, "VmRSS")
    pss = _rollup_kib(pid, "Pss")
    print(
        f"[microvm] QEMU of an idle VM (memory 512m, tcg_cache 128m): RSS {rss / 1024:.0f} MiB, PSS {pss / 1024:.0f} MiB"
    )

    # A restarted honeypot finds it (list_managed), and a QEMU no state directory accounts for is killed.
    again = build_backend(_settings())
    assert [(i.id, i.state) for i in await again.list_managed()] == [(box.id, "warm")]
    (box.directory / "vm.json").rename(box.directory / "vm.json.hidden")
    assert await again.list_managed() == []
    assert not qemu.is_alive(pid, box.name), "the orphan QEMU was killed"
    (box.directory / "vm.json.hidden").rename(box.directory / "vm.json")
    assert [(i.id, i.state) for i in await again.list_managed()] == [(box.id, "preserved")]
    await again.close()

    # Stop keeps the overlay; twice is harmless; remove deletes it (the fixture removes again: harmless).
    await box.stop()
    await box.stop()
    assert not await box.is_running() and (box.directory / "disk.qcow2").exists()
    await box.remove()
    await box.remove()
    assert not box.directory.exists()
    assert await backend.list_managed() == []
    assert not [n for n in qemu.find_qemus("sandtrap-vm-") if n == box.name]


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _rollup_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


async def test_honeypot_serves_a_login_into_a_vm(vm_image: tuple[VMImage, float, bool]) -> None:
    """ssh/ and bridge/ unchanged: an attacker's password login, an exec and a pty shell reach a VM."""
    overrides: dict[str, Any] = {
        "sensor": f"vmtest-{secrets.token_hex(3)}",  # a capture gateway namespace of its own (checkouts run at once)
        "ssh": {"listen": "127.0.0.1:0"},
        "api": {"listen": "127.0.0.1:0"},
        "sandbox": {"pool_size": 1},
        "auth": {
            "credentials": [{"username": "root", "password": "hunter2"}],
            "accept_all_after": 0,
            "failure_delay_s": 0,
            "success_delay_s": 0,
        },
    }
    settings = _settings(overrides)
    t0 = time.monotonic()
    async with running(settings) as services:
        warm_s = time.monotonic() - t0
        port = services.ssh.port
        async with asyncssh.connect("127.0.0.1", port, username="root", password="hunter2", known_hosts=None) as client:
            t1 = time.monotonic()
            result = await client.run("uname -r; ls -d /lib/modules/$(uname -r)", timeout=120)
            exec_s = time.monotonic() - t1
            assert result.exit_status == 0
            release = str(result.stdout).split()[0]
            assert release == vm_image[0].release
            proc = await client.create_process(term_type="xterm", term_size=(80, 24))
            proc.stdin.write("tty; exit 7\n")
            out = await asyncio.wait_for(proc.stdout.read(), 120)
            await proc.wait_closed()
            assert proc.exit_status == 7 and "/dev/pts/" in str(out)
    print(f"[microvm] honeypot: pool of 1 warm in {warm_s:.0f}s; login + exec answered in {exec_s:.1f}s")
    for directory in (DATA / "microvm" / "vms").iterdir():  # released VMs are kept for forensics: not here
        await virtiofs.cleanup(directory)  # a refill cut short by the honeypot's stop may leave its lure share
        shutil.rmtree(directory)
    left = [n for n, pid in qemu.find_qemus("sandtrap-vm-").items() if str(DATA) in _cmdline(pid)]
    assert left == [], f"QEMUs left running: {left}"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""
