"""lxcfs binds: only files that exist, and none (not a crash) when the mount is broken."""

import errno
from pathlib import Path

import pytest

from sandtrap.sandbox.docker import LXCFS_FILES, lxcfs_binds


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
