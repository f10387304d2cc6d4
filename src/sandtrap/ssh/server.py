"""The SSH front end: an asyncssh server that looks like Debian bookworm's OpenSSH 9.2p1.

One :class:`ConnectionHandler` per TCP connection. It is its own failure domain: whatever an
attacker sends, it records, refuses or relays, and the server serves on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncssh

from sandtrap.bridge.artifacts import ArtifactStore, SessionArtifacts
from sandtrap.bridge.live import LiveHub
from sandtrap.bridge.login import MAX_FAILED_LOGGED, Account, FailedLogin, Peer, close_argv
from sandtrap.bridge.proxy import Usage
from sandtrap.bridge.sessions import Lease, SessionManager
from sandtrap.config import Settings, split_listen
from sandtrap.errors import SandboxError
from sandtrap.events import (
    AGENT_REQUEST,
    AUTH_TOO_MANY,
    CLIENT_FINGERPRINT,
    CLIENT_KEX,
    CLIENT_VERSION,
    DIRECT_TCPIP_REQUEST,
    FORWARD_REQUEST,
    HONEYTOKEN_ISSUED,
    HONEYTOKEN_READ,
    LIMIT_HIT,
    LOGIN_FAILED,
    LOGIN_SUCCESS,
    SANDBOX_ASSIGNED,
    SANDBOX_RELEASED,
    SANDBOX_UNAVAILABLE,
    SESSION_CLOSED,
    SESSION_CONNECT,
    SESSION_FILE_CHANGED,
    X11_REQUEST,
    Emitter,
    EventBus,
    new_session_id,
)
from sandtrap.logs import RateLimited, session_context
from sandtrap.outputs.recording import RecordingHealth
from sandtrap.ssh.algorithms import (
    COMPRESSION_ALGS,
    ENCRYPTION_ALGS,
    KEX_ALGS,
    MAC_ALGS,
    SIGNATURE_ALGS,
    host_key_pairs,
)
from sandtrap.ssh.auth import AttemptState, AuthPolicy
from sandtrap.ssh.hostkeys import host_key_dir, load_host_keys
from sandtrap.ssh.kex import kex_event_fields, parse_kexinit
from sandtrap.ssh.wire import imitate_sshd

log = logging.getLogger(__name__)
refusals = RateLimited(log)  # floods of refused connections log a line a minute, not a line each

DISC_PROTOCOL_ERROR = 2
DISC_BY_APPLICATION = 11


def printable(text: str | bytes, limit: int = 512) -> str:
    """Escape non-printables the way Cowrie does for client versions; bound the length."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "backslashreplace")
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    return out + ("..." if len(text) > limit else "")


@dataclass
class ServerContext:
    """What every connection shares: settings, policy, session manager, event bus, artifact store."""

    settings: Settings
    policy: AuthPolicy
    manager: SessionManager
    bus: EventBus
    artifacts: ArtifactStore
    live: LiveHub = field(default_factory=LiveHub)
    sensor_uuid: str = ""
    recording: RecordingHealth | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    connections: set[ConnectionHandler] = field(default_factory=set)
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


class ConnectionHandler(asyncssh.SSHServer):
    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.session = new_session_id()
        self.emitter: Emitter | None = None
        self.conn: asyncssh.SSHServerConnection | None = None
        self.src_ip = ""
        self.src_port = 0
        self.dst_ip = ""
        self.dst_port = 0
        self.username = ""
        self.password: str | None = None
        self.auth_method = "password"  # as sshd names it in "Accepted <method> for ..."
        self.failed_logins: deque[FailedLogin] = deque(maxlen=MAX_FAILED_LOGGED)  # for the box's auth.log
        # The connection's login session in the box (XDG_SESSION_ID), set by its first shell or exec channel,
        # whose helper logs "Accepted"; the account it logged in, for the closing lines (_log_close).
        self.login_id: int | None = None
        self.login_account: Account | None = None
        self.close_reason = ""
        self.started = time.monotonic()
        self._admitted = False
        self._attempts = AttemptState()
        self._tries = 0
        self._kex_emitted = False
        self._lease_task: asyncio.Task[Lease] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._channels = 0
        self.usage = Usage()
        self.artifacts = SessionArtifacts(ctx.artifacts, ctx.settings.recording)
        self._pending: set[asyncio.Task[None]] = set()
        self._keys_seen: set[tuple[str, str]] = set()
        self._pending_key: dict[str, str] | None = None

    # -- connection life cycle ----------------------------------------------------------------------
    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        imitate_sshd(conn)  # answer on the wire as sshd 9.2p1 does before login (ssh/wire.py)
        peer = conn.get_extra_info("peername") or ("", 0)
        sock = conn.get_extra_info("sockname") or ("", 0)
        self.src_ip, self.src_port = str(peer[0]), int(peer[1])
        self.dst_ip, self.dst_port = str(sock[0]), int(sock[1])
        if self.src_ip.startswith("::ffff:"):
            self.src_ip = self.src_ip[7:]
        self.emitter = Emitter(
            self.ctx.bus,
            self.ctx.settings.sensor,
            self.session,
            self.src_ip,
            self.src_port,
            self.dst_ip,
            self.dst_port,
            self.ctx.sensor_uuid,
        )
        session_context.set(f"{self.session} {self.src_ip}")
        self.emitter.emit(SESSION_CONNECT)
        refused = self.ctx.manager.admit(self.src_ip)
        if refused is not None:
            self.emitter.emit(LIMIT_HIT, limit=refused, value=1)
            self.close_reason = refused
            refusals.log(logging.INFO, refused, "connection from %s refused: %s", self.src_ip, refused)
            conn.abort()
            return
        self._admitted = True
        self.ctx.connections.add(self)
        # Refusals asyncssh does itself, made visible: X11 and agent forwarding requests.
        conn.attach_x11_listener = self._refuse_x11  # type: ignore[method-assign,assignment]
        conn.create_agent_listener = self._refuse_agent  # type: ignore[method-assign]
        self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    def connection_lost(self, exc: Exception | None) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if not self.close_reason:
            self.close_reason = "client_closed" if exc is None else f"error: {printable(str(exc), 200)}"
            if exc is not None and self.conn is not None and not self.conn.get_extra_info("username"):
                # Before login: a bad identification, key exchange or packet (ssh/wire.py answered it as sshd).
                refusals.log(
                    logging.INFO,
                    "pre-auth-error",
                    "connection from %s ended before login: %s",
                    self.src_ip,
                    printable(str(exc), 200),
                )
        self._emit_kex()
        duration = time.monotonic() - self.started
        if self._admitted:
            self.ctx.manager.leave(self.src_ip)
            self._admitted = False
        self.ctx.connections.discard(self)
        if not self.ctx.connections:
            self.ctx.all_closed.set()
        self.ctx.spawn(self._finish(duration))

    def track(self, coro: Coroutine[Any, Any, None]) -> None:
        """Work that must finish before the session's closing record (e.g. storing uploads)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _finish(self, duration: float) -> None:
        """After the connection: collect what the session left in its box, close the record, release.

        Each step is guarded on its own: nothing that goes wrong collecting files may cost the
        session its closing record or leak its sandbox.
        """
        session_context.set(f"{self.session} {self.src_ip}")
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=120)
        lease = None
        if self._lease_task is not None:
            try:
                lease = await self._lease_task
            except (Exception, asyncio.CancelledError):  # recorded where it failed; the close record still comes
                lease = None
        if lease is not None and self.login_account is not None:
            await self._log_close(lease)
        if lease is not None and self.emitter is not None:
            # Our own reads of the box's files (artifact collection) are not the attacker's.
            self.ctx.manager.watcher.report_to(lease.sandbox.id, None)
            try:
                async with self.ctx.engine_work:  # a burst of closing sessions must not swamp the engine
                    await self.artifacts.collect_changes(lease.sandbox, self._reporter(SESSION_FILE_CHANGED))
            except Exception:
                log.exception("collecting changed files failed")
        if self.emitter is not None:
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
                async with self.ctx.stop_work:
                    released = await self.ctx.manager.end(lease)
                if released and self.emitter is not None:
                    self.emitter.emit(SANDBOX_RELEASED, sandbox_id=lease.sandbox.id, sandbox_name=lease.sandbox.name)
            except Exception:
                log.exception("releasing the sandbox failed")

    async def _log_close(self, lease: Lease) -> None:
        """sshd's lines for the end of the connection, once, in the box's auth.log (session.c, -x)."""
        assert self.login_account is not None
        argv = close_argv(self.login_account, Peer(self.src_ip, self.src_port, self.dst_ip, self.dst_port))
        try:
            async with self.ctx.engine_work, asyncio.timeout(10):
                proc = await lease.sandbox.exec(argv)
                await proc.close_stdin()
                while await proc.read() is not None:
                    pass
                await proc.wait()
        except (SandboxError, TimeoutError) as exc:  # a box that died or hangs: nothing more to log there
            log.info("closing lines not logged in the box: %s", exc)

    def _reporter(self, eventid: str) -> Callable[..., object]:
        assert self.emitter is not None
        emit = self.emitter.emit

        def report(**fields: object) -> object:
            return emit(eventid, **fields)

        return report

    def end(self, reason: str, value: object = "", limit: bool = True) -> None:
        """Close the connection on purpose (a limit, shutdown), recording why."""
        if self.close_reason:
            return
        self.close_reason = reason
        if self.emitter is not None and limit:
            self.emitter.emit(LIMIT_HIT, limit=reason, value=value)
        log.info("closing connection: %s", reason)
        if self.conn is not None:
            self.conn.close()

    async def _watch(self) -> None:
        limits = self.ctx.settings.limits
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

    # -- the sandbox this connection uses -------------------------------------------------------------
    def lease(self) -> asyncio.Future[Lease]:
        """The connection's sandbox; the first call starts the acquisition, later ones share it."""
        if self._lease_task is None:
            self._lease_task = asyncio.get_running_loop().create_task(self._acquire())
            # Its failure is recorded and handled by whoever awaits it; never "exception never retrieved".
            self._lease_task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return asyncio.shield(self._lease_task)

    def _start_lease(self) -> None:
        """Start the acquisition now without waiting for it (its shield is not awaited by anyone)."""
        self.lease().add_done_callback(lambda f: f.cancelled() or f.exception())

    async def _acquire(self) -> Lease:
        assert self.emitter is not None
        try:
            lease = await self.ctx.manager.lease(self.session, self.src_ip)
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
        )
        for token in lease.tokens:  # the session's record names every lure value it was given
            self.emitter.emit(HONEYTOKEN_ISSUED, kind=token.kind, path=token.path, value=token.value)
        emit = self.emitter.emit
        self.ctx.manager.watcher.report_to(
            lease.sandbox.id, lambda kind, path: emit(HONEYTOKEN_READ, kind=kind, path=path)
        )
        return lease

    # -- auth ---------------------------------------------------------------------------------------
    def _emit_kex(self) -> None:
        if self._kex_emitted or self.conn is None or self.emitter is None:
            return
        self._kex_emitted = True
        version = self.conn.get_extra_info("client_version") or ""
        if version:
            self.emitter.emit(CLIENT_VERSION, version=printable(version))
        raw = getattr(self.conn, "_client_kexinit", b"")  # asyncssh keeps the client's KEXINIT payload
        if raw:
            try:
                self.emitter.emit(CLIENT_KEX, **kex_event_fields(parse_kexinit(raw)))
            except ValueError as exc:
                log.info("unparsable client KEXINIT: %s", exc)

    def begin_auth(self, username: str) -> bool:
        self._emit_kex()
        return True

    def password_auth_supported(self) -> bool:
        return True

    def kbdint_auth_supported(self) -> bool:
        return self.ctx.settings.auth.keyboard_interactive  # Debian: KbdInteractiveAuthentication no

    def public_key_auth_supported(self) -> bool:
        return True

    def get_kbdint_challenge(self, username: str, lang: str, submethods: str) -> tuple[str, str, str, list[Any]]:
        return "", "", "", [("Password: ", False)]

    async def validate_kbdint_response(self, username: str, responses: Sequence[str]) -> bool:
        accepted = self._check_password(username, responses[0] if len(responses) == 1 else "", "keyboard-interactive")
        await self._pam_delay(accepted)
        return accepted

    async def validate_password(self, username: str, password: str) -> bool:
        accepted = self._check_password(username, password, "password")
        await self._pam_delay(accepted)
        return accepted

    async def _pam_delay(self, accepted: bool) -> None:
        """Answer when sshd with PAM would: a timer, not a busy wait (an instant answer is a tell)."""
        auth = self.ctx.settings.auth
        base = auth.success_delay_s if accepted else auth.failure_delay_s
        if base > 0:
            await asyncio.sleep(base * random.uniform(0.75, 1.25))

    def _check_password(self, username: str, password: str, method: str) -> bool:
        assert self.emitter is not None
        decision = self.ctx.policy.check_password(self._attempts, self.src_ip, username, password)
        name = printable(username, 256)
        event = LOGIN_SUCCESS if decision.accepted else LOGIN_FAILED
        self.emitter.emit(
            event, username=name, password=printable(password, 256), method=method, reason=decision.reason
        )
        if decision.accepted:
            self.username, self.password = username, password
            self.auth_method = "password" if method == "password" else "keyboard-interactive/pam"
            self._start_lease()  # start acquiring now: the box is ready by the time the channel asks
            return True
        sshd_method = "password" if method == "password" else "keyboard-interactive/pam"
        self.failed_logins.append(FailedLogin(time.time(), username, sshd_method))
        self._count_failure(name)
        return False

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        """Called for the client's query and again for its signed request: record each key once.

        Success is recorded in :meth:`auth_completed`, after asyncssh has checked the signature.
        """
        assert self.emitter is not None
        fields = {
            "username": printable(username, 256),
            "fingerprint": key.get_fingerprint("md5").removeprefix("MD5:"),
            "fingerprint_sha256": key.get_fingerprint("sha256"),
            "key": key.export_public_key("openssh").decode("ascii", "replace").strip(),
            "type": key.get_algorithm(),
        }
        seen = (fields["username"], fields["fingerprint"])
        first_time = seen not in self._keys_seen
        if first_time and len(self._keys_seen) < 100:
            self._keys_seen.add(seen)
            self.emitter.emit(CLIENT_FINGERPRINT, **fields)
        decision = self.ctx.policy.check_publickey(self._attempts, self.src_ip, username)
        if decision.accepted:
            self._pending_key = fields
            self.username, self.password = username, None
            self.auth_method = "publickey"
            return True
        if first_time:
            self.emitter.emit(LOGIN_FAILED, method="publickey", **fields)
            self._count_failure(fields["username"])
        return False

    def auth_completed(self) -> None:
        if self._pending_key is not None and self.emitter is not None:
            self.emitter.emit(LOGIN_SUCCESS, method="publickey", **self._pending_key)
            self._start_lease()

    def _count_failure(self, name: str) -> None:
        self._tries += 1
        if self._tries >= self.ctx.settings.ssh.max_auth_tries and self.conn is not None:
            assert self.emitter is not None
            self.emitter.emit(AUTH_TOO_MANY, username=name, attempts=self._tries)
            self.close_reason = "max_auth_tries"
            self.conn.disconnect(DISC_PROTOCOL_ERROR, "Too many authentication failures")

    # -- channels and refusals --------------------------------------------------------------------
    def session_requested(self) -> asyncssh.SSHServerSession[bytes]:
        from sandtrap.ssh.channels import ChannelBridge

        self._channels += 1
        return ChannelBridge(self, self._channels - 1)

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> bool:
        assert self.emitter is not None
        self.emitter.emit(
            DIRECT_TCPIP_REQUEST,
            dst_ip=printable(dest_host, 256),
            dst_port=dest_port,
            orig_ip=printable(orig_host, 256),
            orig_port=orig_port,
        )
        # What OpenSSH answers with AllowTcpForwarding no.
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "open failed")

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        assert self.emitter is not None
        self.emitter.emit(FORWARD_REQUEST, kind="remote", dst_ip=printable(listen_host, 256), dst_port=listen_port)
        return False

    async def _refuse_x11(self, *_: Any) -> None:
        if self.emitter is not None:
            self.emitter.emit(X11_REQUEST, channel=-1)
        return None

    async def _refuse_agent(self, *_: Any) -> bool:
        if self.emitter is not None:
            self.emitter.emit(AGENT_REQUEST, channel=-1)
        return False


class SSHFrontEnd:
    """Owns the listening server."""

    def __init__(self, ctx: ServerContext, data_dir: Any) -> None:
        self._ctx = ctx
        self._data_dir = data_dir
        self._server: asyncssh.SSHAcceptor | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.get_port())

    async def start(self) -> None:
        s = self._ctx.settings.ssh
        host, port = split_listen(s.listen)
        keys = await asyncio.to_thread(load_host_keys, host_key_dir(s.host_key_dir, self._data_dir))
        self._server = await asyncssh.create_server(
            lambda: ConnectionHandler(self._ctx),
            host if host not in ("0.0.0.0", "::", "") else "",
            port,
            server_host_keys=host_key_pairs(keys),
            server_version=s.version.removeprefix("SSH-2.0-"),
            kex_algs=KEX_ALGS,
            encryption_algs=ENCRYPTION_ALGS,
            mac_algs=MAC_ALGS,
            compression_algs=COMPRESSION_ALGS,
            signature_algs=SIGNATURE_ALGS,
            login_timeout=s.login_grace_time_s,
            line_editor=False,
            encoding=None,
            allow_pty=True,
            x11_forwarding=False,
            agent_forwarding=False,
            keepalive_interval=0,
            reuse_address=True,
        )
        log.info("ssh listening on %s (port %d)", s.listen, self.port)

    async def close(self) -> None:
        """Stop listening, end every open connection (recorded as ``shutdown``), wait for their records."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        for handler in list(self._ctx.connections):
            handler.end("shutdown", limit=False)
        if self._ctx.connections:
            self._ctx.all_closed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await self._ctx.all_closed.wait()
        await self._ctx.drain()
