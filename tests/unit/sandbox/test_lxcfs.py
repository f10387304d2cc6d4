"""/proc binds: lxcfs's files that exist and our loadavg over lxcfs's; none (not a crash) when a mount is broken."""

import errno
from pathlib import Path

import pytest

from sandtrap.sandbox.docker.proxy_policy import Policy, Refused, _check_bind
from sandtrap.sandbox.host.procviews import LXCFS_FILES, ProcViews, lxcfs_binds


def proc_binds(lxcfs_dir: str, loadavg_dir: str) -> list[str]:
    return ProcViews(lxcfs_dir, loadavg_dir).binds()


def loadavg_bind(loadavg_dir: str) -> str | None:
    return ProcViews("", loadavg_dir).loadavg_bind()


def test_no_dir_configured_gives_no_binds() -> None:
    assert lxcfs_binds("") == []


def test_missing_mount_gives_no_binds(tmp_path: Path) -> None:
    assert lxcfs_binds(str(tmp_path)) == []


def test_binds_only_the_files_lxcfs_renders(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    for name in ("proc/meminfo", "proc/cpuinfo"):
        (tmp_path / name).write_text("x")
    binds = lxcfs_binds(str(tmp_path))
    assert binds == [f"{tmp_path / n}:/{n}:ro" for n in LXCFS_FILES if n in ("proc/meminfo", "proc/cpuinfo")]


def test_stale_mount_gives_no_binds_and_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: Path, **_: object) -> bool:
        raise OSError(errno.ENOTCONN, "Transport endpoint is not connected", str(self))

    monkeypatch.setattr(Path, "exists", broken)
    assert lxcfs_binds(str(tmp_path)) == []
    assert "not usable" in caplog.text


def test_our_loadavg_replaces_lxcfs_s_when_it_is_served(tmp_path: Path) -> None:
    lxcfs, ours = tmp_path / "lxcfs", tmp_path / "ours"
    for root in (lxcfs, ours):
        (root / "proc").mkdir(parents=True)
    for name in ("proc/meminfo", "proc/loadavg"):
        (lxcfs / name).write_text("x")
    (ours / "proc" / "loadavg").write_text("x")
    assert proc_binds(str(lxcfs), str(ours)) == [
        f"{lxcfs}/proc/meminfo:/proc/meminfo:ro",
        f"{ours}/proc/loadavg:/proc/loadavg:ro",
    ]
    assert proc_binds("", str(ours)) == [f"{ours}/proc/loadavg:/proc/loadavg:ro"]
    assert proc_binds(str(lxcfs), "") == lxcfs_binds(str(lxcfs))


def test_a_dead_loadavg_mount_falls_back_to_lxcfs_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "meminfo").write_text("x")
    (tmp_path / "proc" / "loadavg").write_text("x")
    assert loadavg_bind(str(tmp_path / "nothing")) is None
    assert "not usable" in caplog.text

    def broken(self: Path, *_: object) -> object:
        raise OSError(errno.ENOTCONN, "Transport endpoint is not connected", str(self))

    monkeypatch.setattr(Path, "open", broken)
    assert proc_binds(str(tmp_path), "/var/lib/dead") == lxcfs_binds(str(tmp_path))
    assert "Transport endpoint is not connected" in caplog.text


def test_the_engine_proxy_allows_our_loadavg_bind_read_only_and_nothing_else_of_it() -> None:
    policy = Policy(lxcfs_dir="/var/lib/lxcfs", loadavg_dir="/var/lib/sandtrap-loadavg")
    _check_bind("/var/lib/sandtrap-loadavg/proc/loadavg:/proc/loadavg:ro", policy)
    _check_bind("/var/lib/lxcfs/proc/loadavg:/proc/loadavg:ro", policy)
    for bind in (
        "/var/lib/sandtrap-loadavg/proc/loadavg:/proc/loadavg:rw",
        "/var/lib/sandtrap-loadavg/proc/meminfo:/proc/meminfo:ro",
        "/var/lib/sandtrap-loadavg/proc/loadavg:/proc/stat:ro",
        "/var/lib/sandtrap-loadavg:/proc/loadavg:ro",
    ):
        with pytest.raises(Refused):
            _check_bind(bind, policy)
    with pytest.raises(Refused):
        _check_bind("/var/lib/sandtrap-loadavg/proc/loadavg:/proc/loadavg:ro", Policy(lxcfs_dir="/var/lib/lxcfs"))
