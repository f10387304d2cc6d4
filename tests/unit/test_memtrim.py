"""The memory trim sink: one trim a little after sessions close, coalesced; other events do nothing."""

from __future__ import annotations

import asyncio

from sandtrap.events import SESSION_CLOSED, SESSION_CONNECT, Event
from sandtrap.memtrim import MemoryTrim, _glibc_trim


async def test_closes_coalesce_into_one_trim_after_the_delay() -> None:
    calls: list[int] = []
    trim = MemoryTrim(delay_s=0.05, trim=lambda: calls.append(1) or 1)
    trim.write(Event(eventid=SESSION_CONNECT))
    await asyncio.sleep(0.1)
    assert calls == []  # a connect frees nothing
    for _ in range(5):
        trim.write(Event(eventid=SESSION_CLOSED))
    assert calls == []  # never at once: the close's own work is not held up
    await asyncio.sleep(0.2)
    assert calls == [1] and trim.trims == 1
    trim.write(Event(eventid=SESSION_CLOSED))  # a later close: a trim of its own
    await asyncio.sleep(0.2)
    assert trim.trims == 2
    await trim.close()


async def test_a_failing_trim_is_logged_not_raised_and_close_cancels_a_pending_one() -> None:
    def broken() -> int:
        raise OSError("no")

    trim = MemoryTrim(delay_s=0.01, trim=broken)
    trim.write(Event(eventid=SESSION_CLOSED))
    await asyncio.sleep(0.1)
    assert trim.trims == 0
    later = MemoryTrim(delay_s=60, trim=lambda: 1)
    later.write(Event(eventid=SESSION_CLOSED))
    await later.close()
    assert later.trims == 0


def test_glibc_trim_is_found_here() -> None:
    trim = _glibc_trim()
    assert trim is not None and trim() in (0, 1)
