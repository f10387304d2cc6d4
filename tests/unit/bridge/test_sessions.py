"""SessionManager on the fake box: leases and their release, source_ip affinity and its TTL, honeytokens
planted and their reads seen, accounts made in the box once."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from sandtrap.bridge.login import ensure_account
from sandtrap.bridge.sessions import SessionManager
from sandtrap.config import LimitsSettings, SandboxSettings
from sandtrap.errors import SandboxCapReached
from sandtrap.sandbox.base import Features, run
from sandtrap.sandbox.pool import Pool

from fakes import ROOTLESS, ChrootBackend, ChrootSandbox

Make = Callable[..., Any]


@pytest.fixture
async def manager(chroot_backend: ChrootBackend, tmp_path: Path) -> AsyncIterator[Make]:
    """``await manager(**sandbox settings)``: a started pool of the fake's boxes and its SessionManager."""
    made: list[tuple[Pool, SessionManager]] = []

    async def make(limits: LimitsSettings | None = None, **sandbox: Any) -> tuple[SessionManager, Pool]:
        settings = SandboxSettings(**{"pool_size": 1, "max_sandboxes": 6, "affinity": "session", **sandbox})
        pool = Pool(chroot_backend, settings, tmp_path / "ledger")
        mgr = SessionManager(pool, settings, limits or LimitsSettings())
        pool.prepare = mgr.prepare  # as app.build wires them
        await pool.start()
        made.append((pool, mgr))
        return mgr, pool

    try:
        yield make
    finally:
        for pool, mgr in made:
            await mgr.close()
            await pool.close()


async def test_a_session_lease_gets_a_prepared_warm_box_and_its_end_releases_it(manager: Make) -> None:
    mgr, pool = await manager()
    lease = await mgr.lease("s1", "198.51.100.1")
    box = lease.sandbox
    assert isinstance(box, ChrootSandbox) and await box.is_running()
    assert not lease.reused and pool.active == 1
    assert "root" in lease.passwd and lease.passwd["root"].uid == 0  # read while it was warm
    assert await mgr.end(lease) is True
    assert not await box.is_running() and pool.active == 0 and pool.preserved == 1
    info = await box.get_file("/root/.aws/credentials", 4096)  # kept for forensics
    assert info is not None and info.data is not None


async def test_honeytokens_are_planted_old_and_their_reads_reported(manager: Make) -> None:
    mgr, _ = await manager()
    lease = await mgr.lease("s1", "198.51.100.1")
    box = lease.sandbox
    assert isinstance(box, ChrootSandbox)
    assert {t.kind for t in lease.tokens} == {"aws", "db_password", "ssh_key", "api_token"}
    seen: list[tuple[str, str]] = []
    mgr.watcher.report_to(box.id, lambda kind, path: seen.append((kind, path)))
    assert (await run(box, ["cat", "/root/.pgpass"])).ok  # first: the watcher reports a file once a second
    async with asyncio.timeout(10):
        while not seen:
            await asyncio.sleep(0.01)
    assert seen == [("db_password", "/root/.pgpass")]
    now_s = float((await run(box, ["date", "+%s"])).stdout)
    for token in lease.tokens:
        info = await box.get_file(token.path, 1 << 16)
        assert info is not None and info.data == token.content and info.mode == token.mode
        assert token.kind == "ssh_key" or token.value.encode() in token.content
        age_days = (now_s - os.path.getmtime(box.root / token.path[1:])) / 86400
        assert 19 < age_days < 221  # dated weeks or months back, like the rest of a lived-in box
    await mgr.end(lease)


async def test_reads_go_to_the_newest_session_in_the_box_and_back_when_it_ends(manager: Make) -> None:
    """source_ip affinity: two connections in one box; the newest gets the reads, the older gets them again."""
    mgr, _ = await manager(affinity="source_ip")
    lease = await mgr.lease("s1", "198.51.100.1")
    box = lease.sandbox
    first: list[str] = []
    second: list[str] = []

    def older(kind: str, path: str) -> None:
        first.append(path)

    def newer(kind: str, path: str) -> None:
        second.append(path)

    async def read(path: str, into: list[str]) -> None:
        assert (await run(box, ["cat", path])).ok
        async with asyncio.timeout(10):
            while path not in into:
                await asyncio.sleep(0.01)

    mgr.watcher.report_to(box.id, older)
    mgr.watcher.report_to(box.id, newer)
    await read("/root/.pgpass", second)
    assert first == []
    mgr.watcher.withdraw(box.id, newer)
    await read("/root/.aws/credentials", first)
    assert second == ["/root/.pgpass"]
    mgr.watcher.withdraw(box.id, older)
    await mgr.end(lease)


async def test_without_honeytokens_nothing_is_planted(manager: Make, tmp_path: Path) -> None:
    mgr, pool = await manager()
    mgr._honeytokens = False
    pool.prepare = None
    lease = await mgr.lease("s1", "198.51.100.1")  # a warm box prepared before: its tokens stay its own
    lease2 = await mgr.lease("s2", "198.51.100.2")  # prepared by nobody: planted nothing
    assert lease2.tokens == []
    assert await lease2.sandbox.get_file("/root/.aws/credentials", 100) is None
    await mgr.end(lease)
    await mgr.end(lease2)


async def test_source_ip_affinity_shares_a_box_until_the_ttl_after_the_last_connection(manager: Make) -> None:
    mgr, pool = await manager(affinity="source_ip", ip_ttl_s=1.0)
    first = await mgr.lease("s1", "203.0.113.5")
    second = await mgr.lease("s2", "203.0.113.5")
    other = await mgr.lease("s3", "203.0.113.6")
    assert second.sandbox is first.sandbox and second.reused and not first.reused
    assert second.logins is first.logins  # login numbers are the box's, shared by its connections
    assert second.tokens == first.tokens
    assert other.sandbox.id != first.sandbox.id
    assert await mgr.end(first) is False
    assert await mgr.end(second) is False
    assert await first.sandbox.is_running()  # kept for the TTL
    await asyncio.sleep(0.1)
    back = await mgr.lease("s4", "203.0.113.5")  # within the TTL: the same box, its timer cancelled
    assert back.sandbox is first.sandbox and back.reused
    await mgr.end(back)
    async with asyncio.timeout(10):
        while pool.preserved == 0:  # released after the TTL: stopped, kept for forensics
            await asyncio.sleep(0.05)
    assert not await first.sandbox.is_running()
    fresh = await mgr.lease("s5", "203.0.113.5")  # after the TTL: a box of its own
    assert fresh.sandbox.id != first.sandbox.id and not fresh.reused
    await mgr.end(fresh)
    await mgr.end(other)


async def test_source_ip_affinity_replaces_a_box_that_died(manager: Make) -> None:
    mgr, _ = await manager(affinity="source_ip")
    first = await mgr.lease("s1", "203.0.113.5")
    await mgr.end(first)
    await first.sandbox.stop()  # e.g. the engine restarted
    again = await mgr.lease("s2", "203.0.113.5")
    assert again.sandbox.id != first.sandbox.id and not again.reused
    await mgr.end(again)


@pytest.mark.skipif(ROOTLESS, reason="useradd in a rootless fake box cannot chown the new home")
async def test_an_existing_account_comes_from_the_warm_read_and_a_new_one_is_made_in_the_box(
    manager: Make, chroot_backend: ChrootBackend
) -> None:
    mgr, _ = await manager()
    lease = await mgr.lease("s1", "198.51.100.1")
    box = lease.sandbox
    assert isinstance(box, ChrootSandbox)
    execs = len(box.logins)
    root = await mgr.account(lease, "root", "hunter2")
    assert (root.uid, root.home) == (0, "/root")
    assert await mgr.account(lease, "root", "hunter2") is root  # cached per box
    # root's password is in /etc/shadow when account() returns: nothing of it runs beside the shell
    assert any(line.startswith("root:$6$") for line in (box.root / "etc/shadow").read_text().splitlines())
    new = await mgr.account(lease, "deploy", "s3cret")
    assert new.name == "deploy" and new.uid >= 1000 and new.home == "/home/deploy"
    assert await mgr.account(lease, "deploy", "s3cret") is new
    passwd = (box.root / "etc/passwd").read_text()
    assert "\ndeploy:" in passwd and "deploy:" not in Path("/etc/passwd").read_text()  # in the box only
    shadow = (box.root / "etc/shadow").read_text()
    assert any(line.startswith("deploy:$6$") for line in shadow.splitlines())  # the login's password, hashed
    assert (box.root / "home/deploy").is_dir()
    assert len(box.logins) - execs == 2  # one run for root's password, one for deploy; the cached calls none
    await mgr.end(lease)


@pytest.mark.skipif(ROOTLESS, reason="useradd in a rootless fake box cannot chown the new home")
async def test_an_account_prepared_at_login_is_awaited_by_the_channel_and_made_once(
    manager: Make, chroot_backend: ChrootBackend
) -> None:
    mgr, _ = await manager()
    lease = await mgr.lease("s1", "198.51.100.1")
    box = lease.sandbox
    assert isinstance(box, ChrootSandbox)
    execs = len(box.logins)
    mgr.prepare_account(lease, "root", "hunter2")  # the login succeeded; the client is opening its channel
    mgr.prepare_account(lease, "root", "hunter2")  # once per user and connection
    pending = lease.preparing["root"]
    assert not pending.done()
    root = await mgr.account(lease, "root", "hunter2")
    assert pending.done() and "root" not in lease.preparing and root.uid == 0
    assert any(line.startswith("root:$6$") for line in (box.root / "etc/shadow").read_text().splitlines())
    assert len(box.logins) - execs == 1  # the channel's call reused the prepared account
    hashed = (box.root / "etc/shadow").read_text()
    await mgr.account(lease, "root", "hunter2", wait_password=True)  # telnet's login: already this password
    assert (box.root / "etc/shadow").read_text() == hashed and len(box.logins) - execs == 1
    await mgr.account(lease, "root", "other", wait_password=True)  # another password that login will check
    assert (box.root / "etc/shadow").read_text() != hashed and len(box.logins) - execs == 2
    await mgr.end(lease)


@pytest.mark.skipif(ROOTLESS, reason="useradd in a rootless fake box cannot chown the new home")
async def test_passwords_set_at_once_in_one_box_are_all_kept(box: ChrootSandbox) -> None:
    for i in range(20):
        await asyncio.gather(ensure_account(box, "root", f"pw{i}"), ensure_account(box, f"user{i}", "pw"))
        shadow = (box.root / "etc/shadow").read_text().splitlines()
        hashed = {line.split(":")[0] for line in shadow if line.split(":")[1].startswith("$6$")}
        assert {"root", f"user{i}"} <= hashed, f"round {i}: a password was lost"


async def test_admit_counts_connections_per_ip_and_overall(manager: Make) -> None:
    mgr, _ = await manager(limits=LimitsSettings(max_sessions=3, max_sessions_per_ip=2))
    assert mgr.admit("192.0.2.1") is None and mgr.admit("192.0.2.1") is None
    assert mgr.admit("192.0.2.1") == "max_sessions_per_ip"
    assert mgr.admit("192.0.2.2") is None
    assert mgr.admit("192.0.2.3") == "max_sessions"
    mgr.leave("192.0.2.1")
    assert mgr.admit("192.0.2.3") is None and mgr.active_connections == 3


async def test_close_releases_the_boxes_held_for_source_ips(manager: Make) -> None:
    mgr, pool = await manager(affinity="source_ip", ip_ttl_s=3600)
    lease = await mgr.lease("s1", "203.0.113.5")
    await mgr.end(lease)
    assert await lease.sandbox.is_running()
    await mgr.close()
    assert not await lease.sandbox.is_running() and pool.preserved == 1


async def test_a_box_only_raw_services_used_goes_back_after_raw_ttl_unless_a_login_came(manager: Make) -> None:
    """Issue 17: raw services share the IP's box; a scan's box is not held for ip_ttl_s."""
    mgr, pool = await manager(ip_ttl_s=3600)
    mgr.share_by_ip, mgr.raw_ttl_s = True, 0.2
    probe = await mgr.lease("h1", "203.0.113.8", login=False)
    assert await mgr.end(probe) is False
    async with asyncio.timeout(10):
        while pool.preserved == 0:  # released after raw_ttl_s, not ip_ttl_s
            await asyncio.sleep(0.05)
    probe = await mgr.lease("h2", "203.0.113.9", login=False)
    ssh = await mgr.lease("s1", "203.0.113.9")  # a login joins the probe's box: the IP's box from now on
    assert ssh.sandbox is probe.sandbox and ssh.reused
    await mgr.end(probe)
    await mgr.end(ssh)
    await asyncio.sleep(0.5)
    assert await ssh.sandbox.is_running()  # held for ip_ttl_s now


@pytest.mark.skipif(ROOTLESS, reason="useradd in a rootless fake box cannot chown the new home")
async def test_where_the_boxs_own_sshd_checks_it_each_new_password_is_set_before_the_login(manager: Make) -> None:
    mgr, _ = await manager(affinity="source_ip")
    lease = await mgr.lease("s1", "198.51.100.1")
    box = lease.sandbox
    assert isinstance(box, ChrootSandbox)
    box.features = Features(own_sshd=True)  # type: ignore[misc]

    def root_hash() -> str:
        shadow = (box.root / "etc/shadow").read_text().splitlines()
        return next(line.split(":")[1] for line in shadow if line.startswith("root:"))

    before = root_hash()
    await mgr.account(lease, "root", "first")  # an existing account: set now, not alongside the login
    first = root_hash()
    assert first != before and first.startswith("$6$")
    execs = len(box.logins)
    await mgr.account(lease, "root", "first")
    assert len(box.logins) == execs  # the same password: nothing to do
    again = await mgr.lease("s2", "198.51.100.1")  # the same box, another connection with another password
    await mgr.account(again, "root", "second")
    assert root_hash() not in (before, first)
    await mgr.end(lease)
    await mgr.end(again)


def test_source_ip_is_the_default_affinity() -> None:
    settings = SandboxSettings()
    assert settings.affinity == "source_ip" and settings.ip_ttl_s == 1800 and settings.ip_max_lifetime_s == 21600


async def test_a_box_past_its_max_lifetime_takes_no_new_connection_and_goes_when_its_last_ends(manager: Make) -> None:
    mgr, pool = await manager(affinity="source_ip", ip_ttl_s=3600, ip_max_lifetime_s=0.3)
    first = await mgr.lease("s1", "203.0.113.5")
    await asyncio.sleep(0.4)
    second = await mgr.lease("s2", "203.0.113.5")  # the old box is retired: a fresh one, the old still in use
    assert second.sandbox.id != first.sandbox.id and not second.reused
    assert await first.sandbox.is_running()
    assert await mgr.end(first) is True  # its last connection: released at once, not after ip_ttl_s
    assert not await first.sandbox.is_running() and pool.preserved == 1
    assert await mgr.end(second) is False  # idle: its timer is what is left of its lifetime, not the hour
    async with asyncio.timeout(10):
        while pool.preserved < 2:
            await asyncio.sleep(0.05)
    assert not await second.sandbox.is_running()


async def test_at_the_cap_the_longest_idle_ip_box_makes_room_and_with_none_idle_the_refusal_is_counted(
    manager: Make,
) -> None:
    mgr, pool = await manager(affinity="source_ip", ip_ttl_s=3600, max_sandboxes=2, pool_size=0)
    a = await mgr.lease("s1", "203.0.113.1")
    b = await mgr.lease("s2", "203.0.113.2")
    await mgr.end(a)
    await asyncio.sleep(0.01)
    await mgr.end(b)  # both idle, a the longest
    c = await mgr.lease("s3", "203.0.113.3")
    assert c.evicted == a.sandbox.name and not await a.sandbox.is_running()
    assert await b.sandbox.is_running() and pool.stats()["evictions"] == 1 and pool.stats()["cap_hits"] == 1
    again = await mgr.lease("s4", "203.0.113.2")  # b's IP still finds its box
    assert again.sandbox is b.sandbox and again.reused
    with pytest.raises(SandboxCapReached):  # b and c in use: nothing to evict
        await mgr.lease("s5", "203.0.113.4")
    assert pool.stats()["cap_hits"] == 2 and pool.stats()["evictions"] == 1
    for lease in (c, again):
        await mgr.end(lease)


async def test_a_box_stopped_for_a_bound_ends_its_connections_and_no_other(manager: Make) -> None:
    mgr, _ = await manager(affinity="source_ip")
    first = await mgr.lease("s1", "203.0.113.5")
    second = await mgr.lease("s2", "203.0.113.5")
    other = await mgr.lease("s3", "203.0.113.6")
    ended: list[tuple[str, str, int]] = []
    for lease in (first, second, other):
        mgr.on_overrun(lease.sandbox.id, lambda reason, value, s=lease.session: ended.append((s, reason, value)))

    def withdrawn(reason: str, value: int) -> None:  # registered, then withdrawn: never called
        ended.append(("withdrawn", reason, value))

    mgr.on_overrun(first.sandbox.id, withdrawn)
    mgr.withdraw(first.sandbox.id, withdrawn)
    mgr.overrun(first.sandbox.id, "disk_quota", 300 << 20)
    assert sorted(ended) == [("s1", "disk_quota", 300 << 20), ("s2", "disk_quota", 300 << 20)]
    for lease in (first, second, other):
        await mgr.end(lease)
