"""Issue 19 with the defaults: one box per source address across connections (OpenSSH's scp then ssh on
127.0.0.1), a burst of logins served from warm boxes."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from pathlib import Path

import pytest

from sandtrap.config import SandboxSettings
from sandtrap.events import SANDBOX_ASSIGNED, SESSION_CLOSED
from sandtrap.sandbox.docker import engine

from sandtrap_fixtures import Honeypot
from sshclient import remote, run, scp_argv, ssh_argv

DEFAULT_AFFINITY = SandboxSettings().affinity  # the fixture pins "session" for older tests; these use the default


async def test_a_file_uploaded_with_scp_is_there_in_the_next_connection_from_the_same_address(
    honeypot: Honeypot, tmp_path: Path
) -> None:
    assert DEFAULT_AFFINITY == "source_ip"
    hp = await honeypot(sandbox={"affinity": DEFAULT_AFFINITY})
    payload = secrets.token_bytes(64 * 1024)
    local = tmp_path / "bot.bin"
    local.write_bytes(payload)
    up = await run(scp_argv(hp.port, str(local), remote("/tmp/bot.bin")), timeout_s=60)
    assert up.returncode == 0, up.err
    await hp.wait_for(SESSION_CLOSED)
    second = await run(ssh_argv(hp.port, "chmod +x /tmp/bot.bin && sha256sum /tmp/bot.bin"), timeout_s=60)
    assert second.returncode == 0, second.err
    assert second.out.split()[0] == hashlib.sha256(payload).hexdigest()
    await hp.wait_for(SESSION_CLOSED, count=2)
    a1, a2 = await hp.wait_for(SANDBOX_ASSIGNED, count=2)
    assert a1.session != a2.session and a1.get("sandbox_id") == a2.get("sandbox_id")
    assert (a1.get("reused"), a2.get("reused")) == (False, True)


@pytest.mark.timing  # how fast the pool grows under a burst: run alone (make test)
async def test_a_burst_of_logins_is_served_from_warm_boxes_and_the_pool_grows_for_it(honeypot: Honeypot) -> None:
    defaults = SandboxSettings()
    hp = await honeypot(
        sandbox={"affinity": "session", "pool_size": defaults.pool_size, "pool_max": defaults.pool_max},
        limits={"max_sessions_per_ip": 20},  # every login comes from 127.0.0.1
    )
    pool = hp.services.pool
    assert pool.warm == defaults.pool_size == 16

    async def login(i: int) -> None:
        done = await run(ssh_argv(hp.port, f"echo login-{i}"), timeout_s=120)
        assert done.returncode == 0 and done.out == f"login-{i}\n", done.err

    logins = []
    for i in range(20):  # 2 a second, past the default pool
        logins.append(asyncio.create_task(login(i)))
        await asyncio.sleep(0.5)
    await asyncio.gather(*logins)
    assigned = await hp.wait_for(SANDBOX_ASSIGNED, count=20)
    assert len({e.get("sandbox_id") for e in assigned}) == 20
    # Whether the target grew depends on warm-ups finishing within the burst: measured in bench.capacity, not here.
    # Served warm: from the pool or from a warm-up under way, not made on demand (at most two, on a loaded host).
    assert pool.on_demand_creations <= 2, pool.stats()
    ms = sorted(float(e.get("acquire_ms")) for e in assigned)
    print(f"burst of 20 at 2/s: acquire p50 {ms[10]:.0f} ms, max {ms[-1]:.0f} ms; {pool.stats()}")


async def test_a_writer_left_running_after_the_connection_is_stopped_at_the_quota_and_the_ip_gets_a_fresh_box(
    honeypot: Honeypot,
) -> None:
    hp = await honeypot(sandbox={"affinity": DEFAULT_AFFINITY})
    quota = hp.settings.sandbox.docker.disk_quota
    left = await run(
        ssh_argv(
            hp.port, "nohup sh -c 'sleep 2; dd if=/dev/zero of=/root/.cache.bin bs=1M count=1024' >/dev/null 2>&1 &"
        ),
        timeout_s=60,
    )
    assert left.returncode == 0, left.err
    [first] = await hp.wait_for(SANDBOX_ASSIGNED)
    box = str(first.get("sandbox_id"))
    async with engine.engine() as client, asyncio.timeout(90):
        while True:  # no connection is left: the watch stops the box on its own
            info = await client._query_json(f"containers/{box}/json", params={"size": "1"})
            if not info["State"]["Running"]:
                break
            await asyncio.sleep(0.5)
    assert int(info.get("SizeRw", 0)) <= quota + 64 * 1024 * 1024, info.get("SizeRw")
    again = await run(ssh_argv(hp.port, "test -e /root/.cache.bin || echo fresh"), timeout_s=60)
    assert again.returncode == 0 and again.out == "fresh\n", again.err
    _, second = await hp.wait_for(SANDBOX_ASSIGNED, count=2)
    assert second.get("sandbox_id") != box and second.get("reused") is False
