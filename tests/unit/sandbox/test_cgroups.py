"""Per-box parent cgroups: the pure parts (names, CPU placement, what the engine's info allows), and the
files written, on a directory tree standing in for /sys/fs/cgroup. The kernel's side (limits binding the
box, the box's root reading unlimited) is tested against the real engine in test_hardening.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandtrap.config import SandboxSettings
from sandtrap.sandbox.docker.spec import create_config
from sandtrap.sandbox.host.cgroups import CgroupError, Limits, ParentCgroups, cpuset_for

MiB = 1 << 20


def fake_v1(root: Path) -> Path:
    for ctrl in ("memory", "pids", "cpu", "cpuset"):
        (root / ctrl).mkdir(parents=True)
        (root / ctrl / "cgroup.procs").write_text("")
    return root


def test_cpuset_takes_ceil_cpus_neighbours_and_spreads_by_name() -> None:
    assert cpuset_for("a", 0.5, [0, 1, 2, 3]).count(",") == 0
    assert len(cpuset_for("a", 1.5, [0, 1, 2, 3]).split(",")) == 2
    assert cpuset_for("a", 16, [0, 1, 2, 3]) == "0,1,2,3"
    assert cpuset_for("abc", 1, [4, 6]) in {"4", "6"}  # only CPUs this process may use
    assert cpuset_for("abc", 1, []) == ""  # unknown: no pinning
    assert len({cpuset_for(f"box{i}", 0.5, list(range(8))) for i in range(64)}) > 1  # not every box on one CPU


def test_quota_follows_cpus() -> None:
    assert Limits(256 * MiB, 256 * MiB, 0.5, 128).quota_us == 50_000
    assert Limits(256 * MiB, 256 * MiB, 2, 128).quota_us == 200_000
    assert Limits(256 * MiB, 256 * MiB, 0.001, 128).quota_us == 1000  # the kernel's minimum


@pytest.mark.parametrize("name", ["", "..", ".", "a/b", "../x", "x" * 65, "a b"])
def test_names_that_are_not_one_path_component_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="not a cgroup name"):
        ParentCgroups(fake_v1(tmp_path)).path(name)


def test_create_writes_the_limits_in_each_hierarchy(tmp_path: Path) -> None:
    parents = ParentCgroups(fake_v1(tmp_path), prefix="sandtrap-s1")
    (tmp_path / "memory" / "memory.memsw.limit_in_bytes").write_text("")  # swap accounting on
    path = parents.create("abc123", Limits(256 * MiB, 384 * MiB, 0.5, 128))
    assert path == "/sandtrap-s1/abc123"
    mem = tmp_path / "memory/sandtrap-s1/abc123"
    assert (mem / "memory.limit_in_bytes").read_text() == str(256 * MiB)
    assert (mem / "memory.use_hierarchy").read_text() == "1"
    assert (tmp_path / "pids/sandtrap-s1/abc123/pids.max").read_text() == "128"
    assert (tmp_path / "cpu/sandtrap-s1/abc123/cpu.cfs_quota_us").read_text() == "50000"
    assert (tmp_path / "cpu/sandtrap-s1/abc123/cpu.cfs_period_us").read_text() == "100000"


def test_a_failed_create_leaves_nothing_and_says_why(tmp_path: Path) -> None:
    root = fake_v1(tmp_path)
    (root / "pids").rename(root / "pids.gone")
    (root / "pids").write_text("not a directory")
    parents = ParentCgroups(root)
    with pytest.raises(CgroupError, match="parent cgroup /sandtrap/abc"):
        parents.create("abc", Limits(256 * MiB, 256 * MiB, 0.5, 128))
    assert not (root / "memory/sandtrap/abc").exists()


def test_sweep_keeps_parents_being_created(tmp_path: Path) -> None:
    parents = ParentCgroups(fake_v1(tmp_path))
    for name in ("old", "new"):
        for ctrl in ("memory", "cpuset"):
            (tmp_path / ctrl / "sandtrap" / name).mkdir(parents=True)
    assert parents.sweep({"new"}) == 1
    assert not (tmp_path / "memory/sandtrap/old").exists() and (tmp_path / "memory/sandtrap/new").exists()
    assert parents.remove("new") is True and not (tmp_path / "cpuset/sandtrap/new").exists()


def test_available_names_what_is_missing(tmp_path: Path) -> None:
    reason = ParentCgroups(tmp_path).available()
    assert reason  # nothing there (or not root): a reason, never an exception
    (tmp_path / "cgroup.controllers").write_text("memory pids cpu")
    assert "v2" in ParentCgroups(tmp_path).available() or "root" in ParentCgroups(tmp_path).available()


def test_create_config_moves_the_limits_to_the_parent() -> None:
    s = SandboxSettings()
    own = create_config(s.docker, s, {}, None)["HostConfig"]
    assert own["Memory"] == 256 * MiB and own["PidsLimit"] == 128 and "CgroupParent" not in own
    parent = create_config(s.docker, s, {}, None, "/sandtrap-x/abc", "1")["HostConfig"]
    assert parent["CgroupParent"] == "/sandtrap-x/abc" and parent["CpusetCpus"] == "1"
    assert not {"Memory", "MemorySwap", "NanoCpus", "PidsLimit"} & set(parent)
