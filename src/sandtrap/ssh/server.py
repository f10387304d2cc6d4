"""The SSH front end: an asyncssh server that looks like Debian bookworm's OpenSSH 9.2p1.

One :class:`ConnectionHandler` per TCP connection. It is its own failure domain: whatever an
attacker sends, it records, refuses or relays, and the server serves on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from sandtrap.bridge.auth import AttemptState, AuthPolicy
from sandtrap.bridge.channel import Channel
from sandtrap.bridge.connection import Connection, Hub, ServiceBounds, printable, refusals
from sandtrap.config import AuthSettings, SSHSettings, split_listen
from sandtrap.events import (
    AGENT_REQUEST,
    AUTH_TOO_MANY,
    CLIENT_FINGERPRINT,
    CLIENT_KEX,
    CLIENT_VERSION,
    DIRECT_TCPIP_REQUEST,
    FORWARD_REQUEST,
    LOGIN_FAILED,
    LOGIN_SUCCESS,
    X11_REQUEST,
    Emitter,
)
from sandtrap.ssh.algorithms import (
    COMPRESSION_ALGS,
    ENCRYPTION_ALGS,
    KEX_ALGS,
    MAC_ALGS,
    SIGNATURE_ALGS,
    host_key_pairs,
)
from sandtrap.ssh.channels import ChannelBridge
from sandtrap.ssh.hostkeys import host_key_dir, load_host_keys
from sandtrap.ssh.kex import kex_event_fields, parse_kexinit
from sandtrap.ssh.wire import imitate_sshd

log = logging.getLogger(__name__)

DISC_PROTOCOL_ERROR = 2
DISC_BY_APPLICATION = 11


@dataclass
class ServerContext:
    """What every SSH connection shares: the bridge's hub, the SSH and auth settings, the auth policy."""

    hub: Hub
    ssh: SSHSettings
    auth: AuthSettings
    policy: AuthPolicy
    service: ServiceBounds | None = None  # the ssh listener's name and bounds (config `services`)


class ConnectionHandler(asyncssh.SSHServer):
    """asyncssh's hooks for one TCP connection; its life (sandbox, limits, records) is the bridge's Connection."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.conn: asyncssh.SSHServerConnection | None = None
        self.link: Connection | None = None
        self._attempts = AttemptState()
        self._tries = 0
        self._kex_emitted = False
        self._channels = 0
        self._open_sessions = 0  # session channels open now (OpenSSH's MaxSessions counts these)
        self._sessions_refused = 0
        self._keys_seen: set[tuple[str, str]] = set()
        self._pending_key: dict[str, str] | None = None

    @property
    def emitter(self) -> Emitter:
        assert self.link is not None
        return self.link.emitter

    # -- connection life cycle ----------------------------------------------------------------------
    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        imitate_sshd(conn)  # answer on the wire as sshd 9.2p1 does before login (ssh/wire.py)
        peer = conn.get_extra_info("peername") or ("", 0)
        sock = conn.get_extra_info("sockname") or ("", 0)
        self.link = Connection(
            self.ctx.hub,
            (str(peer[0]), int(peer[1])),
            (str(sock[0]), int(sock[1])),
            conn.close,
            "ssh",
            self.ctx.service,
        )
        if not self.link.open():
            conn.abort()
            return
        # Refusals asyncssh does itself, made visible: X11 and agent forwarding requests.
        conn.attach_x11_listener = self._refuse_x11  # type: ignore[method-assign,assignment]
        conn.create_agent_listener = self._refuse_agent  # type: ignore[method-assign]

    def connection_lost(self, exc: Exception | None) -> None:
        if (
            exc is not None
            and self.link is not None
            and self.conn is not None
            and not self.conn.get_extra_info("username")
        ):
            # Before login: a bad identification, key exchange or packet (ssh/wire.py answered it as sshd).
            refusals.log(
                logging.INFO,
                "pre-auth-error",
                "connection from %s ended before login: %s",
                self.link.src_ip,
                printable(str(exc), 200),
            )
        self._emit_kex()
        if self.link is not None:
            self.link.lost(None if exc is None else str(exc))

    # -- auth ---------------------------------------------------------------------------------------
    def _emit_kex(self) -> None:
        if self._kex_emitted or self.conn is None or self.link is None:
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
        return self.ctx.auth.keyboard_interactive  # Debian: KbdInteractiveAuthentication no

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
        auth = self.ctx.auth
        base = auth.success_delay_s if accepted else auth.failure_delay_s
        if base > 0:
            await asyncio.sleep(base * random.uniform(0.75, 1.25))

    def _check_password(self, username: str, password: str, method: str) -> bool:
        link = self.link
        assert link is not None
        decision = self.ctx.policy.check_password(self._attempts, link.src_ip, username, password)
        name = printable(username, 256)
        event = LOGIN_SUCCESS if decision.accepted else LOGIN_FAILED
        self.emitter.emit(
            event, username=name, password=printable(password, 256), method=method, reason=decision.reason
        )
        sshd_method = "password" if method == "password" else "keyboard-interactive/pam"
        if decision.accepted:
            link.username, link.password, link.auth_method = username, password, sshd_method
            link.start_lease()  # start acquiring now: the box is ready by the time the channel asks
            return True
        link.login_failed(username, sshd_method)
        self._count_failure(name)
        return False

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        """Called for the client's query and again for its signed request: record each key once.

        Success is recorded in :meth:`auth_completed`, after asyncssh has checked the signature.
        """
        link = self.link
        assert link is not None
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
        decision = self.ctx.policy.check_publickey(self._attempts, link.src_ip, username)
        if decision.accepted:
            self._pending_key = fields
            link.username, link.password, link.auth_method = username, None, "publickey"
            return True
        if first_time:
            self.emitter.emit(LOGIN_FAILED, method="publickey", **fields)
            self._count_failure(fields["username"])
        return False

    def auth_completed(self) -> None:
        if self._pending_key is not None and self.link is not None:
            self.emitter.emit(LOGIN_SUCCESS, method="publickey", **self._pending_key)
            self.link.start_lease()

    def _count_failure(self, name: str) -> None:
        self._tries += 1
        if self._tries >= self.ctx.ssh.max_auth_tries and self.conn is not None and self.link is not None:
            self.emitter.emit(AUTH_TOO_MANY, username=name, attempts=self._tries)
            self.link.close_reason = "max_auth_tries"
            self.conn.disconnect(DISC_PROTOCOL_ERROR, "Too many authentication failures")

    # -- channels and refusals --------------------------------------------------------------------
    def session_requested(self) -> asyncssh.SSHServerSession[bytes]:
        assert self.link is not None
        if self._open_sessions >= self.ctx.ssh.max_sessions:
            # What sshd answers past MaxSessions (its channel open failure), bounding what one connection asks of
            # its box (a micro-VM's relay would otherwise fail the whole connection at the guest's own limit).
            self._sessions_refused += 1
            if self._sessions_refused == 1:  # once per connection: a client opening thousands floods no log
                log.info("session channel refused: %d open (ssh.max_sessions)", self._open_sessions)
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "open failed")  # sshd's reason code
        self._open_sessions += 1
        self._channels += 1
        channel = Channel(self.link, self._channels - 1, self.ctx.ssh.advertised_port)
        return ChannelBridge(channel, self.ctx.ssh.max_env_vars, self._session_closed)

    def _session_closed(self) -> None:
        self._open_sessions -= 1

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> Any:
        self.emitter.emit(
            DIRECT_TCPIP_REQUEST,
            dst_ip=printable(dest_host, 256),
            dst_port=dest_port,
            orig_ip=printable(orig_host, 256),
            orig_port=orig_port,
        )
        # Into the capture gateway (network.direct_tcpip), or what OpenSSH answers with AllowTcpForwarding no.
        relay = self.link.forwarding(dest_host[:255], dest_port) if self.link is not None else None
        if relay is None:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "open failed")
        return relay

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        self.emitter.emit(FORWARD_REQUEST, kind="remote", dst_ip=printable(listen_host, 256), dst_port=listen_port)
        return False

    async def _refuse_x11(self, *_: Any) -> None:
        if self.link is not None:
            self.emitter.emit(X11_REQUEST, channel=-1)
        return None

    async def _refuse_agent(self, *_: Any) -> bool:
        if self.link is not None:
            self.emitter.emit(AGENT_REQUEST, channel=-1)
        return False


class SSHFrontEnd:
    """Owns the listening server."""

    def __init__(self, ctx: ServerContext, data_dir: Path) -> None:
        self._ctx = ctx
        self._data_dir = data_dir
        self._server: asyncssh.SSHAcceptor | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.get_port())

    async def start(self) -> None:
        s = self._ctx.ssh
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
        self._ctx.hub.end_all("shutdown")
        await self._ctx.hub.wait_all_closed(10)
        await self._ctx.hub.drain()
