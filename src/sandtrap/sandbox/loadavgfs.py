"""A read-only FUSE file system holding one file, ``proc/loadavg``, whose content depends on who reads it.

Bind-mounted read-only over each box's /proc/loadavg (``DockerBackend``); the content is
:class:`sandtrap.sandbox.loadavg.LoadavgView`'s for the reader's host pid, which the kernel puts in every
FUSE request. The daemon speaks the kernel's FUSE protocol (``linux/fuse.h``) on /dev/fuse itself: a file
system of three nodes needs no libfuse and no package beyond the standard library, and the protocol is a
stable kernel ABI. One thread serves the requests in turn and samples the load averages between them.

Run as root on the engine's host: ``sandtrap loadavgfs`` (scripts/setup.sh starts it as it starts lxcfs).
Nothing a box sends reaches it but reads: the mount is read-only, every write-like request is refused.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import signal
import stat
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FSTYPE = "fuse.sandtrap-loadavg"
FILE = "proc/loadavg"

# Opcodes (linux/fuse.h).
LOOKUP, FORGET, GETATTR = 1, 2, 3
OPEN, READ, STATFS, RELEASE = 14, 15, 17, 18
GETXATTR, LISTXATTR, FLUSH, INIT = 22, 23, 25, 26
OPENDIR, READDIR, RELEASEDIR, ACCESS = 27, 28, 29, 34
INTERRUPT, DESTROY, BATCH_FORGET = 36, 38, 42
_WRITES = {4, 6, 8, 9, 10, 11, 12, 13, 16, 21, 24, 35, 43, 45, 47}  # setattr, symlink, ..., copy_file_range
_NO_REPLY = {FORGET, BATCH_FORGET, INTERRUPT, 41}  # 41: notify_reply

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
ENTRY_OUT = struct.Struct("<QQQQII")  # nodeid, generation, entry_valid, attr_valid, *_nsec; then ATTR
ATTR_OUT = struct.Struct("<QII")  # attr_valid, attr_valid_nsec, dummy; then ATTR
OPEN_OUT = struct.Struct("<QII")  # fh, open_flags, padding
READ_IN = struct.Struct("<QQII")  # fh, offset, size, read_flags (lock_owner, flags follow)
STATFS_OUT = struct.Struct("<QQQQQIIII24x")
DIRENT = struct.Struct("<QQII")  # ino, off, namelen, type
FOPEN_DIRECT_IO = 1  # every read comes to us: the content is per reader, never the page cache's
KERNEL_MAJOR, OUR_MINOR = 7, 31
MAX_WRITE = 4096
BUFSIZE = 128 * 1024 + 4096
MAX_OPEN = 4096  # open files whose first read's content is kept for their later reads
VALID_S = 1

CPU_SHARE = 0.25  # of one CPU, at most, for every loadavgfs daemon of the host together (a cgroup of theirs)
CPU_CGROUP = "sandtrap-loadavgfs"
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MNT_DETACH = 2


@dataclass(frozen=True)
class Node:
    ino: int
    parent: int
    name: bytes
    is_dir: bool


NODES = {1: Node(1, 1, b"", True), 2: Node(2, 1, b"proc", True), 3: Node(3, 2, b"loadavg", False)}


class LoadavgFs:
    """The protocol, without the device: ``handle(request) -> reply or None``, ``render(pid) -> bytes``."""

    def __init__(self, render: Callable[[int], bytes], now: float | None = None):
        self.render = render
        self.mtime = int(time.time() if now is None else now)
        self.open_files: OrderedDict[int, bytes | None] = OrderedDict()
        self.next_fh = 1
        self.destroyed = False

    def handle(self, msg: bytes) -> bytes | None:
        if len(msg) < IN_HEADER.size:
            return None
        length, opcode, unique, nodeid, _uid, _gid, pid, _ext, _pad = IN_HEADER.unpack_from(msg)
        body = msg[IN_HEADER.size : length]
        if opcode in _NO_REPLY:
            return None
        try:
            error, data = self._dispatch(opcode, nodeid, pid, body)
        except (struct.error, ValueError):
            error, data = errno.EINVAL, b""
        return OUT_HEADER.pack(OUT_HEADER.size + len(data), -error, unique) + data

    def _dispatch(self, opcode: int, nodeid: int, pid: int, body: bytes) -> tuple[int, bytes]:
        node = NODES.get(nodeid)
        if opcode == INIT:
            major, minor, readahead, _flags = struct.unpack_from("<IIII", body)
            if major != KERNEL_MAJOR:
                return errno.EPROTO, b""
            return 0, INIT_OUT.pack(KERNEL_MAJOR, min(minor, OUR_MINOR), readahead, 0, 16, 12, MAX_WRITE, 1, 0, 0, 0)
        if opcode == DESTROY:
            self.destroyed = True
            return 0, b""
        if opcode in _WRITES:
            return errno.EROFS, b""
        if node is None:
            return errno.ENOENT, b""
        if opcode == LOOKUP:
            name = body.split(b"\0", 1)[0]
            child = next((n for n in NODES.values() if n.parent == node.ino and n.ino != 1 and n.name == name), None)
            if child is None or not node.is_dir:
                return errno.ENOENT, b""
            return 0, ENTRY_OUT.pack(child.ino, 0, VALID_S, VALID_S, 0, 0) + self._attr(child)
        if opcode == GETATTR:
            return 0, ATTR_OUT.pack(VALID_S, 0, 0) + self._attr(node)
        if opcode in (OPEN, OPENDIR):
            flags = struct.unpack_from("<I", body)[0]
            if node.is_dir != (opcode == OPENDIR):
                return (errno.EISDIR if node.is_dir else errno.ENOTDIR), b""
            if flags & os.O_ACCMODE != os.O_RDONLY:
                return errno.EROFS, b""
            if opcode == OPENDIR:
                return 0, OPEN_OUT.pack(0, 0, 0)
            return 0, OPEN_OUT.pack(self._open(), FOPEN_DIRECT_IO, 0)
        if opcode == READ:
            fh, offset, size, _ = READ_IN.unpack_from(body)
            return 0, self._read(fh, pid, offset)[: min(size, MAX_WRITE)]
        if opcode == READDIR:
            _, offset, size, _ = READ_IN.unpack_from(body)
            return 0, self._readdir(node, offset, size)
        if opcode == RELEASE:
            self.open_files.pop(struct.unpack_from("<Q", body)[0], None)
            return 0, b""
        if opcode in (RELEASEDIR, FLUSH):
            return 0, b""
        if opcode == STATFS:
            return 0, STATFS_OUT.pack(0, 0, 0, len(NODES), 0, 4096, 255, 4096, 0)
        return errno.ENOSYS, b""  # getxattr, access, ioctl, poll, ...: the kernel stops asking

    def _attr(self, node: Node) -> bytes:
        mode = (stat.S_IFDIR | 0o555) if node.is_dir else (stat.S_IFREG | 0o444)
        t = self.mtime
        return ATTR.pack(node.ino, 0, 0, t, t, t, 0, 0, 0, mode, 2 if node.is_dir else 1, 0, 0, 0, 1024, 0)

    def _open(self) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.open_files[fh] = None
        while len(self.open_files) > MAX_OPEN:
            self.open_files.popitem(last=False)  # forgotten: its next read renders afresh
        return fh

    def _read(self, fh: int, pid: int, offset: int) -> bytes:
        """The content at the first read of an open file, kept for its later reads (as seq_file does)."""
        content = self.open_files.get(fh)
        if content is None or offset == 0:
            content = self.render(pid)
            if fh in self.open_files:
                self.open_files[fh] = content
        return content[offset:]

    def _readdir(self, node: Node, offset: int, size: int) -> bytes:
        entries = [(node.ino, b"."), (node.parent, b"..")]
        entries += [(n.ino, n.name) for n in NODES.values() if n.parent == node.ino and n.ino != 1]
        out = b""
        for index, (ino, name) in enumerate(entries[offset:], offset + 1):
            kind = 4 if NODES[ino].is_dir else 8  # DT_DIR, DT_REG
            entry = DIRENT.pack(ino, index, len(name), kind) + name
            entry += b"\0" * (-len(entry) % 8)
            if len(out) + len(entry) > size:
                break
            out += entry
        return out


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
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


def mount(mountpoint: str) -> int:
    """Mount our file system on ``mountpoint`` (detaching a dead one of ours first); the /dev/fuse fd."""
    if mounted_here(mountpoint):
        try:
            os.stat(os.path.join(mountpoint, FILE))
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise
            log.warning("detaching a dead %s mount on %s", FSTYPE, mountpoint)
            unmount(mountpoint)
        else:
            raise OSError(errno.EBUSY, f"{mountpoint}: a live {FSTYPE} is mounted there already")
    Path(mountpoint).mkdir(parents=True, exist_ok=True)
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions,max_read={MAX_WRITE}"
    flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
    if _libc().mount(b"sandtrap-loadavg", os.fsencode(mountpoint), FSTYPE.encode(), flags, opts.encode()) != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, f"mount {FSTYPE} on {mountpoint}: {os.strerror(err)}")
    return fd


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
    """Mount, then serve until SIGTERM/SIGINT or an unmount; unmounts on the way out."""
    from sandtrap.sandbox.loadavg import LoadavgView, parse_layout

    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        layout = parse_layout(f.read())
    if layout is None:
        log.warning("no cgroup hierarchy found: every reader gets the host's /proc/loadavg")
    view = LoadavgView(layout)
    fs = LoadavgFs(view.read)
    # Below the host's own work, and a quarter of a CPU at most: a box reading in a loop slows the boxes'
    # loadavg reads, never the host.
    os.setpriority(os.PRIO_PROCESS, 0, 10)
    confine_cpu(CPU_SHARE)
    fd = mount(mountpoint)

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("%s serving %s/%s", FSTYPE, mountpoint, FILE)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while not fs.destroyed:
            if poller.poll(view.sample() * 1000):
                _serve_one(fd, fs)
    finally:
        os.close(fd)
        if mounted_here(mountpoint):
            try:
                unmount(mountpoint)
            except OSError as exc:
                log.warning("%s", exc)


def _serve_one(fd: int, fs: LoadavgFs) -> None:
    try:
        msg = os.read(fd, BUFSIZE)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.EAGAIN):  # interrupted before we read it
            return
        if exc.errno == errno.ENODEV:  # unmounted
            fs.destroyed = True
            return
        raise
    try:
        reply = fs.handle(msg)
    except Exception:  # a bug must not leave the reader hanging nor kill every box's /proc/loadavg
        log.exception("request failed")
        unique = IN_HEADER.unpack_from(msg)[2] if len(msg) >= IN_HEADER.size else 0
        reply = OUT_HEADER.pack(OUT_HEADER.size, -errno.EIO, unique)
    if reply is None:
        return
    try:
        os.write(fd, reply)
    except OSError as exc:
        if exc.errno != errno.ENOENT:  # the request was interrupted meanwhile
            raise
