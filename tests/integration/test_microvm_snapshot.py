"""VMs restored from the template's snapshot: two of them compared (what a clone would share must differ),
the template never a box, a killed honeypot's restored VMs found again. Figures ("[microvm] ...") printed."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from microvm_helpers import DATA, cmdline, microvm_image, microvm_settings, remove_all

from sandtrap.app import build_backend
from sandtrap.sandbox.base import run
from sandtrap.sandbox.microvm import qemu, snapshot
from sandtrap.sandbox.microvm.backend import TEMPLATE_PREFIX, MicroVMBackend
from sandtrap.sandbox.microvm.sandbox import MicroVMSandbox

__all__ = ["microvm_image"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1500),
    pytest.mark.skipif(os.geteuid() != 0, reason="a VM's network namespace and tap need root"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="apt-get install qemu-system-x86"),
]

IDENTITY = (
    "cat /etc/machine-id /proc/sys/kernel/random/boot_id /sys/class/net/eth0/address; "
    "ip -o -4 addr show dev eth0 | awk '{print $4}'; date +%s.%N; echo $$; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'"
)


async def _identity(box: MicroVMSandbox) -> dict[str, str]:
    result = await run(box, ["sh", "-c", IDENTITY])
    assert result.ok, result
    keys = ["machine_id", "boot_id", "mac", "address", "clock", "pid", "urandom"]
    return dict(zip(keys, result.stdout.decode().split(), strict=True))


async def test_restored_vms_are_each_their_own_machine(microvm_image: None) -> None:
    backend = build_backend(microvm_settings())
    assert isinstance(backend, MicroVMBackend)
    made = [backend]
    try:
        first = await backend.create()
        before_second = time.time()
        second = await backend.create()
        assert first.restored_from and first.restored_from == second.restored_from, "both restored, not booted"
        manifest = snapshot.read_manifest(snapshot.Snapshot(Path(first.restored_from), ""))
        print(
            f"[microvm] template: cold boot {manifest.get('boot_s')}s, save {manifest.get('save_s')}s, "
            f"state {int(manifest.get('state_bytes', 0)) >> 20} MiB"
        )
        for box in (first, second):
            print(f"[microvm] restore to sshd {box.boot_s:.1f}s, made unique + baseline {box.baseline_s:.1f}s")

        a, b = await _identity(first), await _identity(second)
        print(f"[microvm] restored identities: {a} / {b}")
        for key in ("machine_id", "boot_id", "mac", "pid", "urandom"):
            assert a[key] != b[key], f"{key} is shared by two restored VMs: {a[key]}"
        assert a["machine_id"] == first.record.machine_uuid.replace("-", "")
        assert a["mac"] == first.record.mac and b["mac"] == second.record.mac
        assert a["address"] == b["address"] == "10.20.1.13/24"  # as configured: each VM has its own namespace
        # The template was saved before the second create began: a clock not stepped would be behind that.
        assert before_second - 1 <= float(b["clock"]) <= time.time() + 5, (before_second, b["clock"])
        # boot_id: ours, bind-mounted read-only over the kernel's (the kernel never makes a new one)
        mounts = (await run(second, ["grep", "-c", "kernel/random/boot_id", "/proc/self/mountinfo"])).stdout
        assert mounts.strip() == b"1"

        # Making it unique and the honeypot's own login are in the baseline, not changes of the attacker's.
        assert not {c.path for c in await second.changed_files()} & {"/etc/machine-id", "/root", "/var/log"}

        # The template is no box: not listed, not running; the boxes are.
        listed = await backend.list_managed()
        assert {i.id for i in listed} == {first.id, second.id}
        assert not [n for n, pid in qemu.find_qemus(TEMPLATE_PREFIX).items() if str(DATA) in cmdline(pid)]

        # The honeypot is killed: a new backend object finds both restored VMs and the orphan QEMU of one whose
        # state directory is gone (and kills it), as for a cold-booted VM.
        again = build_backend(microvm_settings())
        assert isinstance(again, MicroVMBackend)
        made.append(again)
        assert {(i.id, i.state) for i in await again.list_managed()} == {(first.id, "warm"), (second.id, "warm")}
        (second.directory / "vm.json").rename(second.directory / "vm.json.hidden")
        assert [i.id for i in await again.list_managed()] == [first.id]
        assert not qemu.is_alive(second.record.pid, second.name), "the orphan QEMU was killed"
        (second.directory / "vm.json.hidden").rename(second.directory / "vm.json")
    finally:
        await remove_all(made)
    assert not list((DATA / "microvm" / "vms").iterdir())
