"""The telnet front end: an asyncio server that behaves as Debian's telnetd running login(1).

One :class:`TelnetSession` per TCP connection, its own failure domain. It negotiates options as telnetd
does (TTYPE, TSPEED, XDISPLOC, NEW-ENVIRON asked first, then WILL SGA, WILL ECHO, DO NAWS), prints
``/etc/issue.net`` and login's prompts with login's timing (a wrong password answered after pam_faildelay's
3 s with "Login incorrect", LOGIN_RETRIES, LOGIN_TIMEOUT), decides with the shared
:class:`~sandtrap.bridge.auth.AuthPolicy`, and after a login hands a :class:`~sandtrap.bridge.channel.Channel`
the connection: ``login -f`` on a pty in the attacker's box, recorded as an SSH shell is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
from collections.abc import Callable
from dataclasses import dataclass, field

from sandtrap.bridge.auth import AuthPolicy
from sandtrap.bridge.channel import Channel
from sandtrap.bridge.connection import Connection, Hub, ServiceBounds, printable
from sandtrap.config import TelnetSettings, split_listen
from sandtrap.events import CLIENT_SIZE, TELNET_ANOMALY, TELNET_CLIENT
from sandtrap.logs import RateLimited, session_context
from sandtrap.sandbox.base import ExitStatus
from sandtrap.telnet import protocol as tp
from sandtrap.telnet.login import MAX_PENDING, Keyboard, login
from sandtrap.telnet.protocol import Command, Data, Item, Options, Parser, Signal, Sub

log = logging.getLogger(__name__)
anomalies = RateLimited(log)

TELNET_PORT = 23
_ASKED_FIRST = (tp.TTYPE, tp.TSPEED, tp.XDISPLOC, tp.NEW_ENVIRON)  # telnetd's getterminaltype()


@dataclass
class TelnetContext:
    """What every telnet connection shares."""

    hub: Hub
    settings: TelnetSettings
    policy: AuthPolicy
    hostname: str  # sandbox.hostname; a connection's own is its persona's (SessionManager.hostname)
    service: ServiceBounds = field(default_factory=lambda: ServiceBounds("telnet"))


class TelnetSession(asyncio.Protocol):
    def __init__(self, ctx: TelnetContext) -> None:
        self.ctx = ctx
        self.link: Connection | None = None
        self._transport: asyncio.Transport | None = None
        self._parser = Parser()
        self._options = Options()
        self._keys = Keyboard(self._write, self._echoes)
        self._task: asyncio.Task[None] | None = None
        self._channel: Channel | None = None
        self._term = ""
        self._size = (0, 0)
        self._env: dict[str, str] = {}
        self._client: dict[str, str] = {}
        self._subs_seen: set[int] = set()
        self._reported: set[str] = set()

    # -- connection life cycle ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peer = transport.get_extra_info("peername") or ("", 0)
        sock = transport.get_extra_info("sockname") or ("", 0)
        self.link = Connection(
            self.ctx.hub,
            (str(peer[0]), int(peer[1])),
            (str(sock[0]), int(sock[1])),
            self._close,
            "telnet",
            self.ctx.service,
        )
        if not self.link.open():
            transport.abort()
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    def connection_lost(self, exc: Exception | None) -> None:
        self._keys.end()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self.link is not None:  # refused ones too: their closing record says why (as SSH's)
            self.link.lost(None if exc is None else str(exc))

    def eof_received(self) -> bool:
        """Half-closed by the client: what it sent still reaches the shell, then the shell gets EOF."""
        self._keys.end()
        if self._channel is not None:
            self._channel.feed_eof()
        return True  # keep our side open: the box's output (e.g. of a piped script) still goes out

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _echoes(self) -> bool:
        return tp.ECHO in self._options.us or tp.ECHO in self._options.asked_us

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    # -- bytes from the client ------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        link = self.link
        if link is None:
            return
        if self._channel is None:  # after the login the relay counts what reaches the box
            link.usage.bytes_in += len(data)
            link.usage.touch()
        for item in self._parser.feed(data):
            self._handle(item)

    def _handle(self, item: Item) -> None:
        if isinstance(item, Data):
            if self._channel is not None:
                self._channel.feed(item.data, self)
            elif not self._keys.typed(item.data):
                self._anomaly("input_flood", f"more than {MAX_PENDING} bytes typed ahead of the shell")
        elif isinstance(item, Command):
            answer, changed = self._options.receive(item)
            if self._options.flooded:
                self._anomaly("option_flood", f"more than {tp.MAX_NEGOTIATIONS} option commands")
                return
            self._write(answer)
            if changed:
                self._option_changed(item)
        elif isinstance(item, Sub):
            self._sub(item)
        elif isinstance(item, Signal):
            self._signal(item.command)
        else:
            self._anomaly(item.kind, item.detail)

    def _option_changed(self, cmd: Command) -> None:
        opt, opts = cmd.option, self._options
        if cmd.verb == tp.WILL and opt in opts.him:
            if opt in (tp.TTYPE, tp.TSPEED, tp.XDISPLOC, tp.NEW_ENVIRON):
                self._write(tp.sub(opt, bytes([tp.SEND])))
            if opt == tp.BINARY:
                self._parser.crlf = False
        elif cmd.verb == tp.WONT and opt == tp.BINARY:
            self._parser.crlf = True
        self._keys.poke()  # the negotiation wait looks again

    def _sub(self, item: Sub) -> None:
        self._subs_seen.add(item.option)
        self._keys.poke()
        if item.option == tp.NAWS:
            size = tp.parse_naws(item.payload)
            if size is None:
                return self._anomaly("bad_naws", f"{len(item.payload)} bytes")
            self._size = size
            if self._channel is not None:
                self._channel.resize(*size)
            elif self.link is not None:
                self.link.emitter.emit(CLIENT_SIZE, width=size[0], height=size[1])
        elif item.option == tp.TTYPE:
            text = tp.parse_is_text(item.payload, 40)
            if text is not None and not self._term:
                self._term = text.lower()
                self._client["ttype"] = text
        elif item.option in (tp.TSPEED, tp.XDISPLOC):
            text = tp.parse_is_text(item.payload, 64)
            if text is not None:
                self._client["tspeed" if item.option == tp.TSPEED else "xdisploc"] = text
        elif item.option == tp.NEW_ENVIRON:
            for k, v in tp.parse_environ(item.payload).items():
                if len(self._env) < tp.MAX_ENV_VARS:
                    self._env[k] = v

    def _signal(self, cmd: int) -> None:
        if cmd == tp.AYT:
            self._write(b"\r\n[Yes]\r\n")  # telnetd's answer to Are You There
            return
        keys = {tp.IP: b"\x03", tp.EC: b"\x7f", tp.EL: b"\x15", tp.BRK: b"\x03"}
        key = keys.get(cmd)
        if key is not None:
            self._handle(Data(key))

    def _anomaly(self, kind: str, detail: str) -> None:
        """Something no telnet client sends: recorded once per kind per connection, logged at most once a minute."""
        if kind in self._reported or self.link is None:
            return
        self._reported.add(kind)
        self.link.emitter.emit(TELNET_ANOMALY, kind=kind, detail=printable(detail, 200))
        anomalies.log(logging.INFO, kind, "telnet %s from %s: %s", kind, self.link.src_ip, detail)

    # -- telnetd and login ------------------------------------------------------------------------------
    async def _run(self) -> None:
        link = self.link
        assert link is not None
        session_context.set(f"{link.session} {link.src_ip}")
        s = self.ctx.settings
        try:
            await self._negotiate()
            if s.host_info:  # inetutils' telnetd: the host's line, then a blank one (the pty: a fresh box's first)
                info = f"{platform.system()} {platform.release()} ({self._hostname()}) (pts/0)"
                self._write(b"\r\n" + tp.escape(info.encode()) + b"\r\n\r\n")
            if s.banner:
                self._write(b"\r\n" + tp.escape(s.banner.encode()) + b"\r\n")
            try:
                async with asyncio.timeout(s.login_timeout_s):
                    accepted = await self._login()
            except TimeoutError:
                self._write(f"\r\nLogin timed out after {s.login_timeout_s:.0f} seconds.\r\n".encode())
                link.close_reason = "login_timeout"
                self._close()
                return
            if not accepted:
                if self._keys.eof and not link.close_reason:  # half-closed (or gone) before logging in
                    link.close_reason = "closed_before_login"
                    anomalies.log(logging.INFO, "half-open", "telnet from %s: closed its side before logging in",
                                  link.src_ip)  # fmt: skip
                self._close()
                return
            await self._shell()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("telnet session failed")
            self._close()

    async def _negotiate(self) -> None:
        """telnetd's getterminaltype(): ask, wait (bounded) for the answers and the subnegotiations, then the
        terminal options."""
        opts, wait = self._options, self.ctx.settings.negotiation_wait_s
        self._write(b"".join(opts.do(o) for o in _ASKED_FIRST))
        await self._until(lambda: not (opts.asked_him & set(_ASKED_FIRST)), wait)
        wanted = {o for o in _ASKED_FIRST if o in opts.him}
        await self._until(lambda: wanted <= self._subs_seen, wait)
        self._write(opts.will(tp.SGA) + opts.will(tp.ECHO) + opts.do(tp.NAWS) + opts.do(tp.LFLOW))
        await self._until(lambda: tp.NAWS not in opts.asked_him, min(wait, 0.3))
        if self.link is not None and (self._client or opts.him):
            self.link.emitter.emit(
                TELNET_CLIENT,
                ttype=self._client.get("ttype", ""),
                tspeed=self._client.get("tspeed", ""),
                xdisploc=self._client.get("xdisploc", ""),
                options=sorted(tp.option_name(o) for o in opts.him),
            )

    async def _until(self, done: Callable[[], bool], timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while not done() and not self._keys.eof:
                    await self._keys.changed()

    async def _login(self) -> bool:
        link = self.link
        assert link is not None
        ctx = self.ctx
        return await login(self._keys, link, ctx.policy, ctx.settings, self._hostname(), self._env.get("USER", ""))

    def _hostname(self) -> str:
        """The hostname of the box this connection will get (its persona's)."""
        link = self.link
        return link.hub.manager.hostname(link.persona) if link is not None else self.ctx.hostname

    async def _shell(self) -> None:
        link = self.link
        assert link is not None
        channel = Channel(link, 0, TELNET_PORT)
        channel.opened()
        cols, rows = self._size
        channel.pty(self._term or "network", cols, rows)
        channel.terminal_login()
        env = channel.client_env({k.encode(): v.encode() for k, v in self._env.items()}, tp.MAX_ENV_VARS)
        self._channel = channel
        ahead = self._keys.take()
        if ahead:  # typed ahead of the shell (bots do not wait for the prompt)
            channel.feed(ahead, self)
        if self._keys.eof:
            channel.feed_eof()
        await channel.run(self, env)

    # -- the bridge's Port ----------------------------------------------------------------------------
    def send(self, data: bytes, stderr: bool) -> None:
        self._write(tp.escape(data))

    def pause_reading(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def pause_writing(self) -> None:
        if self._channel is not None:
            self._channel.set_writable(False)

    def resume_writing(self) -> None:
        if self._channel is not None:
            self._channel.set_writable(True)

    def exit(self, status: ExitStatus) -> None:
        self._close()  # telnetd closes the connection when login's shell exits

    def close(self) -> None:
        self._close()


class TelnetFrontEnd:
    """Owns one telnet listener."""

    def __init__(self, ctx: TelnetContext, listen: str) -> None:
        self._ctx = ctx
        self._listen = listen
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        host, port = split_listen(self._listen)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: TelnetSession(self._ctx),
            host if host not in ("0.0.0.0", "::", "") else None,
            port,
            reuse_address=True,
        )
        log.info("telnet listening on %s (port %d)", self._listen, self.port)

    async def close(self) -> None:
        """Stop listening; the connections end with the hub's (app.py ends them all)."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
