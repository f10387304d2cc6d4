"""Reading a box's files from the host: symlinks are never followed, only regular files are read."""

import os
from pathlib import Path

import pytest

from sandtrap.sandbox.base import ChangedFile
from sandtrap.sandbox.host import hostfs


@pytest.fixture
def box(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_bytes(b"root:x:0:0\n")
    (root / "tmp").mkdir()
    (tmp_path / "host-secret").write_bytes(b"host only")
    os.symlink(str(tmp_path / "host-secret"), root / "tmp" / "link")  # absolute: the host's file
    os.symlink("/", root / "hostroot")
    os.mkfifo(root / "tmp" / "fifo")
    return root


def test_reads_a_regular_file_with_its_mode(box: Path) -> None:
    data = hostfs.read_file(str(box), "/etc/passwd", 100)
    assert data is not None and data.data == b"root:x:0:0\n" and data.is_regular and data.size == 11


def test_metadata_only_and_over_the_cap(box: Path) -> None:
    meta = hostfs.read_file(str(box), "/etc/passwd", -1)
    assert meta is not None and meta.data is None and meta.size == 11
    big = hostfs.read_file(str(box), "/etc/passwd", 5)
    assert big is not None and big.data is None and big.size == 11


def test_a_symlink_is_reported_not_followed(box: Path) -> None:
    link = hostfs.read_file(str(box), "/tmp/link", 100)
    assert link is not None and not link.is_regular and link.data is None


def test_a_symlink_on_the_way_goes_to_the_engine(box: Path) -> None:
    with pytest.raises(hostfs.NeedEngine):
        hostfs.read_file(str(box), "/hostroot/etc/passwd", 100)


def test_dotdot_is_refused(box: Path) -> None:
    with pytest.raises(hostfs.NeedEngine):
        hostfs.read_file(str(box), "/etc/../../host-secret", 100)


def test_a_fifo_does_not_block_and_is_not_read(box: Path) -> None:
    fifo = hostfs.read_file(str(box), "/tmp/fifo", 100)
    assert fifo is not None and not fifo.is_regular


def test_missing_paths_are_none(box: Path) -> None:
    assert hostfs.read_file(str(box), "/etc/shadow", 100) is None
    assert hostfs.read_file(str(box), "/nope/shadow", 100) is None


def test_a_failed_verification_goes_to_the_engine(box: Path) -> None:
    with pytest.raises(hostfs.NeedEngine):
        hostfs.read_file(str(box), "/etc/passwd", 100, verify=lambda: False)


def test_upper_changes_added_changed_deleted(tmp_path: Path) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    (lower / "etc").mkdir(parents=True)
    (lower / "etc" / "motd").write_text("old")
    (lower / "etc" / "gone").write_text("x")
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "motd").write_text("new")
    (upper / "root").mkdir()
    (upper / "root" / "dropper.sh").write_text("#!/bin/sh")
    os.symlink("/etc/shadow", upper / "root" / "link")
    if os.geteuid() == 0:
        os.mknod(upper / "etc" / "gone", 0o600 | 0o020000, os.makedev(0, 0))  # a whiteout
    changes = sorted(hostfs.upper_changes(str(upper), [str(lower)]), key=lambda c: c.path)
    expected = [ChangedFile("/etc/motd", "C"), ChangedFile("/root/dropper.sh", "A")]
    if os.geteuid() == 0:
        expected.insert(0, ChangedFile("/etc/gone", "D"))
    assert changes == expected


def test_walks_are_bounded(tmp_path: Path) -> None:
    for i in range(50):
        (tmp_path / f"f{i}").write_text("x")
    assert len(list(hostfs.walk(str(tmp_path), limit=10))) == 10


def test_new_files_in_a_mount_since_a_time(box: Path) -> None:
    (box / "tmp" / "payload").write_bytes(b"x")
    assert hostfs.new_files(str(box), "/tmp", None) == ["/tmp/payload"]
    assert hostfs.new_files(str(box), "/tmp", 4e9) == []
