"""The FUSE protocol of the loadavg file system: requests as the kernel sends them, replies checked by field."""

import errno
import os
import stat
import struct
from pathlib import Path

import pytest

from sandtrap.sandbox import loadavgfs
from sandtrap.sandbox.loadavgfs import (
    ATTR,
    ATTR_OUT,
    DIRENT,
    ENTRY_OUT,
    IN_HEADER,
    OPEN_OUT,
    OUT_HEADER,
    LoadavgFs,
)


def request(opcode: int, nodeid: int = 1, body: bytes = b"", pid: int = 4321, unique: int = 7) -> bytes:
    return IN_HEADER.pack(IN_HEADER.size + len(body), opcode, unique, nodeid, 0, 0, pid, 0, 0) + body


def reply(fs: LoadavgFs, msg: bytes) -> tuple[int, bytes]:
    out = fs.handle(msg)
    assert out is not None
    length, error, unique = OUT_HEADER.unpack_from(out)
    assert length == len(out) and unique == struct.unpack_from("<Q", msg, 8)[0]
    return -error, out[OUT_HEADER.size :]


def read_in(fh: int, offset: int = 0, size: int = 4096) -> bytes:
    return struct.pack("<QQIIQII", fh, offset, size, 0, 0, 0, 0)


@pytest.fixture
def fs() -> LoadavgFs:
    return LoadavgFs(lambda pid: f"0.00 0.00 0.00 1/2 {pid}\n".encode(), now=1_700_000_000)


def test_init_answers_the_kernels_major_and_at_most_our_minor(fs: LoadavgFs) -> None:
    error, body = reply(fs, request(loadavgfs.INIT, body=struct.pack("<IIII", 7, 44, 131072, 0xFFFFFFFF)))
    assert error == 0 and len(body) == 64
    major, minor, readahead, flags = struct.unpack_from("<IIII", body)
    assert (major, minor, readahead, flags) == (7, 31, 131072, 0)  # no optional feature asked for
    assert reply(fs, request(loadavgfs.INIT, body=struct.pack("<IIII", 8, 0, 0, 0)))[0] == errno.EPROTO


def lookup(fs: LoadavgFs, parent: int, name: bytes) -> tuple[int, bytes]:
    return reply(fs, request(loadavgfs.LOOKUP, parent, name + b"\0"))


def test_lookup_walks_proc_then_loadavg_and_nothing_else(fs: LoadavgFs) -> None:
    error, body = lookup(fs, 1, b"proc")
    assert error == 0
    nodeid = ENTRY_OUT.unpack_from(body)[0]
    attr = ATTR.unpack_from(body, ENTRY_OUT.size)
    assert stat.S_ISDIR(attr[9]) and stat.S_IMODE(attr[9]) == 0o555
    error, body = lookup(fs, nodeid, b"loadavg")
    assert error == 0
    attr = ATTR.unpack_from(body, ENTRY_OUT.size)
    assert stat.S_ISREG(attr[9]) and stat.S_IMODE(attr[9]) == 0o444 and attr[1] == 0  # size 0, as procfs says
    for parent, name in ((1, b"loadavg"), (nodeid, b".."), (nodeid, b"meminfo"), (3, b"x"), (99, b"proc")):
        assert lookup(fs, parent, name)[0] == errno.ENOENT


def test_each_read_is_rendered_for_the_reader(fs: LoadavgFs) -> None:
    error, body = reply(fs, request(loadavgfs.OPEN, 3, struct.pack("<II", os.O_RDONLY, 0)))
    fh, flags, _ = OPEN_OUT.unpack(body)
    assert error == 0 and flags & loadavgfs.FOPEN_DIRECT_IO
    assert reply(fs, request(loadavgfs.READ, 3, read_in(fh), pid=111)) == (0, b"0.00 0.00 0.00 1/2 111\n")
    # A later read of the same open file continues what its first read saw (a partial read never tears).
    assert reply(fs, request(loadavgfs.READ, 3, read_in(fh, 5), pid=222)) == (0, b"0.00 0.00 1/2 111\n")
    assert reply(fs, request(loadavgfs.READ, 3, read_in(fh, 0, 4), pid=222)) == (0, b"0.00")
    reply(fs, request(loadavgfs.RELEASE, 3, struct.pack("<QII", fh, 0, 0)))
    assert fs.open_files == {}


def test_open_files_kept_are_bounded(fs: LoadavgFs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loadavgfs, "MAX_OPEN", 3)
    for _ in range(10):
        reply(fs, request(loadavgfs.OPEN, 3, struct.pack("<II", os.O_RDONLY, 0)))
    assert list(fs.open_files) == [8, 9, 10]
    assert reply(fs, request(loadavgfs.READ, 3, read_in(1), pid=5)) == (0, b"0.00 0.00 0.00 1/2 5\n")


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC])
def test_opening_for_writing_is_refused(fs: LoadavgFs, flags: int) -> None:
    assert reply(fs, request(loadavgfs.OPEN, 3, struct.pack("<II", flags, 0)))[0] == errno.EROFS


@pytest.mark.parametrize("opcode", [4, 8, 9, 10, 11, 12, 13, 16, 21, 35])  # setattr, mknod, ..., write, create
def test_every_write_like_request_is_refused(fs: LoadavgFs, opcode: int) -> None:
    assert reply(fs, request(opcode, 3, b"\0" * 64))[0] == errno.EROFS


def test_directories_list_their_entries_in_pieces(fs: LoadavgFs) -> None:
    assert reply(fs, request(loadavgfs.OPEN, 2, struct.pack("<II", os.O_RDONLY, 0)))[0] == errno.EISDIR
    assert reply(fs, request(loadavgfs.OPENDIR, 3, struct.pack("<II", os.O_RDONLY, 0)))[0] == errno.ENOTDIR
    names, offset = [], 0
    while True:
        error, body = reply(fs, request(loadavgfs.READDIR, 2, read_in(0, offset, 32)))  # one entry fits
        assert error == 0
        if not body:
            break
        ino, offset, namelen, kind = DIRENT.unpack_from(body)
        names.append((ino, body[DIRENT.size : DIRENT.size + namelen], kind))
    assert names == [(2, b".", 4), (1, b"..", 4), (3, b"loadavg", 8)]


def test_getattr_statfs_and_unknown_requests(fs: LoadavgFs) -> None:
    error, body = reply(fs, request(loadavgfs.GETATTR, 1, b"\0" * 16))
    assert error == 0 and ATTR.unpack_from(body, ATTR_OUT.size)[0] == 1
    assert reply(fs, request(loadavgfs.GETATTR, 42, b"\0" * 16))[0] == errno.ENOENT
    assert reply(fs, request(loadavgfs.STATFS, 1))[0] == 0
    assert reply(fs, request(loadavgfs.GETXATTR, 3, b"\0" * 8 + b"user.x\0"))[0] == errno.ENOSYS
    assert reply(fs, request(9999, 3))[0] == errno.ENOSYS
    assert fs.handle(request(loadavgfs.FORGET, 3, b"\0" * 8)) is None
    assert fs.handle(request(loadavgfs.INTERRUPT, 3, b"\0" * 8)) is None
    assert reply(fs, request(loadavgfs.DESTROY))[0] == 0 and fs.destroyed


@pytest.mark.parametrize("msg", [b"", b"\x01" * 10, request(loadavgfs.READ, 3, b"short"), request(loadavgfs.INIT)])
def test_short_or_malformed_requests_never_raise(fs: LoadavgFs, msg: bytes) -> None:
    out = fs.handle(msg)
    assert out is None or OUT_HEADER.unpack_from(out)[1] == -errno.EINVAL


def test_the_daemon_confines_itself_to_a_cpu_quota(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cpu = tmp_path / "cpu"
    (cpu / loadavgfs.CPU_CGROUP).mkdir(parents=True)
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"30 25 0:27 / {cpu} rw - cgroup cgroup rw,cpu,cpuacct\n")
    d = Path(loadavgfs.confine_cpu(0.25, str(mountinfo)) or "")
    assert (d / "cpu.cfs_quota_us").read_text() == "2500" and (d / "cpu.cfs_period_us").read_text() == "10000"
    assert (d / "cgroup.procs").read_text() == str(os.getpid())
    mountinfo.write_text(f"30 25 0:27 / {tmp_path / 'v2'} rw - cgroup2 cgroup2 rw\n")
    (tmp_path / "v2" / loadavgfs.CPU_CGROUP).mkdir(parents=True)
    assert (Path(loadavgfs.confine_cpu(0.25, str(mountinfo)) or "") / "cpu.max").read_text() == "2500 10000"
    mountinfo.write_text("")
    assert loadavgfs.confine_cpu(0.25, str(mountinfo)) is None
    assert "without a CPU quota" in caplog.text
