"""Personas: the weighted choice (exact, with an injected random source), an address keeping its persona, the
warm pool split between personas, and the pool handing out boxes of the persona asked for."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from sandtrap.config import SandboxSettings
from sandtrap.sandbox.personas import Persona, PersonaChoice, split
from sandtrap.sandbox.pool import Pool
from sandtrap.sandbox.sizing import Demand

from fakes import FakeBackend


class Evenly:
    """A random source whose n draws are spread evenly over [0, 1): (i + 0.5) / n, in a shuffled but fixed order."""

    def __init__(self, n: int) -> None:
        self.values = [((i * 7919) % n + 0.5) / n for i in range(n)]  # 7919 is prime: a permutation of 0..n-1

    def random(self) -> float:
        return self.values.pop()


def test_weights_give_exactly_their_share_of_evenly_spread_draws() -> None:
    n = 1000
    choice = PersonaChoice([("web", 3.0), ("db", 1.0), ("router", 0.0), ("cache", 1.0)], Evenly(n))
    counts = Counter(choice.pick() for _ in range(n))
    assert counts == {"web": 600, "db": 200, "cache": 200}  # weight 0: never drawn


def test_a_seeded_choice_is_repeatable_and_near_its_weights() -> None:
    import random

    def draws(seed: int) -> list[str]:
        choice = PersonaChoice([("web", 3.0), ("db", 1.0)], random.Random(seed))
        return [choice.pick() for _ in range(4000)]

    first = draws(7)
    assert first == draws(7)
    # binomial(4000, 0.25): sd 27; 10 sd either way
    assert 1000 - 270 < first.count("db") < 1000 + 270


def test_the_service_persona_wins_and_an_address_keeps_its_own() -> None:
    choice = PersonaChoice([("web", 1.0), ("db", 1.0)], Evenly(4))
    first = choice.choose("198.51.100.1")
    assert all(choice.choose("198.51.100.1") == first for _ in range(3))  # remembered: no draw taken
    assert choice.choose("198.51.100.1", bound="router") == "router"
    assert choice.choose("198.51.100.1") == first  # a bound service does not change the address's persona
    other = PersonaChoice([("web", 1.0), ("db", 1.0)], Evenly(4))
    picks = [other.choose(f"198.51.100.{i}", remember=False) for i in range(4)]
    assert Counter(picks) == {"web": 2, "db": 2}


def test_remembered_addresses_are_bounded_least_recent_first() -> None:
    choice = PersonaChoice([("web", 1.0)], max_remembered=2)
    for ip in ("a", "b", "c"):
        choice.choose(ip)
    assert list(choice._by_ip) == ["b", "c"]


@pytest.mark.parametrize(
    ("weights", "bad"),
    [([], "no personas"), ([("a", 0.0)], "at least one"), ([("a", 1.0), ("b", -1.0)], "non-negative")],
)
def test_bad_weights_are_refused(weights: list[tuple[str, float]], bad: str) -> None:
    with pytest.raises(ValueError, match=bad):
        PersonaChoice(weights)


def test_the_warm_pool_is_split_by_weight() -> None:
    assert split(3, [("web", 3.0), ("db", 1.0)]) == {"web": 2, "db": 1}
    assert split(20, [("web", 3.0), ("db", 1.0)]) == {"web": 15, "db": 5}
    assert split(4, [("a", 1.0), ("b", 1.0), ("c", 1.0)]) == {"a": 2, "b": 1, "c": 1}
    assert split(3, [("web", 100.0), ("db", 1.0)]) == {"web": 2, "db": 1}  # every drawn persona is kept warm
    assert split(3, [("web", 1.0), ("router", 0.0)], pinned=["router"]) == {"web": 3, "router": 1}
    # a service's persona of weight 0 grows as the least weighted one would (here pool_max 20: 20 * 1/5)
    assert split(20, [("web", 3.0), ("db", 1.0), ("gw", 0.0)], pinned=["gw"]) == {"web": 15, "db": 5, "gw": 4}
    assert split(3, [("web", 1.0), ("router", 0.0)]) == {"web": 3, "router": 0}
    assert split(0, [("web", 1.0)], pinned=["web"]) == {"web": 0}


WEB = Persona("web", "web-prod-03", "corp.internal")
DB = Persona("db", "db-prod-01", "corp.internal", "sandtrap-target-db:latest")


def _pool(tmp_path: Path, **overrides: object) -> tuple[Pool[None], FakeBackend]:
    backend = FakeBackend()
    settings = SandboxSettings(**{"pool_size": 4, "max_sandboxes": 20, **overrides})  # type: ignore[arg-type]
    pool: Pool[None] = Pool(backend, settings, tmp_path / "ledger", personas=[(WEB, 3.0), (DB, 1.0)])
    return pool, backend


async def test_the_pool_warms_each_persona_its_share_and_hands_out_the_one_asked_for(tmp_path: Path) -> None:
    pool, backend = _pool(tmp_path)
    await pool.start()
    try:
        made = Counter(box.labels["sandtrap.persona"] for box in backend.boxes.values())
        assert made == {"web": 3, "db": 1}
        db = await pool.acquire("s1", "198.51.100.1", "db")
        assert backend.boxes[db.id].labels["hostname"] == "db-prod-01" and pool.persona_of(db.id) == "db"
        assert pool.on_demand_creations == 0
        db2 = await pool.acquire("s2", "198.51.100.2", "db")  # none warm: the warm-up under way, or on demand
        assert backend.boxes[db2.id].labels["sandtrap.persona"] == "db"
        web = await pool.acquire("s3", "198.51.100.3")  # '' = the first persona
        assert pool.persona_of(web.id) == "web"
        await pool.wait_refilled()
        warm = Counter(pool.persona_of(b.id) for b in pool._warm)
        assert warm == {"web": 3, "db": 1}
        await pool.release(db)
        assert pool.persona_of(db.id) == ""
    finally:
        await pool.close()


async def test_shrinking_keeps_each_persona_at_its_floor(tmp_path: Path) -> None:
    pool, _ = _pool(tmp_path, pool_max=8)
    now = [0.0]
    await pool.start()
    try:
        pool.demands["db"] = Demand(1, 2, shrink_after_s=60.0, clock=lambda: now[0])
        for _ in range(40):  # a burst of db arrivals raises db's target to its ceiling (pool_max's share)
            pool.demands["db"].arrived()
        pool.demands["db"].warmed(1.0)
        pool.refill()
        await pool.wait_refilled()
        assert Counter(pool.persona_of(b.id) for b in pool._warm) == {"web": 3, "db": 2}
        now[0] += 120.0  # the arrivals stopped a while ago
        assert await pool.shrink() == 1
        assert Counter(pool.persona_of(b.id) for b in pool._warm) == {"web": 3, "db": 1}
    finally:
        await pool.close()
