"""Which sandbox a connection gets, who may connect, and when a box goes back for forensics.

Affinity ``session``: a fresh box per connection, released when the connection ends.
Affinity ``source_ip`` (the default): one box per source address; a reconnect within ``ip_ttl_s`` of the last
connection's end lands in the same box; after the TTL the box is released. A box older than ``ip_max_lifetime_s``
takes no new connection (the next one gets a fresh box) and goes back when its last connection ends. At
``max_sandboxes`` the box idle longest (no connection, waiting out its TTL) is released early to make room;
with none idle the connection is refused. Both are counted in the pool's stats and named in the events.
Concurrent channels of one connection share its box (the acquisition is one shared future).
With raw (tcp/udp) services configured, :attr:`SessionManager.share_by_ip` makes every connection use its IP's
box whatever the affinity: a port scan, a request to the fake HTTP and an SSH login land in one machine.
Personas (config ``personas``): a connection's persona is its service's, else the one its address got before
(source_ip), else drawn by weight (:class:`~sandtrap.sandbox.personas.PersonaChoice`); an address's box is per
persona, so a service bound to another persona gets a box of its own.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sandtrap.bridge import honeytokens
from sandtrap.bridge.artifacts import Baseline, take_baseline
from sandtrap.bridge.honeytokens import ReadWatcher, Token
from sandtrap.bridge.login import Account, ensure_account, read_passwd
from sandtrap.config import DEFAULT_PERSONA, LimitsSettings, PersonaSettings, SandboxSettings
from sandtrap.errors import SandboxCapReached, SandboxError, SandboxUnavailable
from sandtrap.logs import RateLimited
from sandtrap.sandbox.base import Sandbox
from sandtrap.sandbox.personas import PersonaChoice
from sandtrap.sandbox.pool import Pool

log = logging.getLogger(__name__)
cap_warnings = RateLimited(log)

Ender = Callable[[str, int], object]  # (reason, value): a connection's end, as a limit ends it
IpKey = tuple[str, str]  # (source address, persona): the box an address's connections of one persona share


@dataclass
class Prepared:
    """What is done to a box before its attacker arrives: its honeytokens, its passwd entries read, and its files
    then (what the first session's changed files are diffed against)."""

    tokens: list[Token] = field(default_factory=list)
    passwd: dict[str, Account] = field(default_factory=dict)
    baseline: Baseline | None = None


@dataclass
class BoxLogins:
    """A box's login sessions, numbered as systemd-logind numbers them since boot (XDG_SESSION_ID)."""

    # A box that has been up a while has seen some logins (admins, cron does not count) before ours.
    last_id: int = field(default_factory=lambda: random.randint(3, 60))

    def new_id(self) -> int:
        self.last_id += 1
        return self.last_id


@dataclass
class _IpBox:
    sandbox: Sandbox
    users: int = 0
    timer: asyncio.TimerHandle | None = None
    accounts: dict[str, Account] = field(default_factory=dict)
    passwords: dict[str, str | None] = field(default_factory=dict)
    prepared: Prepared = field(default_factory=Prepared)
    logins: BoxLogins = field(default_factory=BoxLogins)
    had_login: bool = False  # a login (ssh, telnet) used it, not only raw services' connections
    born: float = field(default_factory=time.monotonic)
    idle_since: float = 0.0  # when its last connection ended (monotonic); 0 while one is using it

    @property
    def tokens(self) -> list[Token]:
        return self.prepared.tokens


@dataclass
class Lease:
    """A connection's hold on its sandbox."""

    session: str
    src_ip: str
    sandbox: Sandbox
    acquire_ms: float
    accounts: dict[str, Account]
    reused: bool = False
    tokens: list[Token] = field(default_factory=list)
    passwd: dict[str, Account] = field(default_factory=dict)  # the box's accounts when it was prepared
    logins: BoxLogins = field(default_factory=BoxLogins)  # shared by every connection to the same box
    passwords: dict[str, str | None] = field(default_factory=dict)  # each account's password as last set in the box
    evicted: str = ""  # the idle box released early to make room for this one at max_sandboxes
    baseline: Baseline | None = None  # the box when this connection began: its changed files are since then
    persona: str = DEFAULT_PERSONA  # what the box was made as (config personas)
    preparing: dict[str, asyncio.Task[Account]] = field(default_factory=dict)  # accounts being set up (prepare_account)


class SessionManager:
    def __init__(
        self,
        pool: Pool[Prepared],
        sandbox: SandboxSettings,
        limits: LimitsSettings,
        honeytokens: bool = True,
        personas: Sequence[PersonaSettings] = (),
        choice: PersonaChoice | None = None,
    ) -> None:
        self._pool = pool
        self.personas = {p.name: p for p in personas or (PersonaSettings(name=DEFAULT_PERSONA),)}
        self.choice = choice or PersonaChoice([(p.name, p.weight) for p in self.personas.values()])
        self._honeytokens = honeytokens
        self.watcher = ReadWatcher()
        self._settings = sandbox
        self._limits = limits
        self._per_ip: Counter[str] = Counter()
        self._total = 0
        self._by_ip: dict[IpKey, _IpBox] = {}
        self._retired: dict[str, _IpBox] = {}  # past ip_max_lifetime_s, still used: released when the last ends
        self._ip_locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._enders: dict[str, list[Ender]] = {}  # per box: how its connections are ended (a backend's bound hit)
        self.share_by_ip = False  # set by app.py when raw services need the IP's box (as affinity source_ip)
        # A box that only raw services' connections used (a scan, an HTTP probe) waits this long for its IP, not
        # ip_ttl_s: a scan of many addresses must not hold a box per address for half an hour.
        self.raw_ttl_s = 60.0

    @property
    def _by_source_ip(self) -> bool:
        return self._settings.affinity == "source_ip" or self.share_by_ip

    @property
    def active_connections(self) -> int:
        return self._total

    def choose_persona(self, src_ip: str, bound: str = "") -> str:
        """A new connection's persona: its service's (``bound``), else its address's (source_ip), else by weight."""
        return self.choice.choose(src_ip, bound, remember=self._by_source_ip)

    def hostname(self, persona: str) -> str:
        """The hostname boxes of ``persona`` have (what telnetd's banner shows before the login)."""
        known = self.personas.get(persona)
        return (known.hostname if known is not None else "") or self._settings.hostname

    def admit(self, src_ip: str) -> str | None:
        """Count a new connection in, or say which limit refuses it."""
        if self._total >= self._limits.max_sessions:
            return "max_sessions"
        if self._per_ip[src_ip] >= self._limits.max_sessions_per_ip:
            return "max_sessions_per_ip"
        self._total += 1
        self._per_ip[src_ip] += 1
        return None

    def leave(self, src_ip: str) -> None:
        self._total -= 1
        self._per_ip[src_ip] -= 1
        if self._per_ip[src_ip] <= 0:
            del self._per_ip[src_ip]

    async def lease(self, session: str, src_ip: str, login: bool = True, persona: str = "") -> Lease:
        """The sandbox for a connection (raises SandboxUnavailable when none can be had). ``login``: False for a
        raw service's connection (its box, if no login ever uses it, goes back after ``raw_ttl_s``). ``persona``:
        what its box is made as ('' = :meth:`choose_persona`'s pick)."""
        start = time.monotonic()
        persona = persona or self.choose_persona(src_ip)
        if self._by_source_ip:
            key = (src_ip, persona)
            lock = self._ip_locks.setdefault(src_ip, asyncio.Lock())
            async with lock:
                held = self._by_ip.get(key)
                if held is not None and time.monotonic() - held.born >= self._settings.ip_max_lifetime_s:
                    self._retire(key, held)
                    held = None
                alive = held is not None and await self._still_running(held.sandbox)
                if held is not None and self._by_ip.get(key) is not held:  # evicted for another IP meanwhile
                    held = None
                if held is not None and alive:
                    if held.timer is not None:
                        held.timer.cancel()
                        held.timer = None
                    held.users += 1
                    held.idle_since = 0.0
                    held.had_login |= login
                    # Where the last connection left it (taken under the IP's lock: the box is already in use).
                    baseline = await take_baseline(held.sandbox) if login else None
                    return Lease(
                        session,
                        src_ip,
                        held.sandbox,
                        0.0,
                        held.accounts,
                        reused=True,
                        tokens=held.tokens,
                        passwd=held.prepared.passwd,
                        logins=held.logins,
                        passwords=held.passwords,
                        baseline=baseline,
                        persona=persona,
                    )
                if held is not None:  # the box died meanwhile: forget it
                    self._by_ip.pop(key, None)
                    self._spawn(self._pool.release(held.sandbox))
                sandbox, evicted = await self._acquire_with_room(session, src_ip, persona)
                box = _IpBox(sandbox, users=1, prepared=await self._prepared(sandbox), had_login=login)
                self._by_ip[key] = box
                return Lease(
                    session,
                    src_ip,
                    sandbox,
                    (time.monotonic() - start) * 1000,
                    box.accounts,
                    tokens=box.tokens,
                    passwd=box.prepared.passwd,
                    logins=box.logins,
                    passwords=box.passwords,
                    evicted=evicted,
                    baseline=box.prepared.baseline,
                    persona=persona,
                )
        sandbox = await self._pool.acquire(session, src_ip, persona)
        prepared = await self._prepared(sandbox)
        return Lease(
            session,
            src_ip,
            sandbox,
            (time.monotonic() - start) * 1000,
            {},
            tokens=prepared.tokens,
            passwd=prepared.passwd,
            baseline=prepared.baseline,
            persona=persona,
        )

    async def _acquire_with_room(self, session: str, src_ip: str, persona: str) -> tuple[Sandbox, str]:
        """A box from the pool; at the cap, the IP box idle longest is released first (its name returned)."""
        try:
            return await self._pool.acquire(session, src_ip, persona), ""
        except SandboxCapReached:
            idle = [(box.idle_since, ip, box) for ip, box in self._by_ip.items() if box.users <= 0]
            if not idle:
                cap_warnings.log(
                    logging.WARNING, "cap", "max_sandboxes reached and every box is in use: %s refused", src_ip
                )
                raise
            _, key, box = min(idle, key=lambda row: row[0])
            if box.timer is not None:
                box.timer.cancel()
            del self._by_ip[key]
            self._pool.evictions += 1
            log.warning(
                "max_sandboxes reached: box %s of %s (idle %.0fs) released before its TTL for %s",
                box.sandbox.name,
                key[0],
                time.monotonic() - box.idle_since,
                src_ip,
            )
            await self._release(box.sandbox)
            return await self._pool.acquire(session, src_ip, persona), box.sandbox.name

    def _retire(self, key: IpKey, box: _IpBox) -> None:
        """The IP's box reached ip_max_lifetime_s: no new connection joins it; it goes when its last ends."""
        del self._by_ip[key]
        log.info(
            "source %s: box %s reached ip_max_lifetime_s; the next connection gets a fresh box",
            key[0],
            box.sandbox.name,
        )
        if box.users <= 0:
            if box.timer is not None:
                box.timer.cancel()
            self._spawn(self._release(box.sandbox))
        else:
            self._retired[box.sandbox.id] = box

    def on_overrun(self, sandbox_id: str, end: Ender) -> None:
        """``end(reason, value)`` is called when the backend stops this box for a bound it passed (its disk)."""
        self._enders.setdefault(sandbox_id, []).append(end)

    def withdraw(self, sandbox_id: str, end: Ender) -> None:
        enders = self._enders.get(sandbox_id, [])
        if end in enders:
            enders.remove(end)
        if not enders:
            self._enders.pop(sandbox_id, None)

    def overrun(self, sandbox_id: str, reason: str, value: int) -> None:
        """The backend froze and is stopping this box (``reason``: e.g. disk_quota): its connections end."""
        enders = self._enders.get(sandbox_id, [])
        log.warning("box %s stopped (%s, %d): ending its %d connections", sandbox_id[:12], reason, value, len(enders))
        for end in list(enders):
            end(reason, value)

    @staticmethod
    async def _still_running(sandbox: Sandbox) -> bool:
        """Is the held box usable? A slow engine is not a dead box: only a clear "no" counts."""
        try:
            return await sandbox.is_running()
        except SandboxUnavailable:
            return True

    async def prepare(self, sandbox: Sandbox) -> Prepared:
        """Warm-up work (the pool's ``prepare`` hook): plant this box's honeytokens, read its accounts, then take
        the baseline its first session's changes are diffed against."""
        tokens, passwd = await self._plant_new(sandbox), await read_passwd(sandbox)
        return Prepared(tokens, passwd, await take_baseline(sandbox))

    async def _prepared(self, sandbox: Sandbox) -> Prepared:
        """What was done to this box while it was warm; honeytokens planted now if it came cold."""
        prepared = self._pool.take_prepared(sandbox.id)
        if prepared is not None:
            return prepared
        tokens = await self._plant_new(sandbox)
        return Prepared(tokens, baseline=await take_baseline(sandbox))

    async def _plant_new(self, sandbox: Sandbox) -> list[Token]:
        """Lure credentials unique to this box (its persona's), watched for reads from the host."""
        persona = self.personas.get(self._pool.persona_of(sandbox.id))
        if not self._honeytokens:
            return []
        standard = persona is None or persona.honeytokens
        tokens = (honeytokens.generate() if standard else []) + honeytokens.lures(persona.lures if persona else [])
        if not tokens:
            return []
        try:
            await honeytokens.plant(sandbox, tokens)
        except SandboxError as exc:
            log.warning("honeytokens not planted in %s: %s", sandbox.name, exc)
            return []
        await self.watcher.watch(sandbox, tokens)
        return tokens

    def prepare_account(self, lease: Lease, username: str, password: str | None) -> None:
        """Start setting up the login's account now (a login succeeded, no channel has asked yet), so the shell
        does not wait for it; :meth:`account` awaits it. Nothing of it runs in the box once a shell is there."""
        if username and username not in lease.preparing:
            task = asyncio.get_running_loop().create_task(self._account(lease, username, password))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved by account()
            lease.preparing[username] = task

    async def account(self, lease: Lease, username: str, password: str | None, wait_password: bool = False) -> Account:
        """The user's account in the box, created on first use (cached per box), its password set before it
        returns: the script that sets it runs as root with no parent in the box, a tell in ``ps`` were it to
        outlive the shell's start. ``wait_password``: this login's ``password`` is in the box's /etc/shadow
        (a login that checks it itself, telnet's), whichever connection set it before."""
        pending = lease.preparing.get(username)
        if pending is not None:
            try:
                account = await asyncio.shield(pending)
            finally:
                if pending.done() and lease.preparing.get(username) is pending:
                    del lease.preparing[username]
        else:
            account = await self._account(lease, username, password)
        if wait_password and lease.passwords.get(username, password) != password:
            await self.set_password(lease, username, password)
            lease.passwords[username] = password
        return account

    async def _account(self, lease: Lease, username: str, password: str | None) -> Account:
        known = lease.accounts.get(username)
        own_sshd = lease.sandbox.features.own_sshd
        if known is not None and (not own_sshd or lease.passwords.get(username) == password):
            return known
        existing = lease.passwd.get(username) if known is None and not own_sshd else None
        if existing is not None:
            # The account is there (read while the box was warm): only its password is set (/etc/shadow).
            await self.set_password(lease, username, password)
            account = existing
        else:  # created, or (the box's own sshd checks this login's password) its password set first
            account = await ensure_account(lease.sandbox, username, password)
        lease.accounts[username] = account
        lease.passwords[username] = password
        return account

    @staticmethod
    async def set_password(lease: Lease, username: str, password: str | None) -> None:
        """The account's password in the box (/etc/shadow) made ``password``; a failure is logged."""
        try:
            await ensure_account(lease.sandbox, username, password)
        except SandboxError as exc:
            log.info("setting %s's password in %s failed: %s", username, lease.sandbox.name, exc)

    async def end(self, lease: Lease) -> bool:
        """The connection is over: release its box now (session affinity, returns True) or after the IP's TTL."""
        if self._by_source_ip:
            retired = self._retired.get(lease.sandbox.id)
            if retired is not None:
                retired.users -= 1
                if retired.users > 0:
                    return False
                del self._retired[lease.sandbox.id]
                await self._release(lease.sandbox)
                return True
            key = (lease.src_ip, lease.persona)
            box = self._by_ip.get(key)
            if box is not None and box.sandbox.id == lease.sandbox.id:
                box.users -= 1
                if box.users <= 0:
                    box.idle_since = time.monotonic()
                    loop = asyncio.get_running_loop()
                    ttl = self._settings.ip_ttl_s if box.had_login else min(self.raw_ttl_s, self._settings.ip_ttl_s)
                    left = self._settings.ip_max_lifetime_s - (box.idle_since - box.born)
                    box.timer = loop.call_later(max(0.0, min(ttl, left)), self._expire, key, box)
                return False
        await self._release(lease.sandbox)
        return True

    def _expire(self, key: IpKey, box: _IpBox) -> None:
        if self._by_ip.get(key) is box and box.users <= 0:
            del self._by_ip[key]
            log.info("source %s: box %s released after ip_ttl_s (or ip_max_lifetime_s)", key[0], box.sandbox.name)
            self._spawn(self._release(box.sandbox))

    async def _release(self, sandbox: Sandbox) -> None:
        self.watcher.forget(sandbox.id)
        try:
            await self._pool.release(sandbox)
        except SandboxError as exc:
            log.warning("release of %s failed: %s", sandbox.name, exc)

    async def close(self) -> None:
        """Release every box still held for a source IP (shutdown)."""
        for key, box in list(self._by_ip.items()):
            if box.timer is not None:
                box.timer.cancel()
            del self._by_ip[key]
            await self._release(box.sandbox)
        for box in list(self._retired.values()):
            await self._release(box.sandbox)
        self._retired.clear()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.watcher.close()

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
