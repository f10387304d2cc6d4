"""Opens of files inside boxes, seen from the host: one inotify descriptor (``IN_OPEN``) for every box.

A backend whose boxes' files are a directory on this host (Docker's overlay ``merged``, an nspawn tree) watches
the host path of a file in a box; nothing the attacker does inside can see or stop the watch (no FUSE mount or
audit rule to discover). Reports are bounded: one per file per second (``grep -r`` opens each file once).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import struct
import time
from collections.abc import Sequence
from pathlib import Path

from sandtrap.sandbox.base import ReadReport

log = logging.getLogger(__name__)

IN_OPEN = 0x00000020
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")
REPORT_INTERVAL_S = 1.0


class OpenWatch:
    """The watches of one box's files; :meth:`close` drops them."""

    def __init__(self, watcher: OpenWatcher, descriptors: list[int]) -> None:
        self._watcher = watcher
        self._descriptors = descriptors

    def close(self) -> None:
        descriptors, self._descriptors = self._descriptors, []
        self._watcher.drop(descriptors)


class OpenWatcher:
    """One inotify descriptor on the running event loop, shared by a backend's boxes."""

    def __init__(self) -> None:
        self._fd = -1
        self._libc: ctypes.CDLL | None = None
        self._watches: dict[int, tuple[str, ReadReport]] = {}  # wd -> (path in the box, report)
        self._last: dict[int, float] = {}

    def _ensure(self) -> bool:
        if self._fd >= 0:
            return True
        name = ctypes.util.find_library("c")
        if name is None:
            return False
        self._libc = ctypes.CDLL(name, use_errno=True)
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            return False
        self._fd = fd
        asyncio.get_running_loop().add_reader(fd, self._read)
        return True

    def watch(self, root: Path, paths: Sequence[str], report: ReadReport) -> OpenWatch | None:
        """Watch each of ``paths`` (in the box) under ``root`` (the box's root on this host); None if none can be."""
        if not root.is_dir() or not self._ensure():
            return None
        assert self._libc is not None
        descriptors = []
        for path in paths:
            wd = self._libc.inotify_add_watch(self._fd, os.fsencode(root / path.lstrip("/")), IN_OPEN)
            if wd < 0:
                log.info("cannot watch %s: errno %d", path, ctypes.get_errno())
                continue
            self._watches[wd] = (path, report)
            descriptors.append(wd)
        return OpenWatch(self, descriptors) if descriptors else None

    def drop(self, descriptors: Sequence[int]) -> None:
        for wd in descriptors:
            self._watches.pop(wd, None)
            self._last.pop(wd, None)
            if self._libc is not None and self._fd >= 0:
                self._libc.inotify_rm_watch(self._fd, wd)

    def close(self) -> None:
        if self._fd >= 0:
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
        self._watches.clear()

    def _read(self) -> None:
        try:
            data = os.read(self._fd, 64 * 1024)
        except BlockingIOError:
            return
        pos = 0
        now = time.monotonic()
        while pos + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, pos)
            pos += _EVENT.size + length
            entry = self._watches.get(wd)
            if entry is None or not mask & IN_OPEN:
                continue
            if now - self._last.get(wd, 0.0) < REPORT_INTERVAL_S:
                continue
            self._last[wd] = now
            path, report = entry
            try:
                report(path)
            except Exception:  # a reporter's failure never stops the watcher
                log.exception("reporting a read of %s failed", path)
