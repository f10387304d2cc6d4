"""The micro-VM backend's pure parts: the exec command line, QEMU's command line and namespace, the accelerator
choice, the image's inputs, the changed-files diff and the state record."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import pytest

from sandtrap.config import ImageSettings, MicroVMSettings
from sandtrap.errors import SandboxError, SandboxUnavailable
from sandtrap.sandbox.base import ChangedFile
from sandtrap.sandbox.microvm import guest, qemu, state
from sandtrap.sandbox.microvm.image import GuestFiles, vm_inputs
from sandtrap.sandbox.microvm.sandbox import diff_listing, parse_listing


def test_command_line_quotes_every_word_and_keeps_bytes() -> None:
    line = guest.command_line(["printf", "%s\n", "it's", b"\xff\xfe"], None, "root", None)
    assert line == b"exec 'printf' '%s\n' 'it'\\''s' '\xff\xfe'"
    assert shlex.split(line.decode("latin-1")) == ["exec", "printf", "%s\n", "it's", "\xff\xfe"]


def test_command_line_with_env_user_and_workdir() -> None:
    line = guest.command_line(["id"], {"A": "1 2", "B_2": "x'y"}, "admin", "/var/www")
    assert line == b"cd '/var/www' && exec env 'A=1 2' 'B_2=x'\\''y' runuser -u admin -- 'id'"


@pytest.mark.parametrize(
    ("argv", "env", "user"), [([], None, "root"), (["id"], {"A B": "1"}, "root"), (["id"], None, "ad min")]
)
def test_command_line_refuses_what_it_cannot_quote(argv: list[str], env: dict[str, str] | None, user: str) -> None:
    with pytest.raises(SandboxError):
        guest.command_line(argv, env, user, None)


def test_guest_net_from_subnet() -> None:
    net = qemu.GuestNet.from_subnet("10.20.1.0/24")
    assert (net.gateway, net.address, net.prefix) == ("10.20.1.1", "10.20.1.13", 24)
    small = qemu.GuestNet.from_subnet("10.9.0.0/29")
    assert (small.gateway, small.address) == ("10.9.0.1", "10.9.0.6")


def _launch(tmp_path: Path) -> qemu.Launch:
    return qemu.Launch("sandtrap-vm-x", tmp_path, tmp_path / "disk.qcow2", tmp_path / "k", tmp_path / "i",
                       "52:54:00:01:02:03", "0f0e0d0c-0000-4000-8000-000000000000")  # fmt: skip


def test_qemu_argv_is_bounded_and_sandboxed(tmp_path: Path) -> None:
    settings = MicroVMSettings(memory=768 << 20, vcpus=2, kernel_cmdline_extra="mitigations=off")
    argv = qemu.qemu_argv(settings, qemu.Accel("tcg", "test"), _launch(tmp_path))
    joined = " ".join(argv)
    assert argv[argv.index("-m") + 1] == "768M" and argv[argv.index("-smp") + 1] == "2"
    assert argv[argv.index("-sandbox") + 1].startswith("on,obsolete=deny,elevateprivileges=allow,spawn=deny")
    assert argv[argv.index("-runas") + 1] == "sandtrap-qemu"
    as_root = qemu.qemu_argv(MicroVMSettings(run_as=""), qemu.Accel("tcg", "test"), _launch(tmp_path))
    assert "-runas" not in as_root and "elevateprivileges=deny" in as_root[as_root.index("-sandbox") + 1]
    assert "tcg,thread=multi,tb-size=128" in argv and "-nodefaults" in argv
    # GRUB's first word, as /proc/cmdline shows it on a Debian server
    launch = _launch(tmp_path)
    booted = qemu.qemu_argv(settings, qemu.Accel("tcg", "test"), dataclasses.replace(launch, release="6.1.0-9-amd64"))
    append = booted[booted.index("-append") + 1]
    assert append.startswith("BOOT_IMAGE=/boot/vmlinuz-6.1.0-9-amd64 root=/dev/vda ro ") and "mitigations=off" in append
    assert "tap,id=net0,ifname=tap0,script=no,downscript=no" in argv
    assert "user," not in joined and "hostfwd" not in joined  # no user-mode network: nothing NATed
    assert argv[argv.index("-append") + 1].endswith("no_timer_check quiet mitigations=off")
    kvm = qemu.qemu_argv(settings, qemu.Accel("kvm", "test"), _launch(tmp_path))
    assert kvm[kvm.index("-accel") + 1] == "kvm" and kvm[kvm.index("-cpu") + 1] == "host"


def test_namespace_script_makes_only_the_tap() -> None:
    script = qemu.namespace_script(qemu.GuestNet("10.20.1.1", "10.20.1.13", 24))
    assert "ip tuntap add dev tap0 mode tap" in script
    assert "ip addr add 10.20.1.1/24 dev tap0" in script
    assert "ip_forward" in script and "route" not in script and "iptables" not in script
    assert script.endswith('exec "$@"')


def test_accel_forced_kvm_without_kvm_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qemu, "probe_kvm", lambda: (False, "no vmx"))
    with pytest.raises(SandboxUnavailable, match=r"sandbox\.microvm\.accel: kvm"):
        qemu.choose_accel("kvm")
    assert qemu.choose_accel("auto").name == "tcg"
    assert qemu.choose_accel("tcg").name == "tcg"
    monkeypatch.setattr(qemu, "probe_kvm", lambda: (True, "vmx"))
    assert qemu.choose_accel("auto").name == "kvm"
    assert qemu.choose_accel("tcg").name == "tcg"


def test_missing_qemu_user_names_the_key() -> None:
    with pytest.raises(SandboxUnavailable, match=r"sandbox\.microvm\.run_as: user no-such-user-x does not exist"):
        qemu.check_user(MicroVMSettings(run_as="no-such-user-x"))
    qemu.check_user(MicroVMSettings(run_as=""))


def test_probe_says_no_without_vmx_or_svm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qemu, "_cpu_flags", lambda: {"fpu", "sse2"})
    usable, why = qemu.probe_kvm()
    assert not usable and "vmx" in why


def _guest(**kw: object) -> GuestFiles:
    base: dict[str, object] = {
        "hostname": "web-prod-03", "domain": "corp.internal", "address": "10.20.1.13/24", "gateway": "10.20.1.1",
        "access_key": b"ssh-ed25519 AAAA test", "disk_bytes": 4 << 30,
        "planted": {"etc/ssh/k": (b"private 1", 0o600, 1.0), "etc/ssh/k.pub": (b"public", 0o644, 1.0)},
    }  # fmt: skip
    base.update(kw)
    return GuestFiles(**base)  # type: ignore[arg-type]


def test_vm_inputs_key_what_the_image_is_made_of() -> None:
    image = ImageSettings()
    same = vm_inputs(image, _guest())
    # a private key's export differs each time: its public half keys it
    assert (
        vm_inputs(
            image, _guest(planted={"etc/ssh/k": (b"private 2", 0o600, 2.0), "etc/ssh/k.pub": (b"public", 0o644, 1.0)})
        )
        == same
    )
    assert vm_inputs(image, _guest(hostname="db01")) != same
    assert vm_inputs(image, _guest(disk_bytes=8 << 30)) != same
    assert vm_inputs(image, _guest(access_key=b"ssh-ed25519 BBBB")) != same
    assert vm_inputs(ImageSettings(extra_packages=["jq"]), _guest()) != same


def test_listing_diff() -> None:
    before = parse_listing(b"/etc\0d 4096 755 1 1\0/etc/passwd\0f 10 644 1 1\0/tmp/gone\0f 1 644 1 1\0")
    after = parse_listing(b"/etc\0d 4096 755 1 2\0/etc/passwd\0f 12 644 2 2\0/tmp/new\xff\0f 3 755 3 3\0")
    assert diff_listing(before, after) == [
        ChangedFile("/etc", "C"),
        ChangedFile("/etc/passwd", "C"),
        ChangedFile("/tmp/gone", "D"),
        ChangedFile("/tmp/new\udcff", "A"),
    ]


def test_state_record_round_trip(tmp_path: Path) -> None:
    record = state.VMRecord("abc", "sandtrap-vm-abc", state.VMRecord.now(), "/img", "52:54:00:00:00:01", "u", pid=7)
    state.save(tmp_path, record)
    assert state.load(tmp_path) == record
    (tmp_path / state.RECORD).write_text("{not json")
    assert state.load(tmp_path) is None
    assert state.when("") is None and state.when(record.created) is not None
