"""Pool bookkeeping on the fake backend: warm-up, acquire, refill, cap, release, retention, reconcile."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sandtrap.config import SandboxSettings
from sandtrap.errors import SandboxUnavailable
from sandtrap.sandbox.pool import Pool

from fakes import ChrootBackend, FakeBackend


def make_pool(tmp_path: Path, backend: FakeBackend | None = None, **overrides: object) -> tuple[Pool, FakeBackend]:
    backend = backend or FakeBackend()
    settings = SandboxSettings(**{"pool_size": 3, "max_sandboxes": 10, **overrides})  # type: ignore[arg-type]
    return Pool(backend, settings, tmp_path / "ledger"), backend  # type: ignore[arg-type]


async def test_start_warms_pool_size(tmp_path: Path) -> None:
    pool, backend = make_pool(tmp_path)
    seen: list[tuple[int, int]] = []
    await pool.start(lambda done, total: seen.append((done, total)))
    assert pool.warm == 3 and backend.created == 3
    assert seen[0] == (0, 3) and seen[-1] == (3, 3)


async def test_parallel_acquires_are_distinct_and_pool_refills(tmp_path: Path) -> None:
    pool, backend = make_pool(tmp_path)
    await pool.start()
    boxes = await asyncio.gather(*(pool.acquire(f"s{i}", "198.51.100.7") for i in range(5)))
    assert len({b.id for b in boxes}) == 5
    assert backend.created >= 5  # 3 warm + 2 on demand
    assert pool.on_demand_creations == 2
    await pool.wait_refilled()
    assert pool.warm == 3 and pool.active == 5


async def test_cap_refuses_when_no_warm_box(tmp_path: Path) -> None:
    pool, _ = make_pool(tmp_path, pool_size=1, max_sandboxes=2)
    await pool.start()
    await pool.acquire("a", "1.2.3.4")
    await pool.wait_refilled()
    await pool.acquire("b", "1.2.3.4")
    await pool.wait_refilled()
    assert pool.warm == 0  # the cap leaves no room to warm
    with pytest.raises(SandboxUnavailable, match="max_sandboxes"):
        await pool.acquire("c", "1.2.3.4")


async def test_release_stops_and_keeps(tmp_path: Path) -> None:
    pool, backend = make_pool(tmp_path, pool_size=0)
    box = await pool.acquire("sess1", "192.0.2.1")
    await pool.release(box)
    fake = backend.boxes[box.id]
    assert not fake.running and not fake.removed
    assert pool.preserved == 1 and pool.active == 0
    record = (tmp_path / "ledger" / f"{box.id}.json").read_text()
    assert '"session": "sess1"' in record and '"state": "preserved"' in record


async def test_retention_removes_oldest_beyond_keep(tmp_path: Path) -> None:
    pool, backend = make_pool(tmp_path, pool_size=0, retention_keep=2)
    boxes = [await pool.acquire(f"s{i}", "192.0.2.1") for i in range(4)]
    for b in boxes:
        await pool.release(b)
    assert pool.preserved == 2
    kept = set(backend.boxes)
    assert kept == {boxes[2].id, boxes[3].id}


async def test_retention_removes_by_age(tmp_path: Path) -> None:
    pool, backend = make_pool(tmp_path, pool_size=0, retention_hours=1)
    old = await pool.acquire("old", "192.0.2.1")
    await pool.release(old)
    pool._preserved[old.id].released = datetime.now(UTC) - timedelta(hours=2)
    await pool.enforce_retention()
    assert old.id not in backend.boxes and pool.preserved == 0


async def test_reconcile_removes_stale_warm_and_keeps_sessions(tmp_path: Path) -> None:
    backend = FakeBackend()
    first, _ = make_pool(tmp_path, backend, pool_size=2)
    await first.start()
    active = await first.acquire("crashed", "203.0.113.9")
    await first.wait_refilled()
    # "crash": the first pool object is dropped without close().
    second, _ = make_pool(tmp_path, backend, pool_size=1)
    await second.start()
    assert backend.boxes[active.id].running is False  # stopped, kept
    assert second.preserved == 1 and second.warm == 1
    assert len(backend.boxes) == 2  # the two stale warm boxes are gone, one fresh warm box


async def test_refill_survives_engine_errors(tmp_path: Path) -> None:
    pool, _ = make_pool(tmp_path, FakeBackend(fail_creates=1), pool_size=2)
    await pool.start()
    assert pool.warm == 1 and pool.start_failures == 1
    pool.refill()
    await pool.wait_refilled()
    assert pool.warm == 2


async def test_close_removes_warm_and_stops_active(tmp_path: Path) -> None:
    pool, backend = make_pool(tmp_path, pool_size=2)
    await pool.start()
    box = await pool.acquire("s", "192.0.2.1")
    await pool.close()
    assert list(backend.boxes) == [box.id] and not backend.boxes[box.id].running
    with pytest.raises(SandboxUnavailable):
        await pool.acquire("late", "192.0.2.1")


async def test_a_failed_stop_is_retried_in_the_background(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pool, backend = make_pool(tmp_path)
    await pool.start()
    box = await pool.acquire("s1", "198.51.100.7")
    backend.boxes[box.id].fail_stops = 2
    real_sleep = asyncio.sleep
    monkeypatch.setattr(asyncio, "sleep", lambda s: real_sleep(0))
    await pool.release(box)
    assert pool.preserved == 1 and pool.stop_retries == 1 and backend.boxes[box.id].running
    for _ in range(20):
        await real_sleep(0)
    assert not backend.boxes[box.id].running
    await pool.close()


async def test_the_sweep_stops_untracked_running_boxes_only(tmp_path: Path) -> None:
    pool, backend = make_pool(tmp_path)
    await pool.start()
    active = await pool.acquire("s1", "198.51.100.7")
    await pool.wait_refilled()
    old = datetime.now(UTC) - timedelta(hours=1)
    stray = await backend.create("lost", "198.51.100.8")
    young = await backend.create()  # being created right now
    for b in backend.boxes.values():
        if b is not young:
            b.created_at = old
    assert await pool.sweep() == 1
    assert not stray.running and young.running and backend.boxes[active.id].running
    assert all(backend.boxes[w.id].running for w in pool._warm)
    assert pool.preserved == 1 and pool.stats()["strays_stopped"] == 1
    await pool.close()


async def test_warm_boxes_are_prepared_once_and_the_result_goes_to_their_session(tmp_path: Path) -> None:
    pool, _ = make_pool(tmp_path, pool_size=2)
    prepared: list[str] = []

    async def prepare(box: object) -> str:
        prepared.append(box.id)  # type: ignore[attr-defined]
        return f"tokens-of-{box.id}"  # type: ignore[attr-defined]

    pool.prepare = prepare
    await pool.start()
    assert len(prepared) == 2
    box = await pool.acquire("s1", "198.51.100.7")
    assert pool.take_prepared(box.id) == f"tokens-of-{box.id}"
    assert pool.take_prepared(box.id) is None  # handed over once
    await pool.close()


async def test_warm_boxes_found_stopped_are_dropped_and_the_session_gets_a_running_one(tmp_path: Path) -> None:
    backend = ChrootBackend(tmp_path / "boxes")
    pool = Pool(backend, SandboxSettings(pool_size=2, max_sandboxes=10), tmp_path / "ledger")
    try:
        await pool.start()
        stale = [box.id for box in pool._warm]
        for box in pool._warm:
            await box.stop()  # the engine restarted: every warm box is stopped
        box = await pool.acquire("s1", "198.51.100.7")
        assert await box.is_running() and box.id not in stale
        assert pool.on_demand_creations == 1
        await pool.wait_refilled()
        assert pool.warm == 2 and not {b.id for b in pool._warm} & set(stale)
    finally:
        await pool.close()
        await backend.close()
        for info in await backend.list_managed():
            await backend.sandbox(info.id, info.name).remove()
