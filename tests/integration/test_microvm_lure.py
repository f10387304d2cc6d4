"""The lure file system in a real VM (TCG here): mounted read-only at its path in the guest, every access from
an attacker's login an event of that session, honeytokens read through it, nothing left after stop.

Figures ("[lure] ...") are printed at the end of the run.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from test_microvm import DATA, _settings, vm_image  # noqa: F401  (the image fixture, shared)

from sandtrap.app import build_backend, running
from sandtrap.events import HONEYTOKEN_ISSUED, HONEYTOKEN_READ, CaptureSink
from sandtrap.sandbox.base import run
from sandtrap.sandbox.microvm import qemu, state, virtiofs
from sandtrap.sandbox.microvm.backend import MicroVMBackend
from sandtrap.sandbox.microvm.image import VMImage
from sandtrap.sandbox.microvm.lure import FSTYPE

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1500),
    pytest.mark.skipif(os.geteuid() != 0, reason="a VM's network namespace, tap and FUSE mount need root"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="apt-get install qemu-system-x86"),
    pytest.mark.skipif(not os.access("/usr/lib/qemu/virtiofsd", os.X_OK), reason="apt-get install qemu-system-common"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
]

LURE = "/opt/proprietary_data"
HOSTILE = f"""L={LURE}
for i in $(seq 500); do exec {{fd}}<"$L/README.txt" || break; done
ls /proc/$$/fd | wc -l
dd if="$L/hr/salaries_2026.csv" of=/dev/null bs=64M count=1 2>&1 | tail -1
cat "$L/$(printf 'a\\377b')" 2>&1
cat "$L/$(head -c 300 /dev/zero | tr '\\0' x)" 2>&1
touch "$L/x" 2>&1
mkdir "$L/d" 2>&1
head -1 "$L/README.txt"
"""


def _lure_mounts() -> list[str]:
    return [ln for ln in Path("/proc/self/mountinfo").read_text().splitlines() if f" - {FSTYPE} " in ln]


def _lure_pids(directory: Path) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if str(directory).encode() in argv and (b"lurefs" in argv or b"virtiofsd" in argv):
                out.append(int(entry))
    return out


def _status(pid: int) -> dict[str, list[str]]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {ln.split(":")[0]: ln.split(":", 1)[1].split() for ln in text.splitlines() if ":" in ln}


async def test_lure_share_reports_a_logins_reads_and_leaves_nothing(
    vm_image: tuple[VMImage, float, bool],
) -> None:
    overrides: dict[str, Any] = {
        "ssh": {"listen": "127.0.0.1:0"},
        "api": {"listen": "127.0.0.1:0"},
        "sandbox": {"pool_size": 1, "microvm": {"lure": {"events_per_s": 50, "events_burst": 400}}},
        "auth": {
            "credentials": [{"username": "root", "password": "hunter2"}],
            "accept_all_after": 0,
            "failure_delay_s": 0,
            "success_delay_s": 0,
        },
    }
    settings = _settings(overrides)
    capture = CaptureSink()
    async with running(settings) as services:
        services.bus.add_sink(capture)
        backend = services.backend
        assert isinstance(backend, MicroVMBackend)
        async with asyncssh.connect(
            "127.0.0.1", services.ssh.port, username="root", password="hunter2", known_hosts=None
        ) as client:
            # Mounted at its path, read-only, virtio-fs; the guest cannot write there.
            mounts = await client.run(f"grep ' {LURE} ' /proc/mounts", timeout=120)
            assert " virtiofs ro," in str(mounts.stdout), mounts.stdout
            listing = await client.run(f"ls {LURE}; find {LURE} -type f | sort", timeout=120)
            assert "README.txt" in str(listing.stdout) and f"{LURE}/hr/salaries_2026.csv" in str(listing.stdout)
            wrote = await client.run(f"echo x > {LURE}/new; echo x >> {LURE}/README.txt; rm {LURE}/README.txt",
                                     timeout=60)  # fmt: skip
            assert wrote.exit_status != 0 and "Read-only file system" in str(wrote.stderr), wrote.stderr
            cat = await client.run(f"cat {LURE}/README.txt", timeout=60)
            assert "INTERNAL ONLY" in str(cat.stdout)

            # Latency through FUSE + virtio-fs, side by side with the guest's own disk (guest clock, ns): a read
            # request (dd bs=1: one read() a byte) and an open+read+close (20 cats, process start included).
            timed = await client.run(
                f"f={LURE}/hr/salaries_2026.csv; n=$(stat -c %s $f); "
                "for g in /etc/services $f; do s=$(date +%s%N); dd if=$g of=/dev/null bs=1 count=$n 2>/dev/null; "
                "echo $(( ($(date +%s%N) - s) / n )); done; "
                f"for g in /etc/hostname {LURE}/README.txt; do s=$(date +%s%N); "
                "for i in $(seq 20); do cat $g >/dev/null; done; echo $(( ($(date +%s%N) - s) / 20 )); done",
                timeout=600,
            )
            disk_read_ns, lure_read_ns, disk_cat_ns, lure_cat_ns = map(int, str(timed.stdout).split())

            # A honeytoken outside the lure's path, read through it: the bridge's event, unchanged.
            token = await client.run("cat /root/.aws/credentials", timeout=60)
            assert "aws_access_key_id" in str(token.stdout)
            session = capture.of(HONEYTOKEN_ISSUED)[0].session

            # A hostile guest: 500 opens held at once, a huge read, names not UTF-8 or too long, writes: refused
            # or served, and the daemon serves on.
            hostile = await client.run("bash -s", input=HOSTILE, timeout=600)
            lines = str(hostile.stdout).splitlines()
            assert int(lines[0]) >= 500, hostile.stdout
            assert "No such file" in lines[2] and ("File name too long" in lines[3] or "No such file" in lines[3])
            assert "Read-only" in lines[4] and "Read-only" in lines[5] and lines[6].startswith("Proprietary"), lines

            # A guest reading in a loop is bounded: the events are capped, the rest counted as suppressed.
            emitted0 = services.bus.events_emitted
            t0 = time.monotonic()
            # dd bs=1: one read request per byte, every one reaching the daemon (direct I/O, no page cache).
            flood = f"for i in 1 2 3; do dd if={LURE}/hr/salaries_2026.csv of=/dev/null bs=1 2>/dev/null; done"
            await client.run(flood, timeout=900)
            loop_s = time.monotonic() - t0
            await asyncio.sleep(2.5)  # the daemon reports what it suppressed once a second
            loop_events = services.bus.events_emitted - emitted0

        lure_events = [e for e in capture.of(HONEYTOKEN_READ) if getattr(e, "kind", "") == "lure"]
        by_op = {(getattr(e, "op", ""), getattr(e, "path", "")) for e in lure_events}
        assert ("opendir", LURE) in by_op and ("open", f"{LURE}/README.txt") in by_op, sorted(by_op)[:20]
        reads = [e for e in lure_events if getattr(e, "op", "") == "read" and e.path == f"{LURE}/README.txt"]
        assert reads and getattr(reads[0], "offset", None) == 0 and getattr(reads[0], "bytes", 0) > 0
        assert all(e.session == session for e in lure_events)
        tokens = [e for e in capture.of(HONEYTOKEN_READ) if getattr(e, "kind", "") == "aws"]
        assert [(e.path, e.session) for e in tokens][:1] == [("/root/.aws/credentials", session)]
        suppressed = sum(getattr(e, "bytes", 0) for e in lure_events if getattr(e, "op", "") == "suppressed")
        print(
            f"[lure] guest read() of 1 byte: {lure_read_ns / 1000:.0f} us through the lure, {disk_read_ns / 1000:.0f} us "
            f"from the guest's disk (page cache); cat: {lure_cat_ns / 1e6:.0f} ms vs {disk_cat_ns / 1e6:.0f} ms (TCG)"
        )
        print(f"[lure] 3 x dd bs=1 of a file ({loop_s:.1f}s): {loop_events} events emitted, {suppressed} suppressed")
        assert suppressed > 0
        bound = 400 + 50 * (loop_s + 3)
        assert loop_events <= bound + 50, (loop_events, bound)  # 5000+ reads, the events bounded

        # The daemon runs as nobody without capabilities; virtiofsd's capabilities are trimmed.
        vms = DATA / "microvm" / "vms"
        # The session's VM (the pool's refill, restored from the template, may have its own share by now).
        (directory,) = [
            d
            for d in vms.iterdir()
            if (d / virtiofs.RECORD).exists() and _lure_pids(d) and (r := state.load(d)) and r.session == session
        ]
        pids = _lure_pids(directory)
        daemon = [p for p in pids if b"lurefs" in Path(f"/proc/{p}/cmdline").read_bytes()]
        status = _status(daemon[0])
        assert status["Uid"][0] == "65534" and status["CapEff"] == ["0000000000000000"], status
        rss_kib = int(status["VmRSS"][0])
        print(f"[lure] daemon RSS {rss_kib / 1024:.1f} MiB")

    # The session's VM is stopped (kept for forensics): its lure processes and mount are gone.
    assert not _lure_pids(directory)
    assert not [m for m in _lure_mounts() if str(vms) in m], _lure_mounts()
    for d in vms.iterdir():
        shutil.rmtree(d)
    left = [n for n, pid in qemu.find_qemus("sandtrap-vm-").items() if str(DATA).encode() in _cmd(pid)]
    assert left == []


def _cmd(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


async def test_lure_share_dies_with_a_killed_qemu_and_a_restart_reaps_it(
    vm_image: tuple[VMImage, float, bool],
) -> None:
    backend = build_backend(_settings())
    assert isinstance(backend, MicroVMBackend)
    box = await backend.create()
    try:
        ls = await run(box, ["ls", LURE])
        assert b"README.txt" in ls.stdout
        print(f"[lure] daemon + virtiofsd started, device hot-plugged, guest mounted: {box.lure_s:.1f}s (TCG)")
        pids = _lure_pids(box.directory)
        daemons = [p for p in pids if b"lurefs" in _cmd(p)]
        assert len(daemons) == 1 and len(pids) >= 2  # virtiofsd: its parent, and its child in a pid namespace
        assert [m for m in _lure_mounts() if str(box.directory) in m]
        os.kill(box.record.pid, 9)  # QEMU killed under the honeypot
        for _ in range(200):
            if not [p for p in _lure_pids(box.directory) if not _zombie(p)]:
                break
            await asyncio.sleep(0.05)
        assert not [p for p in _lure_pids(box.directory) if not _zombie(p)], "the daemon and virtiofsd follow QEMU"
        # A restarted honeypot: list_managed reaps the dead mount of a VM that is gone.
        again = build_backend(_settings())
        await again.list_managed()
        assert not [m for m in _lure_mounts() if str(box.directory) in m], _lure_mounts()
        await again.close()
    finally:
        await box.remove()
        await backend.close()
    assert not [m for m in _lure_mounts() if str(box.directory) in m]


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()[0] == b"Z"
    except OSError:
        return True
