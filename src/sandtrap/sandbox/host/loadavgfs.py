"""A read-only FUSE file system holding one file, ``proc/loadavg``, whose content depends on who reads it.

Bind-mounted read-only over each box's /proc/loadavg (``DockerBackend``); the content is
:class:`sandtrap.sandbox.host.loadavg.LoadavgView`'s for the reader's host pid, which libfuse hands over with
every request (``fuse_get_context``). libfuse 3 (Debian's ``libfuse3-3``, which lxcfs needs too) speaks the
kernel's protocol, through mfusepy's ctypes bindings; its loop runs on one thread, and a second one samples
the load averages every 5 s.

Run as root on the engine's host: ``sandtrap loadavgfs`` (scripts/setup.sh starts it as it starts lxcfs).
Nothing a box sends reaches it but reads: the mount is read-only, every write-like request is refused.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from sandtrap.sandbox.host.loadavg import LoadavgView, parse_layout

log = logging.getLogger(__name__)

# mfusepy loads libfuse when imported: libfuse 3 here (an operator may name another in FUSE_LIBRARY_NAME).
os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
try:
    import mfusepy
except (OSError, AttributeError) as exc:  # no libfuse (OSError), or one too old (AttributeError)
    log.error("loadavgfs cannot load libfuse 3 (mfusepy: %s): install the libfuse3-3 package", exc)
    raise OSError(
        errno.ELIBACC, f"no libfuse 3 ({exc}): apt-get install libfuse3-3 (scripts/setup.sh installs it)"
    ) from exc

# The name a box reads in /proc/mounts for its /proc/loadavg: lxcfs's own, as its other /proc files there (on
# LXC/LXD hosts every one of them is lxcfs's). Never the honeypot's name. This mount is told from lxcfs's on the
# host by its mount point (sandbox.loadavg_dir).
FSNAME = "lxcfs"
FSTYPE = "fuse." + FSNAME
FILE = "proc/loadavg"
DIRS = {"/": ("proc",), "/proc": ("loadavg",)}
MAX_OPEN = 4096  # open files whose first read's content is kept for their later reads
RETRY_S = 5.0  # after a failed sample

CPU_SHARE = 0.25  # of one CPU, at most, for every loadavgfs daemon of the host together (a cgroup of theirs)
CPU_CGROUP = "sandtrap-loadavgfs"
MNT_DETACH = 2
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}  # libfuse's: it leaves its loop and unmounts


def _caller_pid() -> int:
    return int(mfusepy.fuse_get_context()[2])


def _read_only(*_args: object) -> int:
    raise mfusepy.FuseOSError(errno.EROFS)


class LoadavgFs(mfusepy.Operations):
    """The file system's operations: ``render(pid) -> bytes`` is the file for the reader with host pid
    ``pid``; ``sample() -> seconds until due`` runs on a thread of its own between init and destroy."""

    use_ns = True  # times in nanoseconds (mfusepy's deprecation of float seconds)

    def __init__(
        self,
        render: Callable[[int], bytes],
        sample: Callable[[], float] | None = None,
        caller: Callable[[], int] = _caller_pid,
        now: float | None = None,
    ):
        self.render = render
        self.sample = sample
        self.caller = caller
        self.mtime_ns = int((time.time() if now is None else now) * 1e9)
        self.open_files: OrderedDict[int, bytes | None] = OrderedDict()
        self.next_fh = 1
        # Not named as an operation (mfusepy hands libfuse every attribute named as one: ``lock``, ...).
        self.view_lock = threading.Lock()  # the view is shared by the loop's thread and the sampler's
        self.stopped = threading.Event()
        self.sampler: threading.Thread | None = None
        self.served = False  # libfuse's loop ran (the kernel's INIT came)

    # Every write-like operation (the mount is read-only too, so the kernel refuses most of them first).
    chmod = chown = create = link = mkdir = mknod = rename = rmdir = symlink = _read_only
    truncate = unlink = utimens = write = setxattr = removexattr = fallocate = _read_only

    def getattr(self, path: str, fh: object = None) -> dict[str, int]:
        t = self.mtime_ns
        if path in DIRS:
            return {"st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2, "st_atime": t, "st_mtime": t, "st_ctime": t}
        if path == "/" + FILE:
            # Size 0, as procfs says; every read comes to us all the same (direct I/O).
            return {"st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_atime": t, "st_mtime": t, "st_ctime": t}
        raise mfusepy.FuseOSError(errno.ENOENT)

    def readdir(self, path: str, fh: int) -> Iterable[str]:
        if path not in DIRS:
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        return [".", "..", *DIRS[path]]

    def open(self, path: str, fi: Any) -> int:
        """``fi`` is libfuse's ``fuse_file_info`` (``raw_fi``): direct I/O, so every read comes to us (the
        content is per reader, never the page cache's)."""
        if path != "/" + FILE:
            raise mfusepy.FuseOSError(errno.EISDIR if path in DIRS else errno.ENOENT)
        if fi.flags & os.O_ACCMODE != os.O_RDONLY:
            raise mfusepy.FuseOSError(errno.EROFS)
        fh = self.next_fh
        self.next_fh += 1
        self.open_files[fh] = None
        while len(self.open_files) > MAX_OPEN:
            self.open_files.popitem(last=False)  # forgotten: its next read renders afresh
        fi.fh = fh
        fi.direct_io = 1
        return 0

    def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
        """The content at the first read of an open file, kept for its later reads (as seq_file does)."""
        fh = fi.fh
        content = self.open_files.get(fh)
        if content is None or offset == 0:
            with self.view_lock:
                content = self.render(self.caller())
            if fh in self.open_files:
                self.open_files[fh] = content
        return content[offset : offset + size]

    def release(self, path: str, fi: Any) -> int:
        self.open_files.pop(fi.fh, None)
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_namemax": 255, "f_files": 3}

    def init(self, path: str) -> None:
        self.served = True
        if self.sample is None:
            return
        self.sampler = threading.Thread(target=self._sample_loop, name="loadavg-sampler", daemon=True)
        # libfuse's loop thread alone takes the stop signals: the sampler starts with them blocked.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self.sampler.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def destroy(self, path: str) -> None:
        self.stopped.set()
        if self.sampler is not None:
            self.sampler.join(timeout=5)

    def _sample_loop(self) -> None:
        assert self.sample is not None
        due = 0.0
        while not self.stopped.wait(due):
            try:
                with self.view_lock:
                    due = self.sample()
            except Exception:  # a bug must not stop the load averages of every box for good
                log.exception("sampling the load averages failed")
                due = RETRY_S


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return libc


def mounted_here(mountpoint: str) -> bool:
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        return any(
            line.split()[4] == target and line.partition(" - ")[2].startswith(FSTYPE + " ")
            for line in f
            if " - " in line
        )


def unmount(mountpoint: str) -> None:
    if _libc().umount2(os.fsencode(mountpoint), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {mountpoint}: {os.strerror(err)}")


def detach_dead(mountpoint: str) -> None:
    """Detach a mount of ours whose daemon died (ENOTCONN); refuse a live one (EBUSY)."""
    if not mounted_here(mountpoint):
        return
    try:
        # A read, not a stat: the kernel answers a stat from its attribute cache for a second after the daemon
        # died, while every read goes to the daemon (direct I/O).
        with open(os.path.join(mountpoint, FILE), "rb") as f:
            f.read(256)
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise
        log.warning("detaching a dead %s mount on %s", FSTYPE, mountpoint)
        unmount(mountpoint)
    else:
        raise OSError(errno.EBUSY, f"{mountpoint}: a live {FSTYPE} is mounted there already")


def confine_cpu(share: float, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Move this process into a cgroup of its own with a CPU quota (cgroup v1 ``cpu`` or v2 ``cpu.max``);
    the cgroup's directory, or None (logged) where the host does not allow it."""
    period = 10_000  # a short period: a throttled daemon makes a reader wait 7.5 ms at most, not 75
    quota = max(1000, int(share * period))
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as f:
            mounts = [(line.split()[4], line.partition(" - ")[2].split()) for line in f if " - " in line]
        v1 = next((m for m, t in mounts if len(t) >= 3 and t[0] == "cgroup" and "cpu" in t[2].split(",")), None)
        v2 = next((m for m, t in mounts if t and t[0] == "cgroup2"), None)
        if v1:
            d = Path(v1) / CPU_CGROUP
            d.mkdir(exist_ok=True)
            (d / "cpu.cfs_period_us").write_text(str(period))
            (d / "cpu.cfs_quota_us").write_text(str(quota))
        elif v2:
            d = Path(v2) / CPU_CGROUP
            d.mkdir(exist_ok=True)
            (d / "cpu.max").write_text(f"{quota} {period}")
        else:
            raise OSError(errno.ENOENT, "no cgroup cpu controller mounted")
        (d / "cgroup.procs").write_text(str(os.getpid()))
    except OSError as exc:
        log.warning("loadavgfs runs without a CPU quota (%s): a box reading in a loop can take a CPU", exc)
        return None
    return str(d)


def serve(mountpoint: str) -> None:
    """Mount, then serve until SIGTERM/SIGINT/SIGHUP or an unmount; libfuse unmounts on the way out."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        layout = parse_layout(f.read())
    if layout is None:
        log.warning("no cgroup hierarchy found: every reader gets the host's /proc/loadavg")
    view = LoadavgView(layout)
    # Below the host's own work, and a quarter of a CPU at most: a box reading in a loop slows the boxes'
    # loadavg reads, never the host.
    os.setpriority(os.PRIO_PROCESS, 0, 10)
    confine_cpu(CPU_SHARE)
    detach_dead(mountpoint)
    Path(mountpoint).mkdir(parents=True, exist_ok=True)
    log.info("%s serving %s/%s", FSTYPE, mountpoint, FILE)
    fs = LoadavgFs(view.read, view.sample)
    try:
        mfusepy.FUSE(
            fs,
            mountpoint,
            raw_fi=True,  # open() sets direct_io in libfuse's fuse_file_info
            foreground=True,
            nothreads=True,  # one request at a time: the view is not thread-safe and needs no more
            ro=True,
            nosuid=True,
            nodev=True,
            noexec=True,
            allow_other=True,  # the boxes' processes, as any user
            default_permissions=True,  # the kernel checks the modes (0555, 0444)
            fsname=FSNAME,
            subtype=FSNAME,
        )
    except RuntimeError as exc:  # fuse_main's status, libfuse's reason logged before it
        if not fs.served:
            raise OSError(errno.EIO, f"libfuse could not mount {mountpoint} (fuse_main returned {exc})") from exc
        # libfuse's loop ends with the stop signal's number as its status (fuse_main then returns 8), having
        # unmounted: a stop as asked for, unless /dev/fuse failed (libfuse logs that).
        log.info("%s on %s stopped (libfuse status %s)", FSTYPE, mountpoint, exc)
    else:
        log.info("%s on %s stopped (unmounted)", FSTYPE, mountpoint)
