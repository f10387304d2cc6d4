"""Handing freed memory back to the system after sessions end.

A session's buffers (its cast and raw-stream files' write buffers, its SSH channel windows, the sandbox calls
made in worker threads) are freed when it closes, but glibc keeps freed heap pages in its arenas (one per
worker thread that allocated), so after a burst of sessions the honeypot's RSS stays near its peak although
the memory is free. ``malloc_trim(0)`` returns the free pages of every arena to the kernel. It runs in a worker
thread, once a little after sessions close (coalesced: at most one trim every ``delay_s``), and never on a
platform without glibc (then it does nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

from sandtrap.events import SESSION_CLOSED, Event

log = logging.getLogger(__name__)

DELAY_S = 2.0


def _glibc_trim() -> Callable[[], int] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl and others: no malloc_trim
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: int(trim(0))


class MemoryTrim:
    """An event sink: a session's close schedules one trim ``delay_s`` later (later closes join it)."""

    def __init__(self, delay_s: float = DELAY_S, trim: Callable[[], int] | None = None) -> None:
        self.delay_s = delay_s
        self._trim = trim if trim is not None else _glibc_trim()
        self._pending: asyncio.Task[None] | None = None
        self.trims = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def write(self, event: Event) -> None:
        if event.eventid != SESSION_CLOSED or self._trim is None:
            return
        if self._pending is not None and not self._pending.done():
            return
        with contextlib.suppress(RuntimeError):  # no running loop (a replay tool): nothing to do
            self._pending = asyncio.get_running_loop().create_task(self._later())

    async def _later(self) -> None:
        await asyncio.sleep(self.delay_s)
        trim = self._trim
        if trim is None:
            return
        try:
            await asyncio.to_thread(trim)
            self.trims += 1
        except Exception:  # never the session's or the bus's problem
            log.exception("returning freed memory to the system failed")

    async def close(self) -> None:
        task, self._pending = self._pending, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
