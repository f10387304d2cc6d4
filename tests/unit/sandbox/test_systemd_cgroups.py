"""sandbox.init: systemd: which cgroup the host hands over, and what the container asks the engine for."""

from __future__ import annotations

import pytest

from sandtrap.config import SandboxSettings
from sandtrap.sandbox.docker.spec import SYSTEMD_CGROUP, create_config, run_for_systemd
from sandtrap.sandbox.host import systemd_cgroups
from sandtrap.sandbox.host.systemd_cgroups import HandOverError, own_cgroup

BOX = "9da11395ebee3eada84be5559810cfcb6a7327998e3408bd8af8dad652aa961d"
ROWS = f"12:pids:/sandtrap-s/1d4bf8d5ddad/{BOX}\n9:name=systemd:/sandtrap-s/1d4bf8d5ddad/{BOX}\n0::/\n"


def test_the_boxs_own_cgroup_below_its_parent() -> None:
    assert own_cgroup(ROWS, BOX, "/sandtrap-s/1d4bf8d5ddad") == f"/sandtrap-s/1d4bf8d5ddad/{BOX}"
    assert own_cgroup(f"9:name=systemd:/docker/{BOX}\n", BOX) == f"/docker/{BOX}"  # no parent of ours


def test_an_nspawn_boxs_cgroup_is_its_payload_exactly() -> None:
    path = "/sandtrap-s-nspawn/1d4bf8d5ddad/box/payload"
    assert own_cgroup(f"9:name=systemd:{path}\n", "1d4bf8d5ddad", exact=path) == path
    for other in (path + "/x", "/sandtrap-s-nspawn/1d4bf8d5ddad/box", "/sandtrap-s-nspawn/other/box/payload"):
        with pytest.raises(HandOverError):
            own_cgroup(f"9:name=systemd:{other}\n", "1d4bf8d5ddad", exact=path)


@pytest.mark.parametrize(
    ("rows", "parent"),
    [
        (ROWS, "/sandtrap-s/other"),  # not below the parent the backend made
        (f"9:name=systemd:/docker/{BOX}/../..\n", ""),
        (f"9:name=systemd:/docker/x{BOX}\n", ""),  # another container's name ending in this id
        ("9:name=systemd:/\n", ""),  # the host's root
        (f"9:name=systemd:/docker/{BOX}\n9:name=systemd:/docker/{BOX}\n", ""),
        ("12:pids:/docker/x\n", ""),  # no name=systemd hierarchy
        (f"9:name=systemd:/docker/{BOX} (deleted)\n", ""),
    ],
)
def test_anything_else_is_refused(rows: str, parent: str) -> None:
    with pytest.raises(HandOverError):
        own_cgroup(rows, BOX, parent)


def test_systemd_boxes_get_setpcap_run_lock_and_systemds_stop_signal() -> None:
    s = SandboxSettings(init="systemd")
    plain = create_config(s.docker, s, {}, None, mask_systemd_cgroup=True)
    config = create_config(s.docker, s, {}, None, mask_systemd_cgroup=True, systemd=True)
    host = config["HostConfig"]
    assert host["CapAdd"] == [*s.docker.cap_add, "SETPCAP"] and "SYS_ADMIN" not in host["CapAdd"]
    assert host["Privileged"] is False and host["Devices"] == [] and host["CapDrop"] == ["ALL"]
    assert host["Tmpfs"]["/run/lock"] == "rw,nosuid,nodev,noexec,size=5m" and SYSTEMD_CGROUP in host["Tmpfs"]
    assert config["StopSignal"] == "SIGRTMIN+3" and config["Cmd"] == ["/sbin/init", "--systemd"]
    assert "Cmd" not in plain and plain["StopSignal"] == "SIGTERM" and "/run/lock" not in plain["HostConfig"]["Tmpfs"]
    assert "SETPCAP" not in plain["HostConfig"]["CapAdd"]
    assert (
        host["Tmpfs"]["/run"] == "rw,nosuid,nodev,size=52428k"
        and plain["HostConfig"]["Tmpfs"]["/run"] == s.docker.tmpfs["/run"]
    )


def test_run_leaves_systemd_room_to_reload() -> None:
    """systemd refuses daemon-reload with less than 16 MiB of /run free: 20% of the memory, at least 48 MiB."""
    assert run_for_systemd("rw,nosuid,nodev,size=16m", 64 << 20) == "rw,nosuid,nodev,size=49152k"
    assert run_for_systemd("rw,size=1g", 256 << 20) == "rw,size=1g"  # larger already: kept
    assert run_for_systemd("rw,size=20%", 1 << 30) == "rw,size=209715k"  # not a size it can compare: replaced
    assert run_for_systemd("rw,nosuid", 256 << 20) == "rw,nosuid,size=52428k"


def test_off_by_default_and_refused_where_the_host_cannot_hand_cgroups_over(monkeypatch: pytest.MonkeyPatch) -> None:
    assert SandboxSettings().init == "sandtrap"
    monkeypatch.setattr(systemd_cgroups.os, "geteuid", lambda: 0)
    assert "not on this host" in systemd_cgroups.unavailable(False, True, "private", True)
    assert "cgroup v1" in systemd_cgroups.unavailable(True, False, "private", True)
    assert "cgroupns: private" in systemd_cgroups.unavailable(True, True, "host", True)
    assert "mask_cgroupns" in systemd_cgroups.unavailable(True, True, "private", False)
    monkeypatch.setattr(systemd_cgroups.os, "geteuid", lambda: 1000)
    assert "root" in systemd_cgroups.unavailable(True, True, "private", True)
