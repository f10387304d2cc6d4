"""How many warm boxes the pool holds: enough for the arrivals seen lately, within the host's memory.

Bookkeeping (the pool feeds it arrivals, warm-up times and /proc/meminfo's text; a test feeds it a fake
clock); only :func:`host_memory` reads a file. The target is what arrives while a box warms, twice over:

    target = ceil(headroom * rate * warm_s)   clamped to [pool_size, pool_max]

``rate`` is the arrivals of the last ``window_s`` (short: a burst counts within seconds) and ``warm_s`` an
average of the latest warm-ups (create, start, prepare). The target holds its peak for ``shrink_after_s`` after
the arrivals stop, then falls back to ``pool_size``: the pool shrinks again when idle, not between two waves
of one burst. Refills yield to logins (:meth:`Demand.pause_s`): a box's warm-up costs the host several times
a login's CPU (about 0.5 core-seconds against 0.1 on Docker, 2 cores), so while logins arrive less than
``quiet_s`` apart and more than ``low_water`` boxes are warm, no warm-up starts; a burst is served from the warm
boxes at a single login's speed, and the pool refills when it ends (or is nearly empty). Memory bounds it on top: a warm box may become a session's, which may use all of
``sandbox.memory``; no box is warmed unless MemAvailable, less a reserve for the host, has that much room.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Clock = Callable[[], float]

MiB = 1024 * 1024
MEMINFO = Path("/proc/meminfo")
QUIET_S = 0.5  # logins less than this far apart are a burst: refills wait for it to end
LOW_WATER = 2  # ... unless this few warm boxes are left (then waiting would leave a login with none)


@dataclass(frozen=True, slots=True)
class Memory:
    available: int  # bytes: MemAvailable
    total: int  # bytes: MemTotal

    @property
    def reserve(self) -> int:
        """What the host keeps for itself (the honeypot, the engine, page cache): 10% and at least 512 MiB."""
        return max(512 * MiB, self.total // 10)

    def boxes(self, per_box: int) -> int:
        """How many more boxes of ``per_box`` bytes fit in what is available above the reserve."""
        return max(0, (self.available - self.reserve) // max(1, per_box))


def parse_meminfo(text: str) -> Memory | None:
    """MemAvailable and MemTotal from /proc/meminfo's text; None if either is missing."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if key in ("MemAvailable", "MemTotal") and parts and parts[0].isdigit():
            values[key] = int(parts[0]) * 1024
    if "MemAvailable" not in values or "MemTotal" not in values:
        return None
    return Memory(values["MemAvailable"], values["MemTotal"])


def host_memory() -> Memory | None:
    """The host's MemAvailable and MemTotal (None where /proc/meminfo cannot be read)."""
    try:
        return parse_meminfo(MEMINFO.read_text(encoding="ascii"))
    except OSError:
        return None


class Demand:
    """Arrivals and warm-up times in, a warm target out."""

    def __init__(
        self,
        floor: int,
        ceiling: int,
        *,
        window_s: float = 10.0,
        shrink_after_s: float = 120.0,
        headroom: float = 2.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.floor = floor
        self.ceiling = max(floor, ceiling)
        self.window_s = window_s
        self.shrink_after_s = shrink_after_s
        self.headroom = headroom
        self._clock = clock
        self._arrivals: deque[float] = deque()
        self._warm_s: float | None = None
        self._peak = floor
        self._peak_at = clock()

    @property
    def warm_s(self) -> float:
        """The recent warm-up time (an average weighted to the latest); 1 s before any was seen."""
        return 1.0 if self._warm_s is None else self._warm_s

    def arrived(self) -> None:
        self._arrivals.append(self._clock())

    def pause_s(self, warm: int, quiet_s: float = QUIET_S, low_water: int = LOW_WATER) -> float:
        """How long a refill should wait before warming another box (0: now): until ``quiet_s`` after the last
        arrival, while more than ``low_water`` boxes are warm."""
        if warm <= low_water or not self._arrivals:
            return 0.0
        return max(0.0, self._arrivals[-1] + quiet_s - self._clock())

    def warmed(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self._warm_s = seconds if self._warm_s is None else 0.7 * self._warm_s + 0.3 * seconds

    def rate(self) -> float:
        """Arrivals a second over the last ``window_s``."""
        now = self._clock()
        while self._arrivals and self._arrivals[0] <= now - self.window_s:
            self._arrivals.popleft()
        return len(self._arrivals) / self.window_s

    def target(self) -> int:
        """Warm boxes wanted now (memory aside): the recent demand's, held at its peak for ``shrink_after_s``."""
        now = self._clock()
        wanted = math.ceil(self.headroom * self.rate() * self.warm_s - 1e-9)
        wanted = min(self.ceiling, max(self.floor, wanted))
        if wanted >= self._peak or now - self._peak_at >= self.shrink_after_s:
            self._peak, self._peak_at = wanted, now
        return self._peak


def missing(target: int, warm: int, creating: int, live: int, cap: int, memory_room: int | None) -> int:
    """How many boxes to start warming now: up to the target, never past the cap on live boxes nor the memory's
    room (``None``: unknown, no bound)."""
    want = min(target - warm - creating, cap - live)
    if memory_room is not None:
        want = min(want, memory_room)
    return max(0, want)
