"""nspawn's command line and cgroups, the parts that are pure: the io_uring filter's program, the hierarchies a
box gets a cgroup of its own in, and what nspawn is told (the escape battery runs them for real:
tests/integration/test_escape.py with SANDTRAP_TEST_BACKEND=nspawn)."""

from __future__ import annotations

import errno
import struct
from pathlib import Path

import pyseccomp
import pytest

from sandtrap.config import NspawnSettings, SandboxSettings
from sandtrap.sandbox.nspawn import launch, seccomp, views

ENOSYS = 0x00050000 | errno.ENOSYS  # SECCOMP_RET_ERRNO with its data
EPERM = 0x00050000 | errno.EPERM


def verdict(program: bytes, arch: int, nr: int, arg0: int = 0) -> int:
    """What the kernel's seccomp would answer: the classic BPF program run on a ``struct seccomp_data`` (the
    instructions libseccomp emits without argument checks: load word, jumps on a constant, AND, return)."""
    assert program and len(program) % 8 == 0
    prog = list(struct.iter_unpack("=HBBI", program))
    data = struct.pack("=iIQQ", nr, arch, 0, arg0) + bytes(40)
    a, pc = 0, 0
    while True:
        code, jt, jf, k = prog[pc]
        pc += 1
        if code == 0x20:  # LD W ABS
            a = struct.unpack_from("=I", data, k)[0]
        elif code == 0x54:  # ALU AND K
            a &= k
        elif code == 0x05:  # JA
            pc += k
        elif code in (0x15, 0x25, 0x35, 0x45):  # JEQ, JGT, JGE, JSET with K
            hit = {0x15: a == k, 0x25: a > k, 0x35: a >= k, 0x45: bool(a & k)}[code]
            pc += jt if hit else jf
        elif code == 0x06:  # RET K
            return k
        else:
            raise AssertionError(f"instruction {code:#x} not modelled")


def test_io_uring_filter_answers_enosys_for_io_uring_only_on_each_abi() -> None:
    x32 = 0x40000000
    for native, abis in [
        (pyseccomp.Arch.X86_64, [(pyseccomp.Arch.X86_64, 0), (pyseccomp.Arch.X86, 0), (pyseccomp.Arch.X86_64, x32)]),
        (pyseccomp.Arch.AARCH64, [(pyseccomp.Arch.AARCH64, 0), (pyseccomp.Arch.ARM, 0)]),
    ]:
        program = seccomp.filter_program(native)
        for arch, bit in abis:
            for name in seccomp.ENOSYS_CALLS:
                nr = pyseccomp.resolve_syscall(arch, name) | bit
                assert verdict(program, arch, nr) == ENOSYS, (hex(arch), name)
            for name in ("read", "pidfd_send_signal", "ptrace", "unshare"):  # not this filter's business
                nr = pyseccomp.resolve_syscall(arch, name) | bit
                assert verdict(program, arch, nr) == pyseccomp.ALLOW, (hex(arch), name)
            clone = pyseccomp.resolve_syscall(arch, "clone") | bit
            fork_flags = 0x01200011  # what fork() passes: CLONE_CHILD_SETTID|CLONE_CHILD_CLEARTID|SIGCHLD
            threads = 0x003D0F00  # pthread_create's flags
            assert verdict(program, arch, clone, fork_flags) == pyseccomp.ALLOW
            assert verdict(program, arch, clone, threads) == pyseccomp.ALLOW
            newuser, newnet, newns = seccomp.CLONE_NEWUSER, 0x40000000, 0x00020000
            assert verdict(program, arch, clone, newuser | 17) == EPERM, hex(arch)
            assert verdict(program, arch, clone, newuser | newnet | fork_flags) == EPERM
            # the other namespaces' flags: nspawn's own (the kernel refuses them to a box without CAP_SYS_ADMIN)
            assert verdict(program, arch, clone, newns | newnet | 17) == pyseccomp.ALLOW


def test_the_filter_is_loaded_just_before_nspawn_and_nspawn_lets_io_uring_through(tmp_path: Path) -> None:
    box = SandboxSettings(backend="nspawn", network="none", hostname="web-1", domain="corp.example")
    bpf = tmp_path / "io_uring.bpf"
    argv = launch.argv(NspawnSettings(), box, "sandtrap-x-1", tmp_path / "root", [], ["/cg/procs"], bpf)
    loader = argv.index(seccomp.LOADER)
    assert argv[loader + 1 : loader + 3] == [str(bpf), "systemd-nspawn"]
    allowed = next(a for a in argv if a.startswith("--system-call-filter=") and "~" not in a)
    denied = next(a for a in argv if a.startswith("--system-call-filter=~")).split("=~", 1)[1].split()
    assert set(seccomp.ENOSYS_CALLS) <= set(allowed.split("=", 1)[1].split())
    assert not set(seccomp.ENOSYS_CALLS) & set(denied) and {"unshare", "mount", "setns", "keyctl", "bpf"} <= set(denied)
    assert "ptrace" in allowed and "--oom-score-adjust=500" in argv
    assert argv[-1] == "/sbin/init"


def test_with_systemd_init_waits_for_its_cgroups_and_the_box_keeps_setpcap(tmp_path: Path) -> None:
    """sandbox.init: systemd as on Docker (docker/spec.py): CAP_SETPCAP, /run/lock, systemd's halt signal, and a
    /run systemd can daemon-reload in; without it none of that."""
    box = SandboxSettings(backend="nspawn", network="none", init="systemd", memory=1 << 30)
    plain = launch.argv(NspawnSettings(), box, "m", tmp_path, [], [], tmp_path / "f.bpf")
    sd = launch.argv(NspawnSettings(), box, "m", tmp_path, [], [], tmp_path / "f.bpf", systemd=True)
    assert sd[-2:] == ["/sbin/init", "--systemd"] and plain[-1] == "/sbin/init"
    dropped = next(a for a in sd if a.startswith("--drop-capability=")).split("=", 1)[1].split(",")
    assert "CAP_SETPCAP" not in dropped and "CAP_SYS_ADMIN" in dropped and "CAP_SYS_BOOT" in dropped
    assert "CAP_SETPCAP" in next(a for a in plain if a.startswith("--drop-capability="))
    assert "--kill-signal=SIGRTMIN+3" in sd and "--kill-signal=SIGTERM" in plain
    assert any(a.startswith("--tmpfs=/run/lock:") for a in sd) and not any(a.startswith("--tmpfs") for a in plain)
    assert launch.run_size(box, False) == "16m"
    assert launch.run_size(box, True) == f"{(1 << 30) // 5 // 1024}k"  # 20% of memory
    assert launch.run_size(SandboxSettings(memory=128 << 20), True) == f"{48 * 1024}k"  # at least 48 MiB


def test_a_box_gets_a_cgroup_in_every_v1_hierarchy_but_the_unified_one() -> None:
    mounted = ["unified", "systemd", "cpuacct", "blkio", "memory", "cpu", "pids", "cpuset", "freezer", "devices"]
    got = launch.pick_hierarchies(mounted)
    assert got[:3] == ("memory", "pids", "cpu")  # the limits' controllers first
    assert set(got) == set(mounted) - {"unified"} and len(got) == len(set(got))


def test_a_new_cpuset_cgroup_gets_its_parents_cpus_and_mems(tmp_path: Path) -> None:
    # a stand-in for cgroupfs: the kernel makes the knobs of a new cgroup, empty for cpuset
    for h in ("cpuset", "pids"):
        (tmp_path / h).mkdir()
        (tmp_path / h / "cgroup.procs").write_text("")
    (tmp_path / "cpuset" / "cpuset.cpus").write_text("0-1\n")
    (tmp_path / "cpuset" / "cpuset.mems").write_text("0\n")
    for part in ("pre", "pre/box1", "pre/box1/box"):
        for knob in ("cpuset.cpus", "cpuset.mems"):
            (tmp_path / "cpuset" / part).mkdir(exist_ok=True)
            (tmp_path / "cpuset" / part / knob).write_text("")
    procs = launch.cgroup_procs(tmp_path, "pre", "box1", ("pids", "cpuset"))
    assert procs == [str(tmp_path / h / "pre/box1/box/cgroup.procs") for h in ("pids", "cpuset")]
    for part in ("pre", "pre/box1", "pre/box1/box"):
        assert (tmp_path / "cpuset" / part / "cpuset.cpus").read_text() == "0-1"
        assert (tmp_path / "cpuset" / part / "cpuset.mems").read_text() == "0"
    assert not (tmp_path / "pids" / "pre" / "cpuset.cpus").exists()


def test_proc_views_are_bound_over_proc_files_only() -> None:
    binds = ["/var/lib/lxcfs/proc/meminfo:/proc/meminfo:ro", "/var/lib/sandtrap-loadavg/proc/loadavg:/proc/loadavg:ro"]
    assert views.pairs(binds) == [
        "/var/lib/lxcfs/proc/meminfo",
        "/proc/meminfo",
        "/var/lib/sandtrap-loadavg/proc/loadavg",
        "/proc/loadavg",
    ]
    for bad in ("/x:/etc/shadow:ro", "/x:/proc/../etc/passwd:ro"):
        with pytest.raises(ValueError, match="not a /proc view"):
            views.pairs([bad])
