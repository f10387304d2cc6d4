"""The pool's size: the demand's target on a fake clock, the host's memory bound, parallel refill, shrinking."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pydantic import ValidationError

from sandtrap.config import SandboxSettings
from sandtrap.sandbox.personas import Persona
from sandtrap.sandbox.pool import Pool
from sandtrap.sandbox.sizing import Demand, Memory, missing, parse_meminfo

from fakes import FakeBackend, FakeSandbox

MiB = 1024 * 1024
GiB = 1024 * MiB


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_target_follows_the_arrival_rate_and_the_warm_up_time_within_floor_and_ceiling() -> None:
    clock = Clock()
    demand = Demand(3, 20, window_s=10.0, shrink_after_s=120.0, clock=clock)
    assert demand.target() == 3  # nothing arrived: the floor
    demand.warmed(2.0)
    for _ in range(20):  # 2 a second for 10 s: 2 * 2/s * 2 s = 8
        clock.now += 0.5
        demand.arrived()
    assert demand.rate() == pytest.approx(2.0)
    assert demand.target() == 8
    for _ in range(100):  # 10 a second: 2 * 10 * 2 = 40, capped at 20
        clock.now += 0.1
        demand.arrived()
    assert demand.target() == 20


def test_the_target_holds_its_peak_while_arrivals_pause_then_shrinks_to_the_floor() -> None:
    clock = Clock()
    demand = Demand(2, 30, window_s=10.0, shrink_after_s=60.0, clock=clock)
    demand.warmed(3.0)
    for _ in range(10):
        demand.arrived()
        clock.now += 0.25
    peak = demand.target()
    assert peak == 6  # 10 arrivals in 10 s window = 1/s; 2 * 1 * 3
    clock.now += 30  # the window has emptied, but not the hold
    assert demand.rate() == 0 and demand.target() == peak
    clock.now += 31
    assert demand.target() == 2


def test_warm_up_time_is_averaged_toward_the_latest() -> None:
    demand = Demand(0, 10)
    assert demand.warm_s == 1.0
    demand.warmed(2.0)
    assert demand.warm_s == 2.0
    demand.warmed(4.0)
    assert demand.warm_s == pytest.approx(2.6)


def test_meminfo_and_the_memory_bound() -> None:
    mem = parse_meminfo("MemTotal:       8000000 kB\nMemFree:  1 kB\nMemAvailable:    2000000 kB\n")
    assert mem == Memory(2000000 * 1024, 8000000 * 1024)
    assert mem.reserve == 800000 * 1024  # 10% of the total
    assert mem.boxes(256 * MiB) == (1200000 * 1024) // (256 * MiB)
    assert Memory(600 * MiB, 1 * GiB).boxes(256 * MiB) == 0  # under the 512 MiB floor of the reserve: no room
    assert parse_meminfo("MemTotal: 1 kB\n") is None and parse_meminfo("") is None


def test_missing_is_bounded_by_the_target_the_cap_and_memory() -> None:
    assert missing(8, warm=2, creating=1, live=5, cap=50, memory_room=None) == 5
    assert missing(8, warm=2, creating=1, live=48, cap=50, memory_room=None) == 2
    assert missing(8, warm=2, creating=1, live=5, cap=50, memory_room=3) == 3
    assert missing(2, warm=3, creating=0, live=5, cap=50, memory_room=None) == 0


def test_pool_max_below_pool_size_is_an_error_naming_both_keys() -> None:
    with pytest.raises(ValidationError, match=r"sandbox\.pool_max .* sandbox\.pool_size"):
        SandboxSettings(pool_size=5, pool_max=2)


class SlowBackend(FakeBackend):
    """Creates take a while (a few loop turns) and the most at once is counted."""

    def __init__(self) -> None:
        super().__init__()
        self.running = 0
        self.most = 0

    async def create(self, session: str = "", src_ip: str = "", persona: Persona | None = None) -> FakeSandbox:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(0.01)
            return await super().create(session, src_ip, persona)
        finally:
            self.running -= 1


class EngineWarmUps(Demand):
    """The fake's creates are instant; these warm-ups take what the real engine's take (3 s)."""

    def warmed(self, seconds: float) -> None:
        super().warmed(3.0)


def sized_pool(tmp_path: Path, clock: Clock, memory: Memory | None, **overrides: object) -> tuple[Pool, SlowBackend]:
    settings = SandboxSettings(**{"pool_size": 2, "pool_max": 12, "max_sandboxes": 40, **overrides})  # type: ignore[arg-type]
    backend = SlowBackend()
    pool: Pool = Pool(backend, settings, tmp_path / "ledger")  # type: ignore[arg-type]
    pool.demand = EngineWarmUps(settings.pool_size, settings.pool_max, shrink_after_s=60.0, clock=clock)
    pool.memory = lambda: memory
    return pool, backend


async def burst(pool: Pool, clock: Clock, n: int, every_s: float) -> None:
    for i in range(n):
        await pool.acquire(f"b{i}", "198.51.100.9")
        clock.now += every_s


async def test_a_burst_grows_the_pool_in_parallel_batches_and_idleness_shrinks_it(tmp_path: Path) -> None:
    clock = Clock()
    pool, backend = sized_pool(tmp_path, clock, Memory(16 * GiB, 32 * GiB), pool_refill_parallel=3)
    await pool.start()
    assert pool.warm == 2 and pool.demand.warm_s == pytest.approx(3.0)
    await burst(pool, clock, 20, 0.5)  # 2 a second over the 10 s window: 2 * 2 * 3 = 12 (pool_max)
    await pool.wait_refilled()
    assert pool.demand.target() == 12 and pool.warm == 12
    assert 3 <= backend.most <= 4  # pool_refill_parallel at once, and an acquire's own on-demand create
    clock.now += 30  # arrivals stopped; the hold is still on
    assert await pool.shrink() == 0 and pool.warm == 12
    clock.now += 31
    assert await pool.shrink() == 10 and pool.warm == 2 and pool.stats()["shrunk"] == 10
    await pool.close()


async def test_growth_stops_at_max_sandboxes_and_at_the_host_s_memory(tmp_path: Path) -> None:
    clock = Clock()
    pool, _ = sized_pool(tmp_path, clock, Memory(16 * GiB, 32 * GiB), max_sandboxes=14)
    await pool.start()
    await burst(pool, clock, 10, 0.5)
    await pool.wait_refilled()
    assert pool.active == 10 and pool.warm == 4  # 14 live at most
    await pool.close()

    # 0.5 GiB above the reserve (3.2 GiB of 32): room for two boxes of 256 MiB, whatever the demand says.
    pool, _ = sized_pool(tmp_path / "m", clock, Memory(int(3.7 * GiB), 32 * GiB), pool_size=0)
    await pool.start()
    await burst(pool, clock, 10, 0.5)
    await pool.wait_refilled()
    assert pool.warm == 2 and pool.stats()["memory_bound_hits"] >= 1
    await pool.close()


def test_refills_pause_while_logins_arrive_close_together_unless_few_boxes_are_warm() -> None:
    clock = Clock()
    demand = Demand(16, 20, clock=clock)
    assert demand.pause_s(10) == 0.0  # no login yet
    demand.arrived()
    clock.now += 0.2
    assert demand.pause_s(10) == pytest.approx(0.3)  # 0.5 s after the last login
    assert demand.pause_s(2) == 0.0 and demand.pause_s(0) == 0.0  # the low water: warm now
    clock.now += 0.3
    assert demand.pause_s(10) == 0.0


async def test_a_burst_is_served_from_the_warm_boxes_and_the_pool_refills_after_it(tmp_path: Path) -> None:
    clock = Clock()
    pool, backend = sized_pool(tmp_path, clock, Memory(16 * GiB, 32 * GiB), pool_size=6, pool_max=6)
    await pool.start()
    assert backend.created == 6
    for i in range(3):  # logins 0.1 s apart: no warm-up competes with them while more than 2 are warm
        await pool.acquire(f"b{i}", "198.51.100.9")
        clock.now += 0.1
        await asyncio.sleep(0.05)
    assert backend.created == 6 and pool.warm == 3
    clock.now += 1.0  # the burst is over: the pool refills
    await asyncio.wait_for(pool.wait_refilled(), 5)
    assert backend.created == 9 and pool.warm == 6
    for i in range(4):  # down to the low water: the refill starts at once, burst or not
        await pool.acquire(f"c{i}", "198.51.100.9")
    await asyncio.sleep(0.1)
    assert backend.created > 9
    await pool.close()
