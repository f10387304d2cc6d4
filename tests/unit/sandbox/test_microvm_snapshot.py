"""The template snapshot's pure parts: its cache key, a restored VM's baseline, a restored VM's new identity."""

from __future__ import annotations

import re
from pathlib import Path

from sandtrap.config import MicroVMSettings
from sandtrap.sandbox.microvm import qemu, snapshot
from sandtrap.sandbox.microvm.unique import SCRIPT, new_identity

TCG = qemu.Accel("tcg", "test")


def _argv(settings: MicroVMSettings) -> list[str]:
    shape = qemu.Launch("NAME", Path("/DIR"), Path("/DIR/disk.qcow2"), Path("/img/vmlinuz"), Path("/img/initrd.img"),
                        "MAC", "UUID")  # fmt: skip
    return qemu.qemu_argv(settings, TCG, shape)


def test_the_key_changes_with_the_image_qemu_and_the_machine() -> None:
    base = snapshot.snapshot_key("inputs", "QEMU 7.2", _argv(MicroVMSettings()))
    assert base == snapshot.snapshot_key("inputs", "QEMU 7.2", _argv(MicroVMSettings()))
    assert base != snapshot.snapshot_key("other", "QEMU 7.2", _argv(MicroVMSettings()))
    assert base != snapshot.snapshot_key("inputs", "QEMU 8.0", _argv(MicroVMSettings()))
    assert base != snapshot.snapshot_key("inputs", "QEMU 7.2", _argv(MicroVMSettings(memory="1g")))
    assert base != snapshot.snapshot_key("inputs", "QEMU 7.2", _argv(MicroVMSettings(vcpus=2)))


def test_a_restored_vm_takes_its_state_by_fd_and_a_template_never_has_incoming() -> None:
    shape = qemu.Launch("n", Path("/d"), Path("/d/disk.qcow2"), Path("/k"), Path("/i"), "m", "u")
    assert "-incoming" not in qemu.qemu_argv(MicroVMSettings(), TCG, shape)
    restored = qemu.Launch("n", Path("/d"), Path("/d/disk.qcow2"), Path("/k"), Path("/i"), "m", "u", incoming_fd=7)
    argv = qemu.qemu_argv(MicroVMSettings(), TCG, restored)
    assert argv[argv.index("-incoming") + 1] == "fd:7"
    assert "spawn=deny" in argv[argv.index("-sandbox") + 1]  # no exec: migration, so the fd


def _listing(entries: dict[str, str]) -> bytes:
    return b"".join(p.encode() + b"\0" + m.encode() + b"\0" for p, m in entries.items())


def test_the_baseline_is_the_templates_outside_the_walked_trees_and_fresh_inside() -> None:
    template = _listing({"/": "d 1", "/usr/bin/ls": "f 1", "/etc/machine-id": "f old", "/var/log/a": "f old",
                         "/var/logs-not": "f keep", "/root/gone": "f 1"})  # fmt: skip
    fresh = _listing({"/etc/machine-id": "f new", "/var/log/a": "f new", "/var/log/b": "f new"})
    merged = snapshot.merge_baseline(template, fresh, (b"/etc/machine-id", b"/var/log", b"/root"))
    parts = merged.split(b"\0")
    got = {parts[i].decode(): parts[i + 1].decode() for i in range(0, len(parts) - 1, 2)}
    assert got == {"/": "d 1", "/usr/bin/ls": "f 1", "/var/logs-not": "f keep", "/etc/machine-id": "f new",
                   "/var/log/a": "f new", "/var/log/b": "f new"}  # fmt: skip


def test_each_identity_is_new_and_well_formed() -> None:
    a = new_identity("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", "52:54:00:aa:bb:cc")
    b = new_identity("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", "52:54:00:aa:bb:cc")
    assert a.machine_id == "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", a.boot_id)
    assert a.boot_id != b.boot_id and a.entropy != b.entropy and len(a.entropy) == 64
    assert 2000 <= a.last_pid < 22000
    assert "RNDADDENTROPY" in SCRIPT and "/proc/sys/kernel/random/boot_id" in SCRIPT
