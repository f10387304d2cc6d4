"""The loadavg file system's operations, called as libfuse (through mfusepy) calls them."""

import errno
import os
import signal
import stat
import threading
from pathlib import Path

import mfusepy
import pytest

from sandtrap.sandbox.host import loadavgfs
from sandtrap.sandbox.host.loadavgfs import LoadavgFs

FILE = "/proc/loadavg"


class Caller:
    """The reading process's host pid, as fuse_get_context gives it."""

    pid = 4321

    def __call__(self) -> int:
        return self.pid


@pytest.fixture
def caller() -> Caller:
    return Caller()


@pytest.fixture
def fs(caller: Caller) -> LoadavgFs:
    return LoadavgFs(lambda pid: f"0.00 0.00 0.00 1/2 {pid}\n".encode(), caller=caller, now=1_700_000_000)


def file_info(flags: int = os.O_RDONLY) -> mfusepy.fuse_file_info:
    """libfuse's struct, as mfusepy passes it with raw_fi."""
    fi = mfusepy.fuse_file_info()
    fi.flags = flags
    return fi


def refused(call: object, *args: object) -> int:
    assert callable(call)
    with pytest.raises(OSError) as info:
        call(*args)
    return int(info.value.errno or 0)


def test_the_tree_is_proc_loadavg_read_only_for_everyone(fs: LoadavgFs) -> None:
    for path in ("/", "/proc"):
        attrs = fs.getattr(path)
        assert stat.S_ISDIR(attrs["st_mode"]) and stat.S_IMODE(attrs["st_mode"]) == 0o555
    attrs = fs.getattr(FILE)
    assert stat.S_ISREG(attrs["st_mode"]) and stat.S_IMODE(attrs["st_mode"]) == 0o444
    assert attrs.get("st_size", 0) == 0  # as procfs says; reads come to us all the same
    assert attrs["st_mtime"] == 1_700_000_000 * 10**9
    for path in ("/loadavg", "/proc/meminfo", "/proc/loadavg/x", "/x"):
        assert refused(fs.getattr, path) == errno.ENOENT
    assert list(fs.readdir("/", 0)) == [".", "..", "proc"]
    assert list(fs.readdir("/proc", 0)) == [".", "..", "loadavg"]
    assert refused(fs.readdir, FILE, 0) == errno.ENOTDIR
    assert fs.statfs("/")["f_files"] == 3


def test_each_read_is_rendered_for_its_reader_and_bypasses_the_page_cache(fs: LoadavgFs, caller: Caller) -> None:
    fi = file_info()
    assert fs.open(FILE, fi) == 0
    assert fi.direct_io == 1 and fi.fh > 0  # every read reaches the daemon: the content is per reader
    caller.pid = 111
    assert fs.read(FILE, 4096, 0, fi) == b"0.00 0.00 0.00 1/2 111\n"
    # A later read of the same open file continues what its first read saw (a partial read never tears).
    caller.pid = 222
    assert fs.read(FILE, 4096, 5, fi) == b"0.00 0.00 1/2 111\n"
    assert fs.read(FILE, 4, 0, fi) == b"0.00"
    assert fs.read(FILE, 4096, 5, fi) == b"0.00 0.00 1/2 222\n"  # offset 0 rendered afresh for its reader
    other = file_info()
    fs.open(FILE, other)
    assert other.fh != fi.fh
    caller.pid = 333
    assert fs.read(FILE, 4096, 0, other) == b"0.00 0.00 0.00 1/2 333\n"
    fs.release(FILE, fi)
    fs.release(FILE, other)
    assert fs.open_files == {}


def test_open_files_kept_are_bounded(fs: LoadavgFs, monkeypatch: pytest.MonkeyPatch, caller: Caller) -> None:
    monkeypatch.setattr(loadavgfs, "MAX_OPEN", 3)
    handles = [file_info() for _ in range(10)]
    for fi in handles:
        fs.open(FILE, fi)
    assert list(fs.open_files) == [8, 9, 10]
    caller.pid = 5
    assert fs.read(FILE, 4096, 0, handles[0]) == b"0.00 0.00 0.00 1/2 5\n"  # forgotten: rendered afresh


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC])
def test_opening_for_writing_is_refused(fs: LoadavgFs, flags: int) -> None:
    assert refused(fs.open, FILE, file_info(flags)) == errno.EROFS
    assert fs.open_files == {}


def test_only_the_file_opens(fs: LoadavgFs) -> None:
    assert refused(fs.open, "/proc", file_info()) == errno.EISDIR
    assert refused(fs.open, "/proc/x", file_info()) == errno.ENOENT


WRITES = {
    "chmod": ("/proc/loadavg", 0o777),
    "chown": ("/proc/loadavg", 0, 0),
    "create": ("/proc/x", 0o644, file_info()),
    "link": ("/proc/x", "/proc/loadavg"),
    "mkdir": ("/x", 0o755),
    "mknod": ("/proc/x", 0o644, 0),
    "rename": ("/proc/loadavg", "/proc/x"),
    "rmdir": ("/proc",),
    "symlink": ("/proc/x", "/etc/shadow"),
    "truncate": ("/proc/loadavg", 0),
    "unlink": ("/proc/loadavg",),
    "utimens": ("/proc/loadavg", (0, 0)),
    "write": ("/proc/loadavg", b"1", 0, file_info()),
    "setxattr": ("/proc/loadavg", "user.x", b"1", 0),
    "removexattr": ("/proc/loadavg", "user.x"),
    "fallocate": ("/proc/loadavg", 0, 0, 4096, file_info()),
}


@pytest.mark.parametrize("name", sorted(WRITES))
def test_every_write_like_operation_is_refused(fs: LoadavgFs, name: str) -> None:
    method = getattr(fs, name)
    assert not getattr(method, "libfuse_ignore", False)  # handed to libfuse, not left to its ENOSYS
    assert refused(method, *WRITES[name]) == errno.EROFS


def test_no_attribute_shadows_an_operation_libfuse_is_given(fs: LoadavgFs) -> None:
    """mfusepy hands libfuse every attribute named as an operation: only ours may carry those names."""
    ours = {"getattr", "readdir", "open", "read", "release", "statfs", "init", "destroy", *WRITES}
    given = {
        name
        for name, *_ in mfusepy.fuse_operations._fields_
        if getattr(fs, name, None) is not None and not getattr(getattr(fs, name), "libfuse_ignore", False)
    }
    assert given == ours


def test_the_sampler_runs_between_init_and_destroy_without_the_stop_signals() -> None:
    """libfuse's loop thread alone takes SIGTERM/SIGINT/SIGHUP (it unmounts); the sampler samples."""
    sampled = threading.Event()
    masks: list[set[signal.Signals]] = []

    def sample() -> float:
        masks.append(signal.pthread_sigmask(signal.SIG_BLOCK, []))
        sampled.set()
        return 3600.0

    fs = LoadavgFs(lambda pid: b"", sample, caller=lambda: 1)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    fs.init("/")
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before  # the loop's thread keeps its mask
    assert sampled.wait(10)
    fs.destroy("/")
    assert fs.sampler is not None and not fs.sampler.is_alive()
    assert loadavgfs.STOP_SIGNALS <= masks[0]
    assert fs.served


def test_a_failing_sample_is_logged_and_the_sampler_goes_on(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loadavgfs, "RETRY_S", 0.0)
    calls: list[int] = []
    again = threading.Event()

    def sample() -> float:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("bug")
        again.set()
        return 3600.0

    fs = LoadavgFs(lambda pid: b"", sample, caller=lambda: 1)
    fs.init("/")
    try:
        assert again.wait(10)
    finally:
        fs.destroy("/")
    assert "sampling the load averages failed" in caplog.text


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
