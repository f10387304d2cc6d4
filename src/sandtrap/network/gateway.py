"""The capture gateway: the only peer of every box's ``eth0``, answering as the internet would.

It lives in a network namespace sandtrap owns (:mod:`.namespace`); its sockets are made there by a thread that
enters it, and served on sandtrap's event loop. Backend-neutral: a backend hands :meth:`Gateway.attach` the pid
of a process in the box's network namespace (Docker, nspawn); a micro-VM's tap would join the same namespace.

* DNS (:mod:`.dns`): every query to any address's port 53 lands here (a REDIRECT), answered per box, rate-limited.
* TCP to any address and port lands on one listener (a REDIRECT); the original destination is read back.
  HTTP (by its first bytes, on any port) is answered: sinkholed (a 404 with a server header) or, with
  ``network.egress.fetch``, fetched by :mod:`.fetcher` and served. Anything else: its first bytes recorded,
  the connection held open, silently, until the box closes it or its session ends.
* TFTP (:mod:`.tftp`) to any address: recorded, answered "File not found"; FTP (:mod:`.ftp`) on port 21:
  a vsftpd that takes any login, offers passive ports (which land here too) and has no file.
* ICMP echo to any address: the kernel answers (every address is local in the namespace).

Traffic is tied to a session by the box's address (:meth:`Gateway.open`, when a session takes the box); a box
without one is answered and not recorded. Each session gets a pcap of its box's link (:mod:`.pcap`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

from sandtrap.config import NetworkSettings
from sandtrap.events import (
    LIMIT_HIT,
    NETWORK_DNS,
    NETWORK_HTTP,
    NETWORK_PCAP,
    NETWORK_TCP,
    SESSION_FILE_DOWNLOAD,
    SESSION_FILE_DOWNLOAD_FAILED,
)
from sandtrap.network import dns, ftp
from sandtrap.network.fetcher import Failed, Fetcher, Refused
from sandtrap.network.namespace import CATCH_PORT, Namespace, NetworkError, namespace_name, packet_socket
from sandtrap.network.pcap import PcapWriter
from sandtrap.network.tftp import RRQ, Request, TftpSinkhole, socket_for_any_address
from sandtrap.network.tls import SensorCA, TlsStream

log = logging.getLogger(__name__)
T = TypeVar("T")


class Writer(Protocol):
    """Where the gateway writes a connection's answers: the stream, or TLS over it."""

    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...
    def close(self) -> None: ...


Emit = Callable[..., object]
Store = Callable[[bytes], Awaitable[tuple[str, str, bool, bool]]]  # data -> (sha256, outfile, stored, duplicate)

HEAD_LIMIT = 16 * 1024
FIRST_BYTES_S = 10.0
HOLD_S = 600.0
HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ")
SO_ORIGINAL_DST = 80
FETCHES_AT_ONCE = 8


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


@dataclass
class Tap:
    """A session's hold on its box's traffic: where its events and files go, and its counters."""

    session: str
    emit: Emit
    store: Store
    fetches: int = 0
    fetched_bytes: int = 0
    dns_logged: int = 0
    dns_limit_noted: bool = False
    logged: int = 0  # TCP and HTTP records
    pcap: PcapWriter | None = None
    held: set[Writer] = field(default_factory=set)
    # One fetch at a time per session: the session's byte cap holds, and its memory is one file's.
    fetching: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class Box:
    address: str
    link: str
    names: dns.Names
    bucket: dns.Bucket
    connections: int = 0
    tap: Tap | None = None


class _Dns(asyncio.DatagramProtocol):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        reply = self.gateway.dns_query(data, str(addr[0]))
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


class Gateway:
    def __init__(self, settings: NetworkSettings, sensor: str, data_dir: Path) -> None:
        self.settings = settings
        self.ns = Namespace(settings.namespace or namespace_name(sensor), settings.subnet)
        self.data_dir = data_dir
        self.fetcher = Fetcher(settings.egress)
        self.ca = SensorCA(data_dir / "network") if settings.tls_intercept else None
        self._subnet = ipaddress.IPv4Network(settings.subnet)
        self._answers = ipaddress.IPv4Network(settings.dns.answer_subnet)
        self._boxes: dict[str, Box] = {}
        self._attach_lock = asyncio.Lock()
        self._server: asyncio.Server | None = None
        self._fetches = asyncio.Semaphore(FETCHES_AT_ONCE)  # across sessions: memory is bounded by the sensor
        self._dns: asyncio.DatagramTransport | None = None
        self._tftp: TftpSinkhole | None = None
        self.dns_dropped = 0

    # -- life ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.ns.create()
        tcp = await self._inside(self._tcp_listener)
        try:
            self._server = await asyncio.start_server(self._connection, sock=tcp, limit=HEAD_LIMIT)
        except BaseException:
            tcp.close()
            raise
        udp = await self._inside(self._dns_socket)
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(lambda: _Dns(self), sock=udp)
        self._dns = transport
        self._tftp = TftpSinkhole(await self._inside(socket_for_any_address), self.tftp_request)
        log.info("capture gateway serving in %s (fetch: %s)", self.ns.name, self.settings.egress.fetch)

    async def close(self) -> None:
        for box in self._boxes.values():
            if box.tap is not None:
                await self._close_tap(box, box.tap)
        if self._dns is not None:
            self._dns.close()
        if self._tftp is not None:
            self._tftp.close()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self._server.wait_closed()
        # The boxes are gone or stopped by now (the pool closes first); their links went with them.
        await self.ns.delete()

    async def _inside(self, work: Callable[[], T]) -> T:
        """``work`` on a fresh thread inside the namespace (never a shared executor thread)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()

        def fail(exc: BaseException) -> None:
            if not done.done():
                done.set_exception(exc)

        def deliver(result: T) -> None:
            if not done.done():
                done.set_result(result)
            elif isinstance(result, socket.socket):  # the caller stopped waiting
                result.close()

        def run() -> None:
            try:
                result = self.ns.run_inside(work)
            except BaseException as exc:  # handed to the caller
                loop.call_soon_threadsafe(fail, exc)
                return
            loop.call_soon_threadsafe(deliver, result)

        threading.Thread(target=run, name="gateway-netns", daemon=True).start()
        async with asyncio.timeout(10):
            return await done

    @staticmethod
    def _tcp_listener() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", CATCH_PORT))
        sock.listen(1024)
        sock.setblocking(False)
        return sock

    @staticmethod
    def _dns_socket() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", 53))
        sock.setblocking(False)
        return sock

    # -- boxes -----------------------------------------------------------------------------------------

    async def attach(self, pid: int) -> str:
        """Give the box whose network namespace ``pid`` is in an ``eth0`` linked to the gateway; its address."""
        async with self._attach_lock:
            present = await self.ns.links()
            for address, box in list(self._boxes.items()):
                if box.link not in present and box.tap is None:
                    del self._boxes[address]  # its box is gone (the pair went with its namespace)
            gateway = self.ns.gateway
            hosts = self._subnet.num_addresses - 2
            for _ in range(hosts):
                index = secrets.randbelow(hosts) + 1
                address = str(self._subnet.network_address + index)
                if address != gateway and address not in self._boxes and f"sg{index}" not in present:
                    break
            else:
                raise NetworkError(f"network.subnet {self._subnet} has no free address for another box")
            link = await self.ns.attach(pid, index, address)
            key = secrets.token_bytes(32)
            rate = self.settings.dns
            self._boxes[address] = Box(
                address, link, dns.Names(self._answers, key), dns.Bucket(rate.queries_per_s, rate.burst)
            )
            return address

    async def open(self, address: str, session: str, emit: Emit, store: Store) -> Callable[[], Awaitable[None]] | None:
        """A session takes the box at ``address``: its traffic is recorded for the session (and a pcap written)
        until the returned close is awaited. None: the box is not on this gateway."""
        box = self._boxes.get(address)
        if box is None:
            return None
        if box.tap is not None:
            await self._close_tap(box, box.tap)
        tap = Tap(session, emit, store)
        box.tap = tap
        pcap = self.settings.pcap
        if pcap.enabled:
            try:
                sock = await self._inside(lambda: packet_socket(box.link))
                path = self.pcap_path(session)
                tap.pcap = PcapWriter(sock, path, pcap.max_bytes, pcap.snaplen)
            except (OSError, TimeoutError) as exc:
                log.warning("no pcap for session %s: %s", session, exc)

        async def close() -> None:
            if box.tap is tap:
                await self._close_tap(box, tap)

        return close

    def pcap_path(self, session: str) -> Path:
        return self.data_dir / "pcap" / f"{session}.pcap"

    async def _close_tap(self, box: Box, tap: Tap) -> None:
        box.tap = None
        for writer in list(tap.held):
            writer.close()
        if tap.pcap is not None:
            await asyncio.sleep(0.05)  # the last packets of the session's own closing
            tap.pcap.close()
            rel = str(tap.pcap.path.relative_to(self.data_dir))
            tap.emit(
                NETWORK_PCAP, pcap=rel, size=tap.pcap.size, packets=tap.pcap.packets, not_written=tap.pcap.not_written
            )

    def _record(self, tap: Tap, eventid: str, **fields: object) -> None:
        """A TCP or HTTP record, up to ``network.max_logged`` per session (then one limit record)."""
        tap.logged += 1
        if tap.logged <= self.settings.max_logged:
            tap.emit(eventid, **fields)
        elif tap.logged == self.settings.max_logged + 1:
            tap.emit(LIMIT_HIT, limit="network.max_logged", value=self.settings.max_logged)

    # -- DNS -------------------------------------------------------------------------------------------

    def dns_query(self, data: bytes, src: str) -> bytes | None:
        box = self._boxes.get(src)
        if box is None:
            return None
        tap = box.tap
        if not box.bucket.take():
            self.dns_dropped += 1
            if tap is not None and not tap.dns_limit_noted:
                tap.dns_limit_noted = True
                tap.emit(LIMIT_HIT, limit="network.dns.queries_per_s", value=self.settings.dns.queries_per_s)
            return None
        result = dns.answer(data, box.names)
        if result is None:
            return None
        if tap is not None and tap.dns_logged < self.settings.dns.max_logged:
            tap.dns_logged += 1
            tap.emit(NETWORK_DNS, query=result.name, qtype=result.qtype, rcode=result.rcode, answer=result.address)
        return result.reply

    # -- TFTP (a sinkhole) -------------------------------------------------------------------------------

    def tftp_request(self, request: Request) -> bool:
        """Record a box's TFTP request; whether to answer it (the box's query bucket applies)."""
        box = self._boxes.get(request.src)
        if box is None or not box.bucket.take():
            return False
        if box.tap is not None:
            url = f"tftp://{request.dst}/{request.filename.lstrip('/')}"
            verb = "read" if request.opcode == RRQ else "write"
            box.tap.emit(SESSION_FILE_DOWNLOAD_FAILED, url=url, error=f"tftp {verb} ({request.mode}): not fetched")
        return True

    # -- TCP -------------------------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        box = self._boxes.get(peer[0]) if peer else None
        if box is None or box.connections >= self.settings.max_connections:
            writer.transport.abort()
            return
        box.connections += 1
        started = time.monotonic()
        sock = writer.get_extra_info("socket")
        try:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            dst_ip, dst_port = socket.inet_ntoa(raw[4:8]), int.from_bytes(raw[2:4], "big")
        except OSError:
            dst_ip, dst_port = "", 0
        tap = box.tap
        try:
            if dst_port == 21:  # the server speaks first
                await self._ftp(box, reader, writer, dst_ip)
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
        def record(user: str, command: str, path: str) -> None:
            if box.tap is None:
                return
            who = f"{user}@" if user and user not in ("anonymous", "ftp") else ""
            url = f"ftp://{who}{dst_ip}/{path.lstrip('/')}"
            verb = "store" if command == "STOR" else "retrieve"
            box.tap.emit(SESSION_FILE_DOWNLOAD_FAILED, url=url, error=f"ftp {verb}: not fetched")

        await ftp.serve(reader, writer, dst_ip, 30000 + secrets.randbelow(30000), record)

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
        async with tap.fetching, self._fetches:
            await self._serve_get(box, tap, method, url, headers, writer)

    async def _serve_get(
        self, box: Box, tap: Tap, method: str, url: str, headers: dict[str, str], writer: Writer
    ) -> None:
        server = self.settings.http_server
        head_only = method == "HEAD"
        egress = self.settings.egress
        error = ""
        if not egress.fetch:
            error = "not fetched (network.egress.fetch: false)"
        elif tap.fetches >= egress.max_fetches:
            error = f"not fetched: the session's {egress.max_fetches} downloads are used up"
        elif tap.fetched_bytes >= egress.max_session_bytes:
            error = "not fetched: the session's download bytes are used up"
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
            sha, outfile, stored, duplicate = await tap.store(got.body)
            tap.emit(
                SESSION_FILE_DOWNLOAD,
                url=url,
                outfile=outfile,
                shasum=sha,
                destfile="",
                size=len(got.body),
                stored=stored,
                duplicate=duplicate,
                redirects=got.redirects,
            )
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
