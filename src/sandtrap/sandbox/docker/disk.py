"""A disk bound for boxes on overlay2 over a file system without project quotas (ext4): the honeypot measures each
running box's writable layer (the engine's overlay upper dir, on this host) and, past ``sandbox.docker.disk_quota``
bytes or ``disk_files_max`` entries, freezes the box at once (the engine's pause: the cgroup freezer), reports
it (the box's connections end with ``sandtrap.limit.hit`` ``disk_quota``) and stops it, kept for forensics.

Nothing shows in the box: no mount, no ``df`` figure changes (the attacker sees the host's file system as before
and is cut off only past the quota). The cost is bounded: a measure is one ``lstat`` per entry of the layer (a
fresh box's layer holds about 50: under a millisecond), at most ``disk_files_max`` entries, in a worker thread;
each box is looked at every ``disk_check_s`` at rest (a box whose measure takes long, less often: at most 1% of
a core per box, at least every 10 s) and sooner while its layer grows (when, at the growth just seen, a quarter of
the room left would be gone); a writer fast enough to pass the quota before the next look lands is frozen at once,
under it (by what it writes in ``MIN_CHECK_S + FREEZE_S``). Between looks, one ``statvfs`` of the layers' file system every ``MIN_CHECK_S`` (one for all
boxes): when its free space falls by ``PULSE_BYTES`` or more since the last one, every box is looked at now, so a
writer that starts between two looks at rest is seen within a fraction of a second, not at the next look.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sandtrap.errors import SandboxError
from sandtrap.sandbox.docker import engine
from sandtrap.sandbox.docker.sandbox import DockerSandbox

log = logging.getLogger(__name__)

MIN_CHECK_S = 0.05  # the soonest a growing box is looked at again
COST_SHARE = 100  # a box at rest is looked at no more often than every 100 times its last measure took
MAX_CHECK_S = 10.0  # ...and at least this often (a layer of disk_files_max entries: ~2-10 s to measure)
FREEZE_S = 0.2  # from a measure to the box frozen (the engine's pause), under load
PULSE_BYTES = 8 * 1024 * 1024  # the host file system's free space fallen this much since the last pulse: look now


@dataclass(frozen=True, slots=True)
class Usage:
    """A writable layer's size: bytes on disk (allocated blocks), entries, and whether the walk was cut short."""

    bytes: int
    files: int
    cut: bool = False


def measure(top: str, max_files: int) -> Usage | None:
    """du of ``top`` (allocated blocks, every entry once per name, symlinks not followed), stopping after
    ``max_files`` entries; None if ``top`` is gone (the box was removed)."""
    total = files = 0
    stack = [top]
    first = True
    while stack:
        path = stack.pop()
        try:
            with os.scandir(path) as entries:
                for entry in entries:
                    files += 1
                    if files > max_files:
                        return Usage(total, files, cut=True)
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue  # removed meanwhile
                    total += st.st_blocks * 512
                    if stat.S_ISDIR(st.st_mode):
                        stack.append(entry.path)
        except FileNotFoundError:
            if first:
                return None
        except OSError:
            pass  # unreadable or removed meanwhile
        first = False
    return Usage(total, files)


def timed_measure(top: str, max_files: int) -> tuple[Usage | None, float]:
    """The layer's usage and the seconds its measure took."""
    started = time.perf_counter()
    usage = measure(top, max_files)
    return usage, time.perf_counter() - started


@dataclass(frozen=True, slots=True)
class Overrun:
    """A box past its disk bound: ``reason`` is ``disk_quota`` (bytes) or ``disk_files`` (entries)."""

    sandbox_id: str
    name: str
    reason: str
    bytes: int
    files: int


Report = Callable[[Overrun], object]


@dataclass(slots=True)
class _Watched:
    sandbox: DockerSandbox
    upper: str
    last_bytes: int = 0
    last_at: float = 0.0
    task: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class DiskWatch:
    """Each running box's writable layer, measured and bounded (see the module's doc). One small task per box, its
    measures in the loop's worker threads: a layer of many entries holds up no other box's looks."""

    def __init__(self, quota: int, max_files: int, interval_s: float) -> None:
        self.quota = quota
        self.max_files = max_files
        self.interval_s = interval_s
        self.report: Report | None = None  # set by the composition root: the bridge ends the box's connections
        self._boxes: dict[str, _Watched] = {}
        self.measures = 0
        self.measure_s = 0.0  # time spent measuring, all boxes, in worker threads
        self.overruns = 0
        self.pulses = 0  # looks at every box brought forward by the host file system's free space falling
        self._pulse: asyncio.Task[None] | None = None

    def watch(self, sandbox: DockerSandbox, upper: str) -> None:
        self.forget(sandbox.id)
        watched = _Watched(sandbox, upper)
        watched.task = asyncio.get_running_loop().create_task(self._watch(watched))
        self._boxes[sandbox.id] = watched
        if self._pulse is None or self._pulse.done():
            self._pulse = asyncio.get_running_loop().create_task(self._pulse_loop(upper))

    async def _pulse_loop(self, upper: str) -> None:
        """While any box is watched: the free space of the file system its layer is on, every MIN_CHECK_S; a fall
        of PULSE_BYTES or more wakes every box's watch (one syscall for all boxes, in the loop: it does not block)."""
        last = -1
        while self._boxes:
            try:
                st = os.statvfs(upper)
            except OSError:
                upper = next((w.upper for w in self._boxes.values()), "")
                if not upper:
                    return
                await asyncio.sleep(MIN_CHECK_S)
                continue
            free = st.f_bavail * st.f_frsize
            if last >= 0 and last - free >= PULSE_BYTES:
                self.pulses += 1
                for w in self._boxes.values():
                    w.wake.set()
            last = free
            await asyncio.sleep(MIN_CHECK_S)

    def forget(self, sandbox_id: str) -> None:
        watched = self._boxes.pop(sandbox_id, None)
        if watched is not None and watched.task is not None and watched.task is not asyncio.current_task():
            watched.task.cancel()

    @property
    def watched(self) -> int:
        return len(self._boxes)

    async def close(self) -> None:
        tasks = [w.task for w in self._boxes.values() if w.task is not None]
        if self._pulse is not None:
            tasks.append(self._pulse)
            self._pulse = None
        self._boxes.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _watch(self, w: _Watched) -> None:
        while self._boxes.get(w.sandbox.id) is w:
            usage, took_s = await asyncio.to_thread(timed_measure, w.upper, self.max_files)
            self.measures += 1
            self.measure_s += took_s
            next_s = await self._judge(w, usage, took_s)
            if next_s is None:
                return
            w.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(w.wake.wait(), next_s)

    async def _judge(self, w: _Watched, usage: Usage | None, took_s: float) -> float | None:
        """Freeze and stop the box past its bound (None: watch no more), else when to look again."""
        now = time.monotonic()
        if usage is None:  # the layer is gone: the box was removed
            self.forget(w.sandbox.id)
            return None
        grown = usage.bytes - w.last_bytes
        rate = grown / max(1e-3, now - w.last_at) if w.last_at and grown > 0 else 0.0
        # A fast writer would be past the quota before the next look and the freeze land: it is frozen now.
        projected = usage.bytes + rate * (MIN_CHECK_S + FREEZE_S)
        reason = "disk_quota" if projected > self.quota else "disk_files" if usage.cut else ""
        if reason:
            self.forget(w.sandbox.id)
            await self._overrun(w, Overrun(w.sandbox.id, w.sandbox.name, reason, usage.bytes, usage.files))
            return None
        # At rest: every disk_check_s, less often for a layer whose measure takes long (many entries): a box's
        # looks take at most 1/COST_SHARE of a core, and every box is looked at within MAX_CHECK_S.
        next_s = max(self.interval_s, min(MAX_CHECK_S, took_s * COST_SHARE))
        if rate:
            next_s = min(next_s, max(MIN_CHECK_S, (self.quota - usage.bytes) / rate / 4))
        w.last_bytes, w.last_at = usage.bytes, now
        return next_s

    async def _overrun(self, w: _Watched, overrun: Overrun) -> None:
        self.overruns += 1
        box = w.sandbox
        try:  # the freezer first: not one more write
            await engine.call("pause", box._container().pause(), 10)
        except SandboxError as exc:
            log.warning("box %s: pausing past its disk bound failed (%s); stopping it", box.name, exc)
        log.warning(
            "box %s past its disk bound (%s): %d MiB, %d entries in its writable layer; frozen and stopped",
            box.name,
            overrun.reason,
            overrun.bytes // (1024 * 1024),
            overrun.files,
        )
        if self.report is not None:
            try:
                self.report(overrun)
            except Exception:
                log.exception("reporting box %s's disk overrun failed", box.name)
        try:
            await box.stop()
        except SandboxError as exc:
            log.warning("box %s: stopping past its disk bound failed: %s", box.name, exc)


async def upper_dir(sandbox: DockerSandbox) -> str:
    """The box's writable layer on this host ('' if the engine's storage driver has none)."""
    info = await engine.call("inspect", sandbox._container().show(), 10)
    data = (info.get("GraphDriver") or {}).get("Data") or {}
    upper = data.get("UpperDir") or ""
    if not isinstance(upper, str) or not upper:
        return ""
    return upper if await asyncio.to_thread(os.path.isdir, upper) else ""
