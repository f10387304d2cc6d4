"""The gateway's TCP side: every connection a box makes, to any address and port, lands here (a REDIRECT).

HTTP (by its first bytes, on any port) is answered: sinkholed (nginx's 404) or, with ``network.egress.fetch``,
fetched by :mod:`.fetcher` and served; TLS first (a handshake byte) is answered with a certificate from the
sensor's CA (:mod:`.tls`), then as plain; port 21 is FTP (:mod:`.ftp`), and a connection to a passive port an
FTP reply named is handed to that control connection; port 53 is DNS over TCP (RFC 7766: the same answers and
bucket as over UDP); anything else is held open, silently, its first bytes recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from urllib.parse import urlsplit

from sandtrap.config import NetworkSettings
from sandtrap.events import (
    LIMIT_HIT,
    NETWORK_HTTP,
    NETWORK_TCP,
    SESSION_FILE_DOWNLOAD_FAILED,
)
from sandtrap.network import downloads, ftp
from sandtrap.network.fetcher import Failed, Fetcher, Refused
from sandtrap.network.taps import Box, DataChannel, Tap, Writer
from sandtrap.network.tls import SensorCA, TlsStream

log = logging.getLogger(__name__)

HEAD_LIMIT = 16 * 1024
FIRST_BYTES_S = 10.0
HOLD_S = 600.0
HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ")
SO_ORIGINAL_DST = 80
FETCHES_AT_ONCE = 8
DNS_MESSAGES = 100  # per DNS-over-TCP connection


def not_found(server: str) -> bytes:
    """nginx's own 404 page."""
    return (
        "<html>\r\n<head><title>404 Not Found</title></head>\r\n<body>\r\n<center><h1>404 Not Found</h1></center>"
        f"\r\n<hr><center>{server}</center>\r\n</body>\r\n</html>\r\n"
    ).encode()


def response(status: int, reason: str, body: bytes, server: str, ctype: str, head_only: bool = False) -> bytes:
    head = (
        f"HTTP/1.1 {status} {reason}\r\nServer: {server}\r\nDate: {formatdate(usegmt=True)}\r\n"
        f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1", "replace") + (b"" if head_only else body)


def shown(data: bytes, limit: int = 1024) -> str:
    """Bytes as text for a record: printable ASCII kept, the rest escaped."""
    return data[:limit].decode("latin-1").encode("unicode_escape").decode("ascii")


class Streams:
    """The TCP connections of the boxes in ``boxes`` (address -> :class:`Box`, the gateway's own map)."""

    def __init__(
        self,
        settings: NetworkSettings,
        boxes: dict[str, Box],
        fetcher: Fetcher,
        ca: SensorCA | None,
        dns_query: Callable[[bytes, Box], bytes | None],
    ) -> None:
        self.settings = settings
        self.dns_query = dns_query
        self._boxes = boxes
        self.fetcher = fetcher
        self.ca = ca
        self.fetches = asyncio.Semaphore(FETCHES_AT_ONCE)  # across sessions: memory is bounded by the sensor
        # FTP active mode: a connection from (box, server address) to the box's port (the gateway makes it).
        self.connect_box: Callable[[Box, str, int], Awaitable[DataChannel]] | None = None

    def _record(self, tap: Tap, eventid: str, **fields: object) -> None:
        """A TCP or HTTP record, up to ``network.max_logged`` per session (then one limit record)."""
        tap.logged += 1
        if tap.logged <= self.settings.max_logged:
            tap.emit(eventid, **fields)
        elif tap.logged == self.settings.max_logged + 1:
            tap.emit(LIMIT_HIT, limit="network.max_logged", value=self.settings.max_logged)

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        box = self._boxes.get(peer[0]) if peer else None
        if box is None:
            writer.transport.abort()
            return
        await self.serve(box, reader, writer)

    async def serve(self, box: Box, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A connection ``box`` made to any address and port (REDIRECTed to the listener it came in on)."""
        peer = writer.get_extra_info("peername")
        if not peer or peer[0] != box.address or box.connections >= self.settings.max_connections:
            writer.transport.abort()
            return
        sock = writer.get_extra_info("socket")
        try:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            dst_ip, dst_port = socket.inet_ntoa(raw[4:8]), int.from_bytes(raw[2:4], "big")
        except OSError:
            dst_ip, dst_port = "", 0
        await self.handle(box, reader, writer, dst_ip, dst_port)

    async def handle(
        self, box: Box, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, dst_ip: str, dst_port: int
    ) -> None:
        """One connection of ``box`` to ``dst_ip:dst_port`` (from the listener, or an SSH client's forwarding
        request routed here: any reader/writer with asyncio's stream methods)."""
        if box.connections >= self.settings.max_connections:
            writer.close()
            return
        box.connections += 1
        started = time.monotonic()
        tap = box.tap
        try:
            expected = box.passive.pop((dst_ip, dst_port), None)
            if expected is not None and not expected.done():  # an FTP data connection
                channel = DataChannel(reader, writer)
                expected.set_result(channel)
                async with asyncio.timeout(HOLD_S):
                    await channel.done.wait()
                return
            if dst_port == 21:  # the server speaks first
                await self._ftp(box, reader, writer, dst_ip)
                return
            if dst_port == 53:
                await self._dns(box, reader, writer)
                return
            try:
                async with asyncio.timeout(FIRST_BYTES_S):
                    first = await reader.read(8)
            except TimeoutError:
                first = b""
            if first[:1] == b"\x16" and self.ca is not None:  # a TLS handshake
                await self._tls(box, first, reader, writer, dst_ip, dst_port, started)
            else:
                await self._plain(box, first, reader, writer, dst_ip, dst_port, started, "http")
        except (
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ValueError,
            ssl.SSLError,
            TimeoutError,
        ) as exc:
            log.debug("gateway connection from %s: %s", box.address, exc)
        except Exception:
            log.exception("gateway connection from %s", box.address)
        finally:
            box.connections -= 1
            if tap is not None:
                tap.held.discard(writer)
            writer.close()

    async def _plain(
        self,
        box: Box,
        first: bytes,
        reader: asyncio.StreamReader,
        writer: Writer,
        dst_ip: str,
        dst_port: int,
        started: float,
        scheme: str,
    ) -> None:
        if first and any(m.startswith(first[: len(m)]) or first.startswith(m) for m in HTTP_METHODS):
            await self._http(box, first, reader, writer, dst_ip, dst_port, scheme)
        else:
            await self._hold(box, first, reader, writer, dst_ip, dst_port, started)

    async def _tls(
        self,
        box: Box,
        first: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        dst_ip: str,
        dst_port: int,
        started: float,
    ) -> None:
        """TLS with a certificate for the name asked (the sensor's CA, which the box trusts), then as plain."""
        assert self.ca is not None
        ctx, _ = self.ca.server_context(dst_ip)
        tls = TlsStream(ctx, reader, writer, first)
        async with asyncio.timeout(30):
            await tls.handshake()
        plain = asyncio.StreamReader(limit=HEAD_LIMIT)

        async def pump() -> None:
            while True:
                data = await tls.read()
                if not data:
                    plain.feed_eof()
                    return
                plain.feed_data(data)

        task = asyncio.get_running_loop().create_task(pump())
        try:
            try:
                async with asyncio.timeout(FIRST_BYTES_S):
                    head = await plain.read(8)
            except TimeoutError:
                head = b""
            await self._plain(box, head, plain, tls, dst_ip, dst_port, started, "https")
        finally:
            task.cancel()

    async def _ftp(self, box: Box, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, dst_ip: str) -> None:
        def url(user: str, path: str) -> str:
            who = f"{user}@" if user and user not in ("anonymous", "ftp") else ""
            return f"ftp://{who}{box.names.reverse.get(dst_ip, dst_ip)}/{path.lstrip('/')}"

        def record(user: str, command: str, path: str) -> None:  # a store: nothing to fetch
            if box.tap is not None:
                box.tap.emit(SESSION_FILE_DOWNLOAD_FAILED, url=url(user, path), error="ftp store: not accepted")

        async def retrieve(user: str, password: str, path: str) -> bytes | None:
            tap = box.tap
            if tap is None:
                return None
            host = box.names.reverse.get(dst_ip, dst_ip)

            async def get(room: int) -> bytes:
                return await self.fetcher.fetch_ftp(host, path, user, password, room)

            return await downloads.obtain(tap, self.settings.egress, url(user, path), get, self.fetches)

        def passive(port: int) -> asyncio.Future[DataChannel]:
            future: asyncio.Future[DataChannel] = asyncio.get_running_loop().create_future()
            for key in [k for k, f in box.passive.items() if f.done()]:
                del box.passive[key]  # expected no more (the control connection moved on)
            if len(box.passive) < 16:
                box.passive[(dst_ip, port)] = future
            return future

        def port() -> int:
            return 30000 + secrets.randbelow(30000)

        active = None if self.connect_box is None else functools.partial(self.connect_box, box, dst_ip)
        await ftp.serve(reader, writer, dst_ip, port, passive, retrieve, record, box.address, active)

    async def _dns(self, box: Box, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """DNS over TCP: two-byte length, message; each answered as a datagram would be (or dropped)."""
        for _ in range(DNS_MESSAGES):
            try:
                async with asyncio.timeout(FIRST_BYTES_S):
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    message = await reader.readexactly(size)
            except (TimeoutError, asyncio.IncompleteReadError):
                return
            reply = self.dns_query(message, box)
            if reply is not None:
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await writer.drain()

    async def _hold(
        self,
        box: Box,
        first: bytes,
        reader: asyncio.StreamReader,
        writer: Writer,
        dst_ip: str,
        dst_port: int,
        started: float,
    ) -> None:
        """Say nothing; record what the box sends (the first ``max_record_bytes``), until it closes."""
        kept, total = bytearray(first), len(first)
        tap = box.tap
        if tap is not None:
            tap.held.add(writer)
        cap = self.settings.max_record_bytes
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(HOLD_S):
                while True:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    total += len(chunk)
                    if len(kept) < cap:
                        kept += chunk[: cap - len(kept)]
        if tap is not None:
            self._record(
                tap,
                NETWORK_TCP,
                dst_ip=dst_ip,
                dst_port=dst_port,
                bytes_in=total,
                bytes_out=0,
                data=shown(bytes(kept), 2048),
                duration=round(time.monotonic() - started, 1),
            )

    async def _http(
        self,
        box: Box,
        first: bytes,
        reader: asyncio.StreamReader,
        writer: Writer,
        dst_ip: str,
        dst_port: int,
        scheme: str,
    ) -> None:
        async with asyncio.timeout(30):
            head = first + await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            writer.write(response(400, "Bad Request", b"", self.settings.http_server, "text/html"))
            return
        method, target, _ = parts
        headers: dict[str, str] = {}
        for line in lines[1:60]:
            name, sep, value = line.partition(":")
            if sep and len(headers) < 50:
                headers[name.strip().lower()] = value.strip()
        host = headers.get("host", "") or box.names.reverse.get(dst_ip, "") or dst_ip
        if target.startswith(("http://", "https://")):
            url = target  # a proxy-style request line
        else:
            default = 443 if scheme == "https" else 80
            host_part = host if (":" in host or dst_port == default) else f"{host}:{dst_port}"
            url = f"{scheme}://{host_part}{target if target.startswith('/') else '/' + target}"
        url = url[:2048]
        tap = box.tap
        if tap is not None:
            self._record(
                tap,
                NETWORK_HTTP,
                method=method[:16],
                url=url,
                user_agent=headers.get("user-agent", "")[:512],
                dst_ip=dst_ip,
                dst_port=dst_port,
            )
        server = self.settings.http_server
        head_only = method == "HEAD"
        if tap is None or method not in ("GET", "HEAD"):
            writer.write(response(404, "Not Found", not_found(server), server, "text/html", head_only))
            return
        async with tap.fetching, self.fetches:
            await self._serve_get(box, tap, method, url, headers, writer)

    async def _serve_get(
        self, box: Box, tap: Tap, method: str, url: str, headers: dict[str, str], writer: Writer
    ) -> None:
        server = self.settings.http_server
        head_only = method == "HEAD"
        egress = self.settings.egress
        error = downloads.refusal(tap, egress)
        if error:
            tap.emit(SESSION_FILE_DOWNLOAD_FAILED, url=url, error=error)
            writer.write(response(404, "Not Found", not_found(server), server, "text/html", head_only))
            return
        tap.fetches += 1
        fetch_url = self._real_url(url, box)
        room = min(egress.max_file_bytes, egress.max_session_bytes - tap.fetched_bytes)
        try:
            got = await self.fetcher.fetch(method, fetch_url, headers, room)
        except (Refused, Failed) as exc:
            tap.emit(SESSION_FILE_DOWNLOAD_FAILED, url=url, error=str(exc)[:300])
            writer.write(response(404, "Not Found", not_found(server), server, "text/html", head_only))
            return
        tap.fetched_bytes += len(got.body)
        if method == "GET" and 200 <= got.status < 300:
            await downloads.record(tap, url, got.body, got.redirects)
        elif method == "GET":
            tap.emit(SESSION_FILE_DOWNLOAD_FAILED, url=url, error=f"HTTP {got.status}")
        ctype = got.content_type or "application/octet-stream"
        writer.write(response(got.status, "OK" if got.status == 200 else "", got.body, server, ctype, head_only))
        async with asyncio.timeout(egress.timeout_s):
            await writer.drain()

    def _real_url(self, url: str, box: Box) -> str:
        """The URL the attacker meant: a name the box resolved here keeps its name (the fetcher resolves it for
        real); a bare address of ours (no Host) becomes the name it stood for."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        name = box.names.reverse.get(host)
        if name:
            netloc = name + (f":{parts.port}" if parts.port else "")
            return parts._replace(netloc=netloc).geturl()
        return url
