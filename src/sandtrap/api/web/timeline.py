"""The dashboard's sessions-over-time chart: counts per hour, empty hours filled, drawn as SVG bars.

The repository lists only the hours that had sessions; the chart needs every bucket in its window,
zeros included. The bars are plain SVG attributes (no inline style), so the page's strict
Content-Security-Policy holds and no JavaScript is needed to draw them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from sandtrap.storage.records import HourCount

Range = Literal["24h", "7d", "30d", "all"]
RANGES: dict[str, tuple[str, timedelta | None, int]] = {
    # name: (label, window, hours per bar)
    "24h": ("last 24 hours", timedelta(hours=24), 1),
    "7d": ("last 7 days", timedelta(days=7), 1),
    "30d": ("last 30 days", timedelta(days=30), 6),
    "all": ("all time", None, 24),
}
MAX_BARS = 400


@dataclass(frozen=True)
class Bucket:
    start: datetime
    hours: int
    count: int

    @property
    def label(self) -> str:
        end = self.start + timedelta(hours=self.hours)
        if self.hours % 24 == 0:
            return f"{self.start:%Y-%m-%d} UTC: {self.count} sessions"
        return f"{self.start:%Y-%m-%d %H:%M}–{end:%H:%M} UTC: {self.count} sessions"


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    bucket: Bucket


@dataclass(frozen=True)
class Tick:
    x: float
    text: str


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    bars: list[Bar]
    ticks: list[Tick]
    max_count: int
    total: int


def floor_hour(moment: datetime) -> datetime:
    moment = moment.astimezone(UTC)
    return moment.replace(minute=0, second=0, microsecond=0)


def fill_hours(counts: Iterable[HourCount], start: datetime, end: datetime, hours_per_bucket: int = 1) -> list[Bucket]:
    """One bucket per ``hours_per_bucket`` from ``start`` to ``end`` (both hours, inclusive), zeros filled.

    Counts outside the window are dropped; buckets of several hours are aligned to ``start``.
    """
    step = max(1, hours_per_bucket)
    start, end = floor_hour(start), floor_hour(end)
    n = int((end - start) / timedelta(hours=1)) // step + 1 if end >= start else 0
    totals = [0] * n
    for item in counts:
        index = int((floor_hour(item.hour) - start) / timedelta(hours=1)) // step
        if item.hour >= start and 0 <= index < n:
            totals[index] += item.count
    return [Bucket(start + timedelta(hours=i * step), step, c) for i, c in enumerate(totals)]


def window(range_name: str, counts: list[HourCount], now: datetime) -> tuple[datetime, datetime, int]:
    """The chart's first and last hour and its hours per bar for a range name (see :data:`RANGES`)."""
    _, span, step = RANGES.get(range_name, RANGES["7d"])
    end = floor_hour(now)
    if counts and counts[-1].hour > end:
        end = floor_hour(counts[-1].hour)  # a clock behind the sensor's: still show the newest hour
    if span is not None:
        start = end - span + timedelta(hours=1)
    else:
        start = floor_hour(counts[0].hour) if counts else end - timedelta(days=6)
        start = start.replace(hour=0)
    hours = int((end - start) / timedelta(hours=1)) + 1
    while hours / step > MAX_BARS:
        step *= 2
    if 24 % step == 0:
        start -= timedelta(hours=start.hour % step)  # buckets start on the hour grid: 00, 06, 12, 18
    return start, end, step


def chart(buckets: list[Bucket], width: int = 1200, height: int = 170) -> Chart:
    """Bars scaled to the busiest bucket, with a handful of date ticks along the bottom."""
    plot_h = height - 20  # room for tick labels
    max_count = max((b.count for b in buckets), default=0)
    slot = width / max(1, len(buckets))
    gap = 1.0 if slot >= 4 else 0.0
    bars: list[Bar] = []
    for i, b in enumerate(buckets):
        h = 0.0 if max_count == 0 else round(plot_h * b.count / max_count, 2)
        if b.count and h < 1.5:
            h = 1.5  # one session still shows
        bars.append(Bar(round(i * slot, 2), round(plot_h - h, 2), round(max(slot - gap, 0.5), 2), h, b))
    ticks: list[Tick] = []
    if buckets:
        step = buckets[0].hours
        if step < 24 and len(buckets) * step > 48:  # several days of hours: label the midnights
            marks, fmt = [i for i, b in enumerate(buckets) if b.start.hour == 0], "%m-%d"
        else:
            marks, fmt = list(range(len(buckets))), "%H:%M" if step < 24 else "%m-%d"
        every = max(1, math.ceil(len(marks) / 8))
        ticks = [Tick(round(i * slot, 2), buckets[i].start.strftime(fmt)) for i in marks[::every]]
    return Chart(width, height, bars, ticks, max_count, sum(b.count for b in buckets))
