"""The lure file system daemon: one process per VM, serving that VM's lure tree read-only over FUSE.

``python -m sandtrap.sandbox.microvm.lurefs '<json>'`` (started by ``virtiofs.py``): it loads the tree
(``lure.LureTree``) from a host directory, mounts it (root: libfuse mounts with mount(2), no fusermount),
then, from libfuse's ``init`` on, runs as ``nobody`` with no capabilities and no new privileges. virtiofsd
exports the mount to the VM. Every open and read reaches it (``direct_io``, no attribute or entry cache) and
becomes one datagram on the events socket (``lure.py`` documents the wire), at most ``rate`` a second
(``burst`` at once); the rest are counted and reported as ``suppressed``. A full socket drops, never blocks.

It exits when its VM's QEMU does (a pidfd) or on SIGTERM; the honeypot unmounts what is left (``virtiofs.py``).
Nothing the guest sends can write: the mount is ``ro`` and every write-like operation is refused.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import pwd
import resource
import select
import signal
import socket
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any

from sandtrap.sandbox.microvm import lure

log = logging.getLogger(__name__)

os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
try:
    import mfusepy
except (OSError, AttributeError) as exc:
    raise OSError(errno.ELIBACC, f"no libfuse 3 ({exc}): apt-get install libfuse3-3") from exc

FSNAME = lure.FSNAME
FSTYPE = lure.FSTYPE
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
PR_SET_NO_NEW_PRIVS = 38
FLUSH_S = 1.0
LOG_MAX = 1024 * 1024


def _read_only(*_args: object) -> int:
    raise mfusepy.FuseOSError(errno.EROFS)


class LureFs(mfusepy.Operations):
    """The operations over a :class:`lure.LureTree`; ``send_event(message)`` sends one event (rate-bounded here)."""

    use_ns = True

    def __init__(self, tree: lure.LureTree, sock: socket.socket | None, rate: float, burst: int) -> None:
        self.tree = tree
        self.sock = sock
        self.limit = lure.RateLimit(rate, burst, time.monotonic())
        self.tree_lock = threading.Lock()  # the loop reads, the control thread adds honeytokens
        self.emit_lock = threading.Lock()
        self.dropped = 0  # refused by a full socket
        self.on_init: list[Any] = []  # run by init, after the mount (privileges dropped, threads started)
        self.served = False

    chmod = chown = create = link = mkdir = mknod = rename = rmdir = symlink = _read_only
    truncate = unlink = utimens = write = setxattr = removexattr = fallocate = _read_only

    def _node(self, path: str) -> lure.Node:
        with self.tree_lock:
            node = self.tree.lookup(path)
        if node is None:
            raise mfusepy.FuseOSError(errno.ENOENT)
        return node

    def send_event(self, message: dict[str, Any]) -> None:
        with self.emit_lock:
            if not self.limit.allow(time.monotonic()):
                return
            self._send(message)

    def _send(self, message: dict[str, Any]) -> None:
        if self.sock is None:
            return
        try:
            self.sock.send(lure.encode(message))
        except BlockingIOError:
            self.dropped += 1
        except (OSError, ValueError):
            pass  # the honeypot went away (a restart reconciles this VM) or an impossible path length

    def report_suppressed(self) -> None:
        with self.emit_lock:
            count = self.limit.take_suppressed() + self.dropped
            self.dropped = 0
            if count:
                self._send({"op": "suppressed", "count": count})

    def getattr(self, path: str, fh: object = None) -> dict[str, int]:
        node = self._node(path)
        t = node.mtime_ns
        return {
            "st_mode": node.mode, "st_nlink": 2 if node.is_dir else 1, "st_size": len(node.data),
            "st_uid": 0, "st_gid": 0, "st_atime": t, "st_mtime": t, "st_ctime": t,
        }  # fmt: skip

    def access(self, path: str, amode: int) -> int:
        self._node(path)
        if amode & os.W_OK:
            raise mfusepy.FuseOSError(errno.EROFS)
        return 0

    def readdir(self, path: str, fh: int) -> list[str]:
        with self.tree_lock:
            names = self.tree.listing(path)
        if names is None:
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        return [".", "..", *names]

    def opendir(self, path: str) -> int:
        if not self._node(path).is_dir:
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        self.send_event({"op": "opendir", "path": path})
        return 0

    def open(self, path: str, fi: Any) -> int:
        node = self._node(path)
        if node.is_dir:
            raise mfusepy.FuseOSError(errno.EISDIR)
        if fi.flags & os.O_ACCMODE != os.O_RDONLY or fi.flags & (os.O_TRUNC | os.O_APPEND | os.O_CREAT):
            raise mfusepy.FuseOSError(errno.EROFS)
        fi.direct_io = 1  # every read comes here, never the page cache's
        fi.keep_cache = 0
        self.send_event({"op": "open", "path": path})
        return 0

    def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
        data = self._node(path).data[offset : offset + size] if offset >= 0 else b""
        self.send_event({"op": "read", "path": path, "bytes": len(data), "offset": offset})
        return data

    def statfs(self, path: str) -> dict[str, int]:
        blocks = max(1, self.tree.bytes // 4096 + 1)
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": blocks, "f_namemax": 255, "f_files": self.tree.entries}

    def init(self, path: str) -> None:
        self.served = True
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # the threads leave the stop to the loop
        try:
            for hook in self.on_init:
                hook()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def drop_privileges(user: str = "nobody") -> None:
    """Become ``user`` (no supplementary groups, so no capabilities) and refuse new privileges for good."""
    try:
        entry = pwd.getpwnam(user)
        uid, gid = entry.pw_uid, entry.pw_gid
    except KeyError:
        uid = gid = 65534
    if os.getuid() == 0:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def _thread(target: Any, name: str) -> None:
    threading.Thread(target=target, name=name, daemon=True).start()


def _watch_qemu(pidfd: int) -> None:
    select.select([pidfd], [], [])  # readable when QEMU has exited
    log.info("QEMU exited: the lure file system stops")
    # To the main thread, which blocks in libfuse's read of /dev/fuse: a signal that another thread takes sets
    # libfuse's exit flag but does not interrupt that read, and the daemon would serve on.
    main = threading.main_thread().ident
    if main is not None:
        signal.pthread_kill(main, signal.SIGTERM)


def _control(fs: LureFs, sock: socket.socket) -> None:
    """Honeytokens added by the honeypot, into directories the root's listing does not show."""
    sock.setblocking(True)
    while True:
        try:
            data = sock.recv(lure.MAX_DATAGRAM)
        except OSError:
            return
        if not data:
            return
        added = lure.decode_add(data)
        if added is None:
            continue
        path, content, mode, mtime = added
        try:
            with fs.tree_lock:
                fs.tree.add(path, content, mode, mtime, hidden_dir=True)
        except ValueError as exc:
            log.warning("honeytoken not added: %s", exc)


def _flush(fs: LureFs) -> None:
    while True:
        time.sleep(FLUSH_S)
        fs.report_suppressed()


def serve(config: dict[str, Any]) -> int:
    mountpoint = str(config["mount"])
    tree = lure.LureTree.load(Path(config["source"]), int(config["max_bytes"]))
    pidfd = os.pidfd_open(int(config["qemu_pid"]))
    events = socket.socket(fileno=int(config["events_fd"])) if config.get("events_fd") is not None else None
    control = events.dup() if events is not None else None
    if events is not None:
        events.setblocking(False)
    fs = LureFs(tree, events, float(config["rate"]), int(config["burst"]))
    fs.on_init += [
        lambda: drop_privileges(str(config.get("user", "nobody"))),
        lambda: _thread(lambda: _watch_qemu(pidfd), "qemu-watch"),
        lambda: _thread(lambda: _flush(fs), "flush"),
    ]
    if control is not None:
        fs.on_init.append(lambda: _thread(lambda: _control(fs, control), "control"))
    # Bounds of its own: a hostile guest's requests cannot grow this process past them.
    limit_as = 512 * 1024 * 1024 + 2 * int(config["max_bytes"])
    resource.setrlimit(resource.RLIMIT_AS, (limit_as, limit_as))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # Its log (stderr, a file) stops at LOG_MAX: a write past it fails (EFBIG), the daemon serves on.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    logging.raiseExceptions = False
    resource.setrlimit(resource.RLIMIT_FSIZE, (LOG_MAX, LOG_MAX))
    os.setpriority(os.PRIO_PROCESS, 0, 10)
    log.info("%s serving %d files (%d bytes) on %s", FSTYPE, tree.entries, tree.bytes, mountpoint)
    try:
        mfusepy.FUSE(
            fs, mountpoint, raw_fi=True, foreground=True, nothreads=True, ro=True, nosuid=True, nodev=True,
            noexec=True, allow_other=True, default_permissions=True, fsname=FSNAME, subtype=FSNAME,
            attr_timeout=0, entry_timeout=0, negative_timeout=0,
        )  # fmt: skip
    except RuntimeError as exc:
        if not fs.served:
            log.error("libfuse could not mount %s (%s)", mountpoint, exc)
            return 1
    return 0


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s lurefs: %(message)s")
    if len(argv) != 2:
        print("usage: python -m sandtrap.sandbox.microvm.lurefs '<json config>'", file=sys.stderr)
        return 2
    config = json.loads(argv[1])
    if not stat.S_ISDIR(os.stat(config["mount"]).st_mode):
        return 2
    return serve(config)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
