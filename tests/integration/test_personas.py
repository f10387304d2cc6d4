"""Personas on the real engine (issue 19 item 5): boxes of two personas with their own hostnames, chosen by weight
(a seeded random source: the counts are those the seed's draws give, so the test cannot flake) or by the service the
attacker came in on; the events, the stored session and the API name the persona of each login's box.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from sandtrap.events import SANDBOX_ASSIGNED
from sandtrap.sandbox.personas import PersonaChoice

from sshclient import asyncssh_connected

pytestmark = pytest.mark.timeout(300)
Honeypot = Callable[..., Any]

PERSONAS = [
    {"name": "web", "weight": 1, "hostname": "web-int-07"},
    {"name": "db", "weight": 1, "hostname": "db-int-02"},
    {"name": "gw", "weight": 0, "hostname": "gw-int-01"},  # only by a service's persona: never drawn
]
HOSTNAMES = {p["name"]: p["hostname"] for p in PERSONAS}
SEED, LOGINS = 20261205, 6


async def _login_hostname(hp: Any) -> str:
    async with asyncssh_connected(hp) as conn:
        result = await conn.run(
            "hostname; cat /etc/hostname; cut -d' ' -f3 /etc/ssh/ssh_host_ed25519_key.pub", timeout=60
        )
    assert result.exit_status == 0, result.stderr
    lines = str(result.stdout).split()
    # the kernel's name, the file and the host key's comment (as ssh-keygen -A leaves it) agree
    assert lines[1] == lines[0] and lines[2] == f"root@{lines[0]}", lines
    return lines[0]


async def test_logins_land_in_boxes_of_personas_drawn_by_weight_each_with_its_hostname(honeypot: Honeypot) -> None:
    hp = await honeypot(personas=PERSONAS, sandbox={"pool_size": 2, "affinity": "session"})
    # The draws are the seed's: what the same seed gives offline is what the honeypot must do.
    weights = [(str(p["name"]), float(p["weight"])) for p in PERSONAS]
    offline = PersonaChoice(weights, random.Random(SEED))
    expected = [offline.pick() for _ in range(LOGINS)]
    hp.services.manager.choice = PersonaChoice(weights, random.Random(SEED))
    seen: list[tuple[str, str, str]] = []  # (persona in the event, hostname in the box, session)
    for i in range(LOGINS):
        hostname = await _login_hostname(hp)
        assigned = (await hp.wait_for(SANDBOX_ASSIGNED, count=i + 1))[i]
        seen.append((str(assigned.get("persona")), hostname, assigned.session))
    assert [persona for persona, _, _ in seen] == expected
    assert all(HOSTNAMES[persona] == hostname for persona, hostname, _ in seen), seen
    counts = Counter(persona for persona, _, _ in seen)
    assert set(counts) == {"web", "db"}, counts  # the seed draws both; gw (weight 0) never
    assert abs(counts["web"] - LOGINS / 2) <= LOGINS / 4  # near the 1:1 weights
    # The stored session and the API name each login's persona.
    assert await asyncio.to_thread(hp.services.database.flush)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{hp.services.api.port}", timeout=30) as api:
        for persona, _, session in seen:
            view = (await api.get(f"/api/v1/sessions/{session}")).json()
            assert view["persona"] == persona, view
        page = await api.get("/sessions")
        assert page.status_code == 200 and ">db<" in page.text and ">web<" in page.text


async def test_a_service_bound_to_a_persona_always_gets_it(honeypot: Honeypot) -> None:
    hp = await honeypot(
        personas=PERSONAS,
        services=[
            {"name": "ssh", "protocol": "ssh", "listen": "127.0.0.1:0", "persona": "gw"},
            {"name": "telnet", "protocol": "telnet", "listen": "127.0.0.1:0", "persona": "db"},
        ],
        sandbox={"pool_size": 1, "affinity": "session"},
        telnet={"negotiation_wait_s": 0.2},
    )
    for i in range(3):
        assert await _login_hostname(hp) == "gw-int-01"
        assigned = (await hp.wait_for(SANDBOX_ASSIGNED, count=i + 1))[i]
        assert assigned.get("persona") == "gw"
    # telnetd's banner and prompt, before any login, already name the telnet service's persona's host
    reader, writer = await asyncio.open_connection("127.0.0.1", hp.services.port("telnet"))
    try:
        async with asyncio.timeout(30):
            seen = b""
            while b"login: " not in seen:
                chunk = await reader.read(4096)
                assert chunk, seen
                seen += chunk
    finally:
        writer.close()
    assert b"(db-int-02) (pts/0)" in seen and b"db-int-02 login: " in seen, seen
