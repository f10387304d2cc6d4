"""SessionManager with personas, on the fake box: a service's persona always, an address keeping its persona
(and its box per persona), each persona's own lures planted and recorded."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from sandtrap.bridge.sessions import SessionManager
from sandtrap.config import LimitsSettings, LureFile, PersonaSettings, SandboxSettings
from sandtrap.sandbox.personas import Persona, PersonaChoice
from sandtrap.sandbox.pool import Pool

from fakes import ChrootBackend

Make = Callable[..., Any]

PERSONAS = [
    PersonaSettings(name="web", weight=1.0),
    PersonaSettings(
        name="db",
        weight=1.0,
        hostname="db-prod-01",
        honeytokens=False,
        lures=[LureFile(path="/root/.my.cnf", content="[client]\nuser=root\npassword={token}\n")],
    ),
    PersonaSettings(name="router", weight=0.0, hostname="gw-01"),
]


class Alternate:
    """web, db, web, db, ... (draws 0.25, 0.75 over two equal weights)."""

    def __init__(self) -> None:
        self.n = 0

    def random(self) -> float:
        self.n += 1
        return 0.25 if self.n % 2 else 0.75


@pytest.fixture
async def manager(chroot_backend: ChrootBackend, tmp_path: Path) -> AsyncIterator[Make]:
    made: list[tuple[Pool[Any], SessionManager]] = []

    async def make(**sandbox: Any) -> tuple[SessionManager, Pool[Any]]:
        settings = SandboxSettings(**{"pool_size": 2, "max_sandboxes": 8, **sandbox})
        boxes = [(Persona(p.name, p.hostname or settings.hostname, settings.domain), p.weight) for p in PERSONAS]
        pool: Pool[Any] = Pool(chroot_backend, settings, tmp_path / "ledger", personas=boxes, pinned=["router"])
        choice = PersonaChoice([(p.name, p.weight) for p in PERSONAS], Alternate())
        mgr = SessionManager(pool, settings, LimitsSettings(), True, PERSONAS, choice)
        pool.prepare = mgr.prepare
        await pool.start()
        made.append((pool, mgr))
        return mgr, pool

    try:
        yield make
    finally:
        for pool, mgr in made:
            await mgr.close()
            await pool.close()


async def test_a_service_persona_always_wins(manager: Make) -> None:
    mgr, pool = await manager(affinity="session")
    leases = [await mgr.lease(f"s{i}", f"198.51.100.{i}", persona="router") for i in range(3)]
    assert [lease.persona for lease in leases] == ["router"] * 3
    assert {pool.persona_of(lease.sandbox.id) for lease in leases} == {"router"}
    assert mgr.hostname("router") == "gw-01" and mgr.hostname("web") == "web-prod-03"
    for lease in leases:
        await mgr.end(lease)


async def test_by_weight_and_an_address_keeps_its_persona(manager: Make) -> None:
    mgr, _ = await manager(affinity="source_ip", ip_ttl_s=3600)
    a = await mgr.lease("s1", "198.51.100.1")
    b = await mgr.lease("s2", "198.51.100.2")
    assert (a.persona, b.persona) == ("web", "db")  # drawn by weight: the injected draws alternate
    again = await mgr.lease("s3", "198.51.100.2")
    assert again.persona == "db" and again.sandbox.id == b.sandbox.id and again.reused
    # a service bound to another persona gets that persona's box for the same address: its own
    routed = await mgr.lease("s4", "198.51.100.2", persona="router")
    assert routed.persona == "router" and routed.sandbox.id != b.sandbox.id
    for lease in (a, b, again, routed):
        await mgr.end(lease)
    assert mgr.choose_persona("198.51.100.2") == "db"  # remembered after its box went


async def test_each_persona_plants_its_own_lures(manager: Make) -> None:
    mgr, _ = await manager(affinity="session")
    web = await mgr.lease("s1", "198.51.100.1", persona="web")
    db = await mgr.lease("s2", "198.51.100.2", persona="db")
    assert {t.kind for t in web.tokens} == {"aws", "db_password", "ssh_key", "api_token"}
    assert [(t.kind, t.path) for t in db.tokens] == [("lure", "/root/.my.cnf")]  # honeytokens: false
    token = db.tokens[0]
    data = await db.sandbox.get_file("/root/.my.cnf", 4096)
    assert data is not None and data.data == f"[client]\nuser=root\npassword={token.value}\n".encode()
    assert len(token.value) == 24  # unique to this box
    await mgr.end(web)
    await mgr.end(db)
