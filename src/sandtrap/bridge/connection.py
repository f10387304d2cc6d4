"""One attacker connection's life, whatever protocol it came in on: admission, its sandbox (lease), its login
in the box, the limits, and its end (the closing lines in the box, the changed files, the closing record,
the release).

The front ends (``ssh/``) hand it what they learn and call :meth:`Connection.lost` when the transport goes;
it calls back only through the :data:`Closer` it was given. It is its own failure domain: each step of the
end is guarded on its own, so nothing that goes wrong collecting files costs the session its closing record
or leaks its sandbox.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sandtrap.bridge.artifacts import ArtifactStore, SessionArtifacts
from sandtrap.bridge.live import LiveHub
from sandtrap.bridge.login import MAX_FAILED_LOGGED, Account, FailedLogin, Peer, close_argv
from sandtrap.bridge.origin import LoginFacts
from sandtrap.bridge.proxy import Usage
from sandtrap.bridge.sessions import Lease, SessionManager
from sandtrap.config import LimitsSettings, RecordingSettings
from sandtrap.errors import SandboxError
from sandtrap.events import (
    HONEYTOKEN_ISSUED,
    HONEYTOKEN_READ,
    LIMIT_HIT,
    SANDBOX_ASSIGNED,
    SANDBOX_RELEASED,
    SANDBOX_UNAVAILABLE,
    SESSION_CLOSED,
    SESSION_CONNECT,
    SESSION_FILE_CHANGED,
    Emitter,
    EventBus,
    new_session_id,
)
from sandtrap.logs import RateLimited, session_context
from sandtrap.outputs.recording import RecordingHealth
from sandtrap.sandbox.base import OwnSshd, run

log = logging.getLogger(__name__)
refusals = RateLimited(log)  # floods of refused connections log a line a minute, not a line each

Closer = Callable[[], None]  # closes the transport (the front end's own polite close)


@dataclass(frozen=True, slots=True)
class ServiceBounds:
    """The listener a connection came in on (config ``services``): its name, and its own bounds on one
    connection over the ``limits`` section's (None: the section's)."""

    name: str
    timeout_s: float | None = None
    max_bytes: int | None = None
    persona: str = ""  # services[].persona: its connections' boxes are this persona's ('' = by weight)


class NetworkCapture(Protocol):
    """The capture gateway as the bridge sees it (``network.mode: capture``; :class:`sandtrap.network.gateway.
    Gateway`): a session takes its box's traffic (events, downloads stored, a pcap) until the close is awaited."""

    async def open(
        self,
        address: str,
        session: str,
        emit: Callable[..., object],
        store: Callable[[bytes], Awaitable[tuple[str, str, bool, bool]]],
        sandbox_id: str = "",
    ) -> Callable[[], Awaitable[None]] | None: ...

    def forwards(self, host: str) -> bool: ...

    async def forward(
        self, address: str, host: str, port: int, reader: Any, writer: Any, sandbox_id: str = ""
    ) -> None: ...


def printable(text: str | bytes, limit: int = 512) -> str:
    """Escape non-printables the way Cowrie does for client versions; bound the length."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "backslashreplace")
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    return out + ("..." if len(text) > limit else "")


@dataclass
class Hub:
    """What every connection shares: the session manager, the event bus, the artifact store, the limits."""

    manager: SessionManager
    bus: EventBus
    artifacts: ArtifactStore
    limits: LimitsSettings
    recording: RecordingSettings
    data_dir: Path
    sensor: str
    sensor_uuid: str = ""
    live: LiveHub = field(default_factory=LiveHub)
    health: RecordingHealth | None = None
    network: NetworkCapture | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    connections: set[Connection] = field(default_factory=set)
    all_closed: asyncio.Event = field(default_factory=asyncio.Event)
    engine_work: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(8))
    # Stops of released boxes, bounded on their own: a burst of them (a stop takes up to 2 s when shells
    # ignore SIGTERM) must not hold up the next sessions' file collection and closing records.
    stop_work: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(8))

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """A background task that outlives its connection's callbacks (kept until done)."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def drain(self, timeout_s: float = 30.0) -> None:
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=timeout_s)

    def end_all(self, reason: str) -> None:
        """End every open connection (recorded with ``reason``)."""
        for conn in list(self.connections):
            conn.end(reason, limit=False)

    async def wait_all_closed(self, timeout_s: float = 10.0) -> None:
        if self.connections:
            self.all_closed.clear()
            try:
                async with asyncio.timeout(timeout_s):
                    await self.all_closed.wait()
            except TimeoutError:
                pass


class Connection:
    """One TCP connection from an attacker, from its first byte to its closing record."""

    def __init__(
        self,
        hub: Hub,
        src: tuple[str, int],
        dst: tuple[str, int],
        closer: Closer,
        protocol: str = "ssh",
        service: ServiceBounds | None = None,
    ) -> None:
        self.hub = hub
        self.session = new_session_id()
        self.protocol = protocol
        self.service = service or ServiceBounds(protocol)
        self.src_ip, self.src_port = src
        self.dst_ip, self.dst_port = dst
        if self.src_ip.startswith("::ffff:"):
            self.src_ip = self.src_ip[7:]
        self._closer = closer
        # What the box is made as: the service's persona, else the address's, else by weight (config personas).
        self.persona = hub.manager.choose_persona(self.src_ip, self.service.persona)
        self.emitter = Emitter(
            hub.bus,
            hub.sensor,
            self.session,
            self.src_ip,
            self.src_port,
            self.dst_ip,
            self.dst_port,
            hub.sensor_uuid,
            protocol,
            self.service.name,
        )
        # Who logged in, and how: set by the front end's auth hooks.
        self.username = ""
        self.password: str | None = None
        self.auth_method = "password"  # as sshd names it in "Accepted <method> for ..."
        self.failed_logins: deque[FailedLogin] = deque(maxlen=MAX_FAILED_LOGGED)  # for the box's auth.log
        # The connection's login session in the box (XDG_SESSION_ID), set by its first shell or exec channel,
        # whose helper logs "Accepted"; the account it logged in, for the closing lines.
        self.login_id: int | None = None
        self.login_account: Account | None = None
        self.close_reason = ""
        # The box's activity (honeytoken reads, changed files) is this connection's: a login's, not a raw service's
        # (an HTTP request to a box must not take the reads of the SSH session in it, nor collect its files).
        self.owns_box_activity = True
        self.started = time.monotonic()
        self.usage = Usage()
        self.artifacts = SessionArtifacts(hub.artifacts, hub.recording)
        self._admitted = False
        self._lease_task: asyncio.Task[Lease] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._read_reporter: Callable[..., object] | None = None  # this session's honeytoken reads
        self._capture_close: Callable[[], Awaitable[None]] | None = None

    @property
    def is_admitted(self) -> bool:
        return self._admitted

    # -- start and end ----------------------------------------------------------------------------
    def open(self) -> bool:
        """Record the connection and admit it, or refuse it (recorded, False: the front end aborts)."""
        session_context.set(f"{self.session} {self.src_ip}")
        self.emitter.emit(SESSION_CONNECT)
        refused = self.hub.manager.admit(self.src_ip)
        if refused is not None:
            self.emitter.emit(LIMIT_HIT, limit=refused, value=1)
            self.close_reason = refused
            refusals.log(logging.INFO, refused, "connection from %s refused: %s", self.src_ip, refused)
            return False
        self._admitted = True
        self.hub.connections.add(self)
        self._watchdog = asyncio.get_running_loop().create_task(self._watch())
        return True

    def end(self, reason: str, value: object = "", limit: bool = True) -> None:
        """Close the connection on purpose (a limit, shutdown, a failed sandbox), recording why."""
        if self.close_reason:
            return
        self.close_reason = reason
        if limit:
            self.emitter.emit(LIMIT_HIT, limit=reason, value=value)
        log.info("closing connection: %s", reason)
        self._closer()

    def lost(self, error: str | None = None) -> None:
        """The transport is gone (``error``: why, None for a clean close): finish in the background."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        if not self.close_reason and (failure := self._sandbox_failure()):
            self.close_reason = failure
        if not self.close_reason:
            self.close_reason = "client_closed" if error is None else f"error: {printable(error, 200)}"
        duration = time.monotonic() - self.started
        if self._admitted:
            self.hub.manager.leave(self.src_ip)
            self._admitted = False
        self.hub.connections.discard(self)
        if not self.hub.connections:
            self.hub.all_closed.set()
        self.hub.spawn(self._finish(duration))

    def track(self, coro: Coroutine[Any, Any, None]) -> None:
        """Work that must finish before the session's closing record (e.g. storing uploads)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def reporter(self, eventid: str, **extra: object) -> Callable[..., object]:
        """A callable that emits ``eventid`` with the fields it is given (and ``extra``)."""
        emit = self.emitter.emit

        def report(**fields: object) -> object:
            return emit(eventid, **extra, **fields)

        return report

    async def _finish(self, duration: float) -> None:
        """After the connection: the closing lines in the box, its changed files, the record, the release."""
        session_context.set(f"{self.session} {self.src_ip}")
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=120)
        lease = None
        if self._lease_task is not None:
            try:
                lease = await self._lease_task
            except (Exception, asyncio.CancelledError):  # recorded where it failed; the close record still comes
                lease = None
        if lease is not None and self.protocol == "ssh":
            await self._log_close(lease, self.login_account)  # sshd's lines; login(1) logs its own close
        if self._capture_close is not None:
            try:
                await self._capture_close()
            except Exception:
                log.exception("closing the session's network capture failed")
        if lease is not None:
            self.hub.manager.withdraw(lease.sandbox.id, self.end)
        if lease is not None and self._read_reporter is not None:
            # Our own reads of the box's files (artifact collection) are not the attacker's.
            self.hub.manager.watcher.withdraw(lease.sandbox.id, self._read_reporter)
        if lease is not None and self.owns_box_activity:
            try:
                async with self.hub.engine_work:  # a burst of closing sessions must not swamp the engine
                    await self.artifacts.collect_changes(
                        lease.sandbox, self.reporter(SESSION_FILE_CHANGED), lease.baseline, self._login_facts(lease)
                    )
            except Exception:
                log.exception("collecting changed files failed")
        self.emitter.emit(
            SESSION_CLOSED,
            duration=f"{duration:.1f}",
            duration_ms=int(duration * 1000),
            reason=self.close_reason,
            bytes_in=self.usage.bytes_in,
            bytes_out=self.usage.bytes_out,
        )
        if lease is not None:
            try:
                async with self.hub.stop_work:
                    released = await self.hub.manager.end(lease)
                if released:
                    self.emitter.emit(SANDBOX_RELEASED, sandbox_id=lease.sandbox.id, sandbox_name=lease.sandbox.name)
            except Exception:
                log.exception("releasing the sandbox failed")

    def _login_facts(self, lease: Lease) -> LoginFacts:
        """What this connection's login did to the box (its changed files' origin tells it apart)."""
        account = self.login_account
        users = [u for u in {self.username, account.name if account else ""} if u]
        # A home useradd made: the account was not in the box when it was prepared (unknown: none assumed).
        new = account is not None and bool(lease.passwd) and account.name not in lease.passwd
        return LoginFacts(users=users, new_homes=[account.home] if new and account else [])

    async def _log_close(self, lease: Lease, account: Account | None) -> None:
        """sshd's lines for the end of the connection, once, in the box's auth.log (session.c, -x); a box whose
        own sshd served the login closes that connection instead (its sshd logs the rest)."""
        box = lease.sandbox
        if box.features.own_sshd and isinstance(box, OwnSshd):
            try:
                await box.end_login(self.session)
            except SandboxError as exc:
                log.info("the box's sshd connection did not close: %s", exc)
            return
        if account is None:  # no shell or exec channel: the helper logged no login
            return
        argv = close_argv(account, Peer(self.src_ip, self.src_port, self.dst_ip, self.dst_port))
        try:
            async with self.hub.engine_work:
                await run(lease.sandbox, argv, timeout_s=10)
        except (SandboxError, TimeoutError) as exc:  # a box that died or hangs: nothing more to log there
            log.info("closing lines not logged in the box: %s", exc)

    async def _watch(self) -> None:
        limits = self.hub.limits
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            if now - self.started > limits.max_duration_s:
                return self.end("max_duration_s", limits.max_duration_s)
            if self._lease_task is not None and now - self.usage.last_activity > limits.idle_timeout_s:
                return self.end("idle_timeout_s", limits.idle_timeout_s)
            if self.usage.bytes_in > limits.max_bytes_in:
                return self.end("max_bytes_in", self.usage.bytes_in)
            if self.usage.bytes_out > limits.max_bytes_out:
                return self.end("max_bytes_out", self.usage.bytes_out)
            if self.service.timeout_s is not None and now - self.started > self.service.timeout_s:
                return self.end("timeout_seconds", self.service.timeout_s)
            both = self.usage.bytes_in + self.usage.bytes_out
            if self.service.max_bytes is not None and both > self.service.max_bytes:
                return self.end("max_bytes", both)
            if failure := self._sandbox_failure():
                return self.end(failure, limit=False)

    def _sandbox_failure(self) -> str:
        """``sandbox_failed: <why>`` when the session's sandbox died under it and its backend says why (a VM's
        ``failure``: a panic, a kill, out of memory, no answer); else empty."""
        task = self._lease_task
        if task is None or not task.done() or task.cancelled() or task.exception() is not None:
            return ""
        failure = getattr(task.result().sandbox, "failure", "")
        return f"sandbox_failed: {printable(str(failure), 200)}" if failure else ""

    def forwarding(self, host: str, port: int) -> Callable[[Any, Any], Awaitable[None]] | None:
        """A handler for an SSH client's direct-tcpip channel to ``host:port``, routed into the capture
        gateway as the session box's own connection (``network.direct_tcpip: capture``); None: refuse it."""
        network = self.hub.network
        if network is None or not network.forwards(host):
            return None

        async def relay(reader: Any, writer: Any) -> None:
            try:
                lease = await self.lease()
                address = await lease.sandbox.network_address()
                if address:
                    await network.forward(address, host, port, reader, writer, lease.sandbox.id)
            except SandboxError:
                pass  # recorded by the lease
            finally:
                writer.close()

        return relay

    # -- the sandbox this connection uses ---------------------------------------------------------
    def lease(self) -> asyncio.Future[Lease]:
        """The connection's sandbox; the first call starts the acquisition, later ones share it."""
        if self._lease_task is None:
            self._lease_task = asyncio.get_running_loop().create_task(self._acquire())
            # Its failure is recorded and handled by whoever awaits it; never "exception never retrieved".
            self._lease_task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return asyncio.shield(self._lease_task)

    def start_lease(self) -> None:
        """Start the acquisition now without waiting for it (a login succeeded: the box is ready by the time a
        channel asks)."""
        self.lease().add_done_callback(lambda f: f.cancelled() or f.exception())

    async def _acquire(self) -> Lease:
        try:
            lease = await self.hub.manager.lease(
                self.session, self.src_ip, login=self.owns_box_activity, persona=self.persona
            )
        except SandboxError as exc:
            self.emitter.emit(SANDBOX_UNAVAILABLE, reason=printable(str(exc), 300))
            refusals.log(logging.WARNING, "no-sandbox", "no sandbox for a session: %s", exc)
            raise
        self.emitter.emit(
            SANDBOX_ASSIGNED,
            sandbox_id=lease.sandbox.id,
            sandbox_name=lease.sandbox.name,
            acquire_ms=round(lease.acquire_ms, 1),
            reused=lease.reused,
            persona=lease.persona,
            **({"evicted": lease.evicted} if lease.evicted else {}),
        )
        self.hub.manager.on_overrun(lease.sandbox.id, self.end)  # e.g. its disk bound: sandtrap.limit.hit disk_quota
        if not self.owns_box_activity:  # a raw service's connection: the box's lures are its logins' business
            return lease
        if self.username:  # a login succeeded: its account is made ready while the client opens its channel
            self.hub.manager.prepare_account(lease, self.username, self.password)
        for token in lease.tokens:  # the session's record names every lure value it was given
            self.emitter.emit(HONEYTOKEN_ISSUED, kind=token.kind, path=token.path, value=token.value)
        emit = self.emitter.emit
        if self.hub.network is not None:
            try:
                address = await lease.sandbox.network_address()
                if address:
                    self._capture_close = await self.hub.network.open(
                        address, self.session, emit, self.artifacts.keep, lease.sandbox.id
                    )
            except Exception:  # the session goes on unrecorded on the network rather than not at all
                log.exception("the session's network capture did not start")

        def read(kind: str, path: str, **detail: object) -> object:
            return emit(HONEYTOKEN_READ, kind=kind, path=path, **detail)

        self._read_reporter = read
        self.hub.manager.watcher.report_to(lease.sandbox.id, read)
        return lease

    def login_failed(self, username: str, method: str) -> None:
        """A refused attempt, for the box's auth.log when the login finally succeeds."""
        self.failed_logins.append(FailedLogin(time.time(), username, method))
