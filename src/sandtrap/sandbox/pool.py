"""A pre-warmed pool of sandboxes: acquire pops a warm one, release keeps it stopped for forensics.

Bookkeeping: every sandbox this sensor owns is in exactly one of ``warm`` (running, unassigned),
``active`` (running, a session's) or ``preserved`` (stopped, kept under the retention policy).
A small ledger (one JSON file per sandbox in ``state_dir``) keeps what Docker labels cannot
(labels are immutable, so a warm box learns its session after creation): session, source IP,
acquired and released times. At start-up :meth:`Pool.start` reconciles what a crash left behind.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Generic, TypeVar

from sandtrap.config import SandboxSettings
from sandtrap.errors import SandboxCapReached, SandboxError, SandboxUnavailable
from sandtrap.logs import RateLimited
from sandtrap.sandbox.base import Sandbox, SandboxBackend, SandboxInfo
from sandtrap.sandbox.ledger import Ledger
from sandtrap.sandbox.personas import Persona, split
from sandtrap.sandbox.sizing import Demand, Memory, host_memory, missing
from sandtrap.sandbox.strays import adopt_leftovers, quietly, stop_eventually, stop_untracked

log = logging.getLogger(__name__)
memory_warnings = RateLimited(log)

Progress = Callable[[int, int], None]

P = TypeVar("P")
# Work done on a box while it waits warm, its result kept for the session that takes the box. Given by the
# layer above (the bridge plants honeytokens and reads the box's accounts); the pool knows only its type.
WarmStep = Callable[[Sandbox], Awaitable[P]]


SWEEP_INTERVAL_S = 60.0  # how often running boxes nobody tracks are looked for
SHRINK_INTERVAL_S = 5.0  # how often warm boxes beyond the target are removed


class Pool(Generic[P]):
    def __init__(
        self,
        backend: SandboxBackend,
        settings: SandboxSettings,
        state_dir: Path,
        prepare: WarmStep[P] | None = None,
        personas: Sequence[tuple[Persona, float]] = (),
        pinned: Sequence[str] = (),
    ) -> None:
        """``personas``: each with its weight (its share of the warm boxes; empty: one, ``default``, the backend's
        own box); ``pinned``: personas a service names, kept warm whatever their weight."""
        self._backend = backend
        self._settings = settings
        self._ledger = Ledger(state_dir)
        self._warm: list[Sandbox] = []
        self._active: dict[str, tuple[Sandbox, SandboxInfo]] = {}
        self._preserved: dict[str, SandboxInfo] = {}
        self._creating = 0
        self._create_started: list[datetime] = []  # when each create under way began (a VM's boot takes minutes)
        self._warming = 0  # warm-ups under way (create, start, prepare)
        self._waiters: list[asyncio.Future[None]] = []  # acquires waiting for a warm-up to land
        self._workers: set[asyncio.Task[None]] = set()  # refill workers (at most pool_refill_parallel)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._assigning: set[str] = set()  # taken from the warm list, not yet active
        self.prepare: WarmStep[P] | None = prepare
        if not personas:
            personas = ((Persona("default", settings.hostname, settings.domain), 1.0),)
        self.personas = {p.name: p for p, _ in personas}
        weights = [(p.name, w) for p, w in personas]
        floors, ceilings = split(settings.pool_size, weights, pinned), split(settings.pool_max, weights, pinned)
        self.demands = {
            name: Demand(floors[name], max(floors[name], ceilings[name]), shrink_after_s=settings.pool_shrink_after_s)
            for name in self.personas
        }
        self._persona_of: dict[str, str] = {}  # box id -> its persona's name (warm and active boxes)
        self._creating_for: Counter[str] = Counter()  # creates under way, by persona
        self._warming_for: Counter[str] = Counter()  # warm-ups under way, by persona
        self.memory: Callable[[], Memory | None] = host_memory
        self.memory_bound_hits = 0  # refills held back because MemAvailable had no room for another box
        self.shrunk = 0  # warm boxes removed because arrivals slowed
        self._prepared: dict[str, P] = {}
        self.start_failures = 0
        self.on_demand_creations = 0
        self.stop_retries = 0  # stops that failed at release and were retried in the background
        self.strays_stopped = 0  # running boxes nobody tracked, stopped by the sweep
        self.cap_hits = 0  # acquires that found max_sandboxes boxes live and nothing warm
        self.evictions = 0  # idle boxes held for a source IP, released early to make room at the cap

    @property
    def demand(self) -> Demand:
        """The first persona's demand (the only one without personas)."""
        return self.demands[next(iter(self.demands))]

    @demand.setter
    def demand(self, value: Demand) -> None:
        self.demands[next(iter(self.demands))] = value

    def persona_of(self, sandbox_id: str) -> str:
        """The persona a box of this pool was made as ('' for one it did not make)."""
        return self._persona_of.get(sandbox_id, "")

    def _target(self) -> int:
        return sum(d.target() for d in self.demands.values())

    def _deficits(self) -> dict[str, int]:
        """Per persona: warm boxes wanted beyond those warm and those being warmed (made, then prepared: in
        neither list meanwhile, counted here so that a second refill worker does not make one more)."""
        warm = Counter(self._persona_of.get(s.id, "") for s in self._warm)
        return {name: d.target() - warm[name] - self._warming_for[name] for name, d in self.demands.items()}

    # -- counts -----------------------------------------------------------------------------
    @property
    def warm(self) -> int:
        return len(self._warm)

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def preserved(self) -> int:
        return len(self._preserved)

    @property
    def live(self) -> int:
        return len(self._warm) + len(self._active) + self._creating

    def stats(self) -> dict[str, int]:
        return {
            "warm": self.warm,
            "active": self.active,
            "preserved": self.preserved,
            "creating": self._creating,
            "target": self._target(),
            "memory_bound_hits": self.memory_bound_hits,
            "shrunk": self.shrunk,
            "start_failures": self.start_failures,
            "stop_retries": self.stop_retries,
            "strays_stopped": self.strays_stopped,
            "cap_hits": self.cap_hits,
            "evictions": self.evictions,
        }

    def info(self, sandbox: Sandbox) -> SandboxInfo | None:
        entry = self._active.get(sandbox.id)
        return entry[1] if entry else None

    # -- life cycle ---------------------------------------------------------------------------
    async def start(self, progress: Progress | None = None) -> None:
        """Reconcile leftovers, then warm ``pool_size`` sandboxes in parallel."""
        await self.reconcile()
        target = self._refill_target()
        log.info("pool warm-up: %d sandboxes", target)
        done = 0
        if progress:
            progress(0, target)

        async def one() -> None:
            nonlocal done
            await self._warm_one()
            done += 1
            if progress:
                progress(done, target)

        results = await asyncio.gather(*(one() for _ in range(target)), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors and len(errors) == target:
            raise SandboxUnavailable(f"pool warm-up failed: {errors[0]}")
        for err in errors:
            log.warning("pool warm-up: one sandbox failed: %s", err)
        log.info("pool ready: %d warm", self.warm)
        self._spawn(self._sweep_forever(SWEEP_INTERVAL_S))
        self._spawn(self._shrink_forever(SHRINK_INTERVAL_S))

    async def reconcile(self) -> None:
        """Adopt what a previous run left: stale warm boxes go, session boxes are kept for forensics."""
        for info in await adopt_leftovers(self._backend, self._ledger):
            self._preserved[info.id] = info
        await self.enforce_retention()

    async def acquire(self, session: str, src_ip: str, persona: str = "") -> Sandbox:
        """A running sandbox of ``persona`` ('' = the first) for ``session``: a warm one if any, else a new one
        (with a warning)."""
        if self._closed:
            raise SandboxUnavailable("pool is shut down")
        persona = persona or next(iter(self.demands))
        if persona not in self.demands:
            raise SandboxUnavailable(f"no persona named {persona!r} in this pool")
        self.demands[persona].arrived()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.start_timeout_s
        # A box being warmed is ready sooner than one created now, and costs the engine nothing more: wait for one.
        while (
            (sandbox := await self._take_warm(session, src_ip, persona)) is None
            and self._warming_for[persona]
            and loop.time() < deadline
        ):
            self.refill()
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:
                break
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        if sandbox is None:
            if self.live >= self._settings.max_sandboxes:
                self.refill()
                self.cap_hits += 1
                raise SandboxCapReached(
                    f"sandbox cap reached ({self._settings.max_sandboxes} live; sandbox.max_sandboxes)"
                )
            log.warning("pool empty: creating a %s sandbox on demand for session %s", persona, session)
            self.on_demand_creations += 1
            try:
                sandbox = await self._create(session, src_ip, persona)
            except SandboxError:
                self.refill()  # keeps trying in the background until the engine is back
                raise
        now = datetime.now(UTC)
        info = SandboxInfo(
            id=sandbox.id,
            name=sandbox.name,
            state="active",
            created=now,
            session=session,
            src_ip=src_ip,
            acquired=now,
        )
        self._ledger.write(info)
        self._active[sandbox.id] = (sandbox, info)
        self.refill()
        return sandbox

    async def _take_warm(self, session: str, src_ip: str, persona: str) -> Sandbox | None:
        """The oldest warm box of ``persona``, claimed for ``session``; None if there is none (or the engine lost
        them)."""
        index = next((i for i, s in enumerate(self._warm) if self._persona_of.get(s.id) == persona), None)
        if index is None:
            return None
        sandbox = self._warm.pop(index)
        box_id = sandbox.id
        self._assigning.add(box_id)  # until it is active (no await between the caller's return and there)
        try:
            await sandbox.claim(session, src_ip)
        except SandboxError as exc:
            # E.g. the engine restarted: every warm box is stopped. Drop them all and refill.
            log.warning("warm sandbox %s unusable (%s); dropping the warm pool", sandbox.name, exc)
            stale, self._warm = [sandbox, *self._warm], []
            for box in stale:
                self._prepared.pop(box.id, None)
                self._persona_of.pop(box.id, None)
            for box in stale:
                self._spawn(quietly(box.remove()))
            return None
        finally:
            self._assigning.discard(box_id)
        return sandbox

    def _wake(self) -> None:
        """A warm box landed (or a warm-up ended): acquires waiting for one look again."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def release(self, sandbox: Sandbox) -> None:
        """Stop (never remove) a session's sandbox and keep it for forensics; then enforce retention."""
        entry = self._active.pop(sandbox.id, None)
        self._persona_of.pop(sandbox.id, None)
        info = entry[1] if entry else SandboxInfo(sandbox.id, sandbox.name, "active", datetime.now(UTC))
        try:
            await sandbox.stop()
        except SandboxError as exc:
            # Never left running: retried in the background (and the sweep catches what that misses).
            log.warning("release: stopping %s failed (%s); retrying in the background", sandbox.name, exc)
            self.stop_retries += 1
            self._spawn(stop_eventually(sandbox))
        info.state = "preserved"
        info.name = sandbox.name
        info.released = datetime.now(UTC)
        self._ledger.write(info)
        self._preserved[sandbox.id] = info
        self.refill()
        await self.enforce_retention()

    async def enforce_retention(self) -> None:
        """Keep at most ``retention_keep`` stopped sandboxes, none older than ``retention_hours``."""
        limit = self._settings.retention_keep
        max_age = timedelta(hours=self._settings.retention_hours)
        now = datetime.now(UTC)
        by_age = sorted(self._preserved.values(), key=lambda i: i.released or i.created)
        doomed = [i for i in by_age if now - (i.released or i.created) > max_age]
        rest = [i for i in by_age if i not in doomed]
        if len(rest) > limit:
            doomed += rest[: len(rest) - limit]
        for info in doomed:
            log.info("retention: removing preserved sandbox %s (session %s)", info.name, info.session)
            try:
                await self._backend.sandbox(info.id, info.name).remove()
            except SandboxError as exc:
                log.warning("retention: removing %s failed: %s", info.name, exc)
                continue
            self._preserved.pop(info.id, None)
            self._ledger.delete(info.id)

    def refill(self) -> None:
        """Start refill workers (up to ``pool_refill_parallel``) that bring the warm count up to the demand's
        target; each starts its next box as soon as its last is warm and stops when the target is met."""
        if self._closed:
            return
        for _ in range(min(self._settings.pool_refill_parallel - len(self._workers), self._refill_target())):
            worker = self._spawn(self._refill_worker())
            self._workers.add(worker)
            worker.add_done_callback(self._workers.discard)

    async def wait_refilled(self) -> None:
        while self._workers:
            await asyncio.wait(set(self._workers))

    async def close(self) -> None:
        """Graceful shutdown: warm boxes are removed (never used), active ones stopped and kept."""
        self._closed = True
        self._wake()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        warm, self._warm = self._warm, []
        await asyncio.gather(*(quietly(s.remove()) for s in warm))
        for sandbox, _ in list(self._active.values()):
            await self.release(sandbox)

    async def sweep(self) -> int:
        """Stop running boxes of this sensor that the pool does not track (a failed stop, a lost task).

        Warm, active, being-assigned and just-created boxes are left alone. Returns how many it stopped.
        """
        tracked = {s.id for s in self._warm} | set(self._active) | self._assigning
        young = datetime.now(UTC) - timedelta(seconds=max(120.0, 4 * self._settings.start_timeout_s))
        if self._create_started:  # a box a create under way is making is not listed as the pool's yet
            young = min(young, min(self._create_started) - timedelta(seconds=5))
        stray = await stop_untracked(self._backend, self._ledger, tracked, young)
        for info in stray:
            self._preserved.setdefault(info.id, info)
        stopped = len(stray)
        self.strays_stopped += stopped
        if stopped:
            await self.enforce_retention()
        return stopped

    async def _sweep_forever(self, interval_s: float) -> None:
        while not self._closed:
            await asyncio.sleep(interval_s)
            try:
                await self.sweep()
            except SandboxError as exc:
                log.warning("sweep failed: %s", exc)

    # -- internals ----------------------------------------------------------------------------
    def _refill_target(self) -> int:
        """How many boxes to start warming now (each persona's demand, the cap, the host's memory)."""
        deficit = sum(max(0, d) for d in self._deficits().values())
        memory = self.memory()
        # A warm box may become a session's that uses all of sandbox.memory: the warm ones and those being made
        # must fit in MemAvailable above the reserve (running sessions already count in MemAvailable).
        room = None if memory is None else memory.boxes(self._settings.memory) - len(self._warm) - self._creating
        wanted = missing(deficit, 0, 0, self.live, self._settings.max_sandboxes, None)
        if room is not None and wanted > room:
            self.memory_bound_hits += 1
            memory_warnings.log(
                logging.WARNING,
                "memory",
                "pool: %d more warm boxes wanted, MemAvailable has room for %d (%d MiB available)",
                wanted,
                max(0, room),
                memory.available // (1024 * 1024) if memory else 0,
            )
            wanted = max(0, room)
        return wanted

    def _pause_s(self) -> float:
        """How long refills wait for a burst of logins to pass (sizing.Demand.pause_s; 0: warm one now)."""
        warm, deficits = Counter(self._persona_of.get(s.id, "") for s in self._warm), self._deficits()
        return min((d.pause_s(warm[n]) for n, d in self.demands.items() if deficits[n] > 0), default=0.0)

    async def _refill_worker(self) -> None:
        failures = 0
        while not self._closed and self._refill_target() > 0:
            if (pause := self._pause_s()) > 0:
                await asyncio.sleep(pause)  # logins are arriving: their CPU first (the deficit is looked at again)
                continue
            try:
                await self._warm_one()
            except SandboxError as exc:
                failures += 1
                if failures == 1 or failures % 10 == 0:
                    log.warning("pool refill failing (%d attempts so far): %s", failures, exc)
                await asyncio.sleep(min(30.0, 0.5 * 2.0**failures))
                continue
            if failures:
                log.info("pool refill recovered after %d failed attempts", failures)
                failures = 0

    async def shrink(self) -> int:
        """Remove warm boxes beyond their persona's target (the oldest first); returns how many."""
        if self._closed:
            return 0
        extra = {name: max(0, -d) for name, d in self._deficits().items()}
        doomed = []
        for box in self._warm:
            name = self._persona_of.get(box.id, "")
            if extra.get(name, 0) > 0:
                extra[name] -= 1
                doomed.append(box)
        if not doomed:
            return 0
        self._warm = [box for box in self._warm if box not in doomed]
        extra_n = len(doomed)
        log.info("pool: arrivals slowed; removing %d warm boxes (target %d)", extra_n, self._target())
        for box in doomed:
            self._prepared.pop(box.id, None)
            self._persona_of.pop(box.id, None)
        await asyncio.gather(*(quietly(box.remove()) for box in doomed))
        self.shrunk += extra_n
        return extra_n

    async def _shrink_forever(self, interval_s: float) -> None:
        while not self._closed:
            await asyncio.sleep(interval_s)
            await self.shrink()

    async def _warm_one(self) -> None:
        deficits = self._deficits()  # the persona furthest below its target (the first on a tie)
        persona = max(deficits, key=lambda name: deficits[name])
        self._warming += 1
        self._warming_for[persona] += 1
        try:
            await self._warm_one_counted(persona)
        finally:
            self._warming -= 1
            self._warming_for[persona] -= 1
            self._wake()

    async def _warm_one_counted(self, persona: str) -> None:
        started = time.monotonic()
        sandbox = await self._create("", "", persona)
        if self.prepare is not None and not self._closed:
            try:
                self._prepared[sandbox.id] = await self.prepare(sandbox)
            except Exception:  # the session prepares it again; the box itself is fine
                log.exception("preparing warm sandbox %s failed", sandbox.name)
            except BaseException:  # cancelled (the honeypot stops): the box is nobody's, remove it
                self._prepared.pop(sandbox.id, None)
                self._persona_of.pop(sandbox.id, None)
                await asyncio.shield(quietly(sandbox.remove()))
                raise
        if self._closed:
            self._prepared.pop(sandbox.id, None)
            self._persona_of.pop(sandbox.id, None)
            await quietly(sandbox.remove())
            return
        self.demands[persona].warmed(time.monotonic() - started)
        self._warm.append(sandbox)

    def take_prepared(self, sandbox_id: str) -> P | None:
        """What :attr:`prepare` made for this box while it was warm (None: nothing, prepare it now)."""
        return self._prepared.pop(sandbox_id, None)

    async def _create(self, session: str, src_ip: str, persona: str) -> Sandbox:
        self._creating += 1
        self._creating_for[persona] += 1
        began = datetime.now(UTC)
        self._create_started.append(began)
        try:
            sandbox = await self._backend.create(session, src_ip, self.personas[persona])
        except SandboxError:
            self.start_failures += 1
            raise
        finally:
            self._creating -= 1
            self._creating_for[persona] -= 1
            self._create_started.remove(began)
        self._persona_of[sandbox.id] = persona
        return sandbox

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
