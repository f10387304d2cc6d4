"""The capture gateway: the only peer of every box's ``eth0``, answering as the internet would.

It lives in a network namespace sandtrap owns (:mod:`.namespace`); its sockets are made there by a thread that
enters it, and served on sandtrap's event loop. Backend-neutral: a backend hands :meth:`Gateway.attach` the pid
of a process in the box's network namespace (Docker, nspawn); a micro-VM's tap would join the same namespace.

* DNS (:mod:`.dns`): every query to any address's port 53 lands here (a REDIRECT), answered per box, rate-limited.
* TCP to any address and port lands on one listener (a REDIRECT), handled by :mod:`.streams`.
  HTTP (by its first bytes, on any port) is answered: sinkholed (a 404 with a server header) or, with
  ``network.egress.fetch``, fetched by :mod:`.fetcher` and served. Anything else: its first bytes recorded,
  the connection held open, silently, until the box closes it or its session ends.
* TFTP (:mod:`.tftp`) and FTP (:mod:`.ftp`, port 21, a vsftpd that takes any login) to any address: a
  retrieval is recorded, then answered "not found" (the sinkhole) or, with ``network.egress.fetch``, fetched
  from the name's real server and served; DNS over TCP is answered like UDP.
* ICMP echo to any address: the kernel answers (every address is local in the namespace).

Traffic is tied to a session by the box's address (:meth:`Gateway.open`, when a session takes the box); a box
without one is answered and not recorded. Each session gets a pcap of its box's link (:mod:`.pcap`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import logging
import os
import secrets
import socket
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sandtrap.config import NetworkSettings
from sandtrap.events import (
    LIMIT_HIT,
    NETWORK_DNS,
    NETWORK_DNS_SUMMARY,
    NETWORK_PCAP,
    SESSION_FILE_DOWNLOAD_FAILED,
)
from sandtrap.network import dns, downloads, ftp
from sandtrap.network.fetcher import Fetcher
from sandtrap.network.namespace import CATCH_PORT, Namespace, NetworkError, namespace_name, packet_socket, run_in
from sandtrap.network.pcap import PcapWriter
from sandtrap.network.streams import HEAD_LIMIT, Streams
from sandtrap.network.taps import Box, DataChannel, Emit, Store, Tap
from sandtrap.network.tftp import RRQ, Request, TftpFailed, TftpSinkhole, bound_to, socket_for_any_address
from sandtrap.network.tftp import send as tftp_send
from sandtrap.network.tls import SensorCA
from sandtrap.network.vmtap import VMNet, fd_path, pin_namespace, prepare

log = logging.getLogger(__name__)
T = TypeVar("T")
DNS_NAMES_KEPT = 10_000  # distinct names counted per session (memory bound)


class _Dns(asyncio.DatagramProtocol):
    def __init__(self, gateway: Gateway, box: Box | None = None) -> None:
        self.gateway = gateway
        self.box = box  # a micro-VM's own socket: its one box (every VM's guest has the same address)
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if self.box is None:
            reply = self.gateway.dns_query(data, str(addr[0]))
        else:
            reply = self.gateway.answer_dns(data, self.box) if str(addr[0]) == self.box.address else None
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


@dataclass
class _VM:
    """The gateway's hold in one micro-VM's namespace: its box, listeners and QEMU's pidfd (its end)."""

    box: Box
    server: asyncio.Server
    dns: asyncio.DatagramTransport
    tftp: TftpSinkhole
    pidfd: int
    nsfd: int  # the VM's namespace, held open while the gateway serves it (:func:`.vmtap.pin_namespace`)


class Gateway:
    def __init__(self, settings: NetworkSettings, sensor: str, data_dir: Path) -> None:
        self.settings = settings
        self.ns = Namespace(settings.namespace or namespace_name(sensor), settings.subnet)
        self.data_dir = data_dir
        self.fetcher = Fetcher(settings.egress)
        self.ca = SensorCA(data_dir / "network") if settings.tls_intercept else None
        self._subnet = ipaddress.IPv4Network(settings.subnet)
        self._answers = tuple(ipaddress.IPv4Network(x) for x in settings.dns.answer_subnet)
        self._boxes: dict[str, Box] = {}
        self._streams = Streams(settings, self._boxes, self.fetcher, self.ca, self.answer_dns)
        self._streams.connect_box = self._connect_box  # FTP active mode
        self._vms: dict[str, _VM] = {}  # micro-VMs by sandbox id, each served in its own namespace (:mod:`.vmtap`)
        self.commands = downloads.CommandLog()  # an event sink (app.py): each session's recent command lines
        self._tasks: set[asyncio.Task[None]] = set()
        self._attach_lock = asyncio.Lock()
        self._server: asyncio.Server | None = None
        self._dns: asyncio.DatagramTransport | None = None
        self._tftp: TftpSinkhole | None = None
        self.dns_dropped = 0
        self._owns_namespace = False

    # -- life ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        tcp = None
        if self.ns.exists():  # left by a crash, or another live sandtrap's: find out before touching its rules
            tcp = await self._inside(self._tcp_listener)
        await self.ns.create()
        self._owns_namespace = True  # from here on, close() removes it
        if tcp is None:
            tcp = await self._inside(self._tcp_listener)
        try:
            self._server = await asyncio.start_server(self._streams.connection, sock=tcp, limit=HEAD_LIMIT)
        except BaseException:
            tcp.close()
            raise
        udp = await self._inside(self._dns_socket)
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(lambda: _Dns(self), sock=udp)
        self._dns = transport
        self._tftp = TftpSinkhole(await self._inside(socket_for_any_address), self.tftp_request)
        log.info("capture gateway serving in %s (fetch: %s)", self.ns.name, self.settings.egress.fetch)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for vm_id in list(self._vms):
            await self.detach_vm(vm_id)
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
        # The boxes are gone or stopped by now (the pool closes first); their links went with them. A namespace
        # another live sandtrap holds (start refused it) is left alone.
        if self._owns_namespace:
            await self.ns.delete()

    async def _connect_box(self, box: Box, source: str, port: int) -> DataChannel:
        """FTP active mode: a connection from ``source`` (the server the box spoke to) to the box's ``port``."""
        sock = await self._inside(functools.partial(ftp.data_socket, source), box.netns)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (box.address, port))
            reader, writer = await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise
        return DataChannel(reader, writer)

    async def _inside(self, work: Callable[[], T], netns: str = "") -> T:
        """``work`` on a fresh thread inside the namespace, or the one at ``netns`` (never a shared executor
        thread)."""
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
                result = run_in(netns or self.ns.path, work)
            except BaseException as exc:  # handed to the caller
                loop.call_soon_threadsafe(fail, exc)
                return
            loop.call_soon_threadsafe(deliver, result)

        threading.Thread(target=run, name="gateway-netns", daemon=True).start()
        async with asyncio.timeout(10):
            return await done

    def _tcp_listener(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._bind(sock, CATCH_PORT)
            sock.listen(1024)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def _dns_socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._bind(sock, 53)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def _bind(self, sock: socket.socket, port: int) -> None:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise NetworkError(
                f"the capture gateway's namespace {self.ns.name} is in use by another running sandtrap (the same "
                "sensor name on this host): give each its own `sensor`, or set network.namespace"
            ) from exc

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

    async def open(
        self, address: str, session: str, emit: Emit, store: Store, sandbox_id: str = ""
    ) -> Callable[[], Awaitable[None]] | None:
        """A session takes the box at ``address`` (a micro-VM: the one ``sandbox_id`` names): its traffic is
        recorded for the session (and a pcap written) until the returned close is awaited. None: the box is not
        on this gateway."""
        box = self._box(address, sandbox_id)
        if box is None:
            return None
        if box.tap is not None:
            await self._close_tap(box, box.tap)
        tap = Tap(session, emit, store, destfile=lambda url: self.commands.destfile(session, url))
        box.tap = tap
        pcap = self.settings.pcap
        if pcap.enabled:
            try:
                sock = await self._inside(lambda: packet_socket(box.link), box.netns)
                path = self.pcap_path(session)
                tap.pcap = PcapWriter(sock, path, pcap.max_bytes, pcap.snaplen)
            except (OSError, TimeoutError) as exc:
                log.warning("no pcap for session %s: %s", session, exc)

        async def close() -> None:
            if box.tap is tap:
                await self._close_tap(box, tap)

        return close

    async def attach_vm(self, vm_id: str, pid: int, net: VMNet) -> None:
        """Serve the micro-VM ``vm_id`` whose QEMU is ``pid``: the gateway's rules in its namespace, and a TCP
        listener and a DNS socket there, served here, until QEMU ends (its pidfd) or :meth:`detach_vm`."""
        loop = asyncio.get_running_loop()
        pidfd = os.pidfd_open(pid)
        nsfd = -1
        try:
            nsfd = await pin_namespace(pid, net.tap, vm_id)
            path = fd_path(nsfd)
            await prepare(path, net, vm_id)
            key = secrets.token_bytes(32)
            rate = self.settings.dns
            box = Box(
                net.guest,
                net.tap,
                dns.Names(self._answers, key),
                dns.Bucket(rate.queries_per_s, rate.burst),
                netns=path,
            )
            tcp = await self._inside(self._tcp_listener, path)
            try:
                server = await asyncio.start_server(
                    functools.partial(self._streams.serve, box), sock=tcp, limit=HEAD_LIMIT
                )
            except BaseException:
                tcp.close()
                raise
            try:
                udp = await self._inside(self._dns_socket, path)
                transport, _ = await loop.create_datagram_endpoint(lambda: _Dns(self, box), sock=udp)
                try:
                    tftp = TftpSinkhole(await self._inside(socket_for_any_address, path), self._vm_tftp(box))
                except BaseException:
                    transport.close()
                    raise
            except BaseException:
                server.close()
                raise
        except BaseException:
            os.close(pidfd)
            if nsfd >= 0:
                os.close(nsfd)
            raise
        self._vms[vm_id] = _VM(box, server, transport, tftp, pidfd, nsfd)
        loop.add_reader(pidfd, self._vm_ended, vm_id)
        log.info("capture gateway serving VM %s (pid %d) on its %s", vm_id, pid, net.tap)

    def _vm_ended(self, vm_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self.detach_vm(vm_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def detach_vm(self, vm_id: str) -> None:
        """Stop serving VM ``vm_id`` (its session's capture closed); harmless twice."""
        vm = self._vms.pop(vm_id, None)
        if vm is None:
            return
        asyncio.get_running_loop().remove_reader(vm.pidfd)
        os.close(vm.pidfd)
        if vm.box.tap is not None:
            await self._close_tap(vm.box, vm.box.tap)
        vm.dns.close()
        vm.tftp.close()
        vm.server.close()
        os.close(vm.nsfd)
        log.info("capture gateway: VM %s gone", vm_id)

    def forwards(self, host: str) -> bool:
        """Whether an SSH client's direct-tcpip request to ``host`` is routed here (``network.direct_tcpip:
        capture``); never one to the box's own loopback (its services are the box's, not the internet's)."""
        if self.settings.direct_tcpip != "capture":
            return False
        name = host.lower().rstrip(".")
        try:
            return not ipaddress.ip_address(name.strip("[]")).is_loopback
        except ValueError:
            return name != "localhost" and not name.endswith(".localhost")

    async def forward(
        self,
        address: str,
        host: str,
        port: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        sandbox_id: str = "",
    ) -> None:
        """An SSH client's forwarded connection (direct-tcpip) of the session whose box is at ``address``, to
        ``host:port``: handled as if the box had connected there (a name resolved as the box's resolver
        answers it), recorded for the session. Nothing is connected anywhere: not even the box sees it."""
        box = self._box(address, sandbox_id)
        if box is None:
            writer.close()
            return
        try:
            dst_ip = str(ipaddress.IPv4Address(host))
        except ValueError:
            dst_ip = box.names.address(host) if dns.could_exist(host) else self.ns.gateway
        await self._streams.handle(box, reader, writer, dst_ip, port)

    def _box(self, address: str, sandbox_id: str) -> Box | None:
        vm = self._vms.get(sandbox_id) if sandbox_id else None
        return vm.box if vm is not None else self._boxes.get(address)

    def pcap_path(self, session: str) -> Path:
        return self.data_dir / "pcap" / f"{session}.pcap"

    async def _close_tap(self, box: Box, tap: Tap) -> None:
        box.tap = None
        self.commands.forget(tap.session)
        if tap.dns_queries:
            tap.emit(
                NETWORK_DNS_SUMMARY,
                queries=tap.dns_queries,
                dropped=tap.dns_dropped,
                names=len(tap.dns_names),
                name_bytes=tap.dns_name_bytes,
                longest=tap.dns_longest,
            )
        for writer in list(tap.held):
            writer.close()
        if tap.pcap is not None:
            await asyncio.sleep(0.05)  # the last packets of the session's own closing
            tap.pcap.close()
            rel = str(tap.pcap.path.relative_to(self.data_dir))
            tap.emit(
                NETWORK_PCAP, pcap=rel, size=tap.pcap.size, packets=tap.pcap.packets, not_written=tap.pcap.not_written
            )

    # -- DNS -------------------------------------------------------------------------------------------

    def dns_query(self, data: bytes, src: str) -> bytes | None:
        box = self._boxes.get(src)
        return None if box is None else self.answer_dns(data, box)

    def answer_dns(self, data: bytes, box: Box) -> bytes | None:
        tap = box.tap
        if tap is not None:
            tap.dns_queries += 1
        if not box.bucket.take():
            self.dns_dropped += 1
            if tap is not None:
                tap.dns_dropped += 1
            if tap is not None and not tap.dns_limit_noted:
                tap.dns_limit_noted = True
                tap.emit(LIMIT_HIT, limit="network.dns.queries_per_s", value=self.settings.dns.queries_per_s)
            return None
        result = dns.answer(data, box.names)
        if result is None:
            return None
        if tap is not None:
            tap.dns_name_bytes += len(result.name)
            tap.dns_longest = max(tap.dns_longest, len(result.name))
            if len(tap.dns_names) < DNS_NAMES_KEPT:
                tap.dns_names.add(result.name.lower())
        if tap is not None and tap.dns_logged < self.settings.dns.max_logged:
            tap.dns_logged += 1
            tap.emit(NETWORK_DNS, query=result.name, qtype=result.qtype, rcode=result.rcode, answer=result.address)
        return result.reply

    # -- TFTP ------------------------------------------------------------------------------------------

    def _vm_tftp(self, box: Box) -> Callable[[Request], bool]:
        return lambda request: self.tftp_request(request, box)

    def tftp_request(self, request: Request, vm_box: Box | None = None) -> bool:
        """A box's TFTP request (the box's query bucket applies): whether to refuse it at once ("File not
        found"); a read by a session's box is taken over (:meth:`_tftp_read`), recorded either way. ``vm_box``:
        a micro-VM's, whose requests come in on its own namespace's socket."""
        box = vm_box if vm_box is not None else self._boxes.get(request.src)
        if box is None or not box.bucket.take():
            return False
        tap = box.tap
        if tap is None:
            return True
        host = box.names.reverse.get(request.dst, request.dst)
        url = f"tftp://{host}/{request.filename.lstrip('/')}"
        if request.opcode != RRQ:
            tap.emit(SESSION_FILE_DOWNLOAD_FAILED, url=url, error=f"tftp write ({request.mode}): not accepted")
            return True
        transfer = (request.port, request.filename)
        if transfer in box.tftp or len(box.tftp) >= 4:
            return False  # a retransmitted request of a transfer under way (or too many at once)
        box.tftp.add(transfer)
        task = asyncio.get_running_loop().create_task(self._tftp_read(box, tap, request, host, url))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return False

    async def _tftp_read(self, box: Box, tap: Tap, request: Request, host: str, url: str) -> None:
        try:

            async def get(room: int) -> bytes:
                return await self.fetcher.fetch_tftp(host, request.filename, room)

            body = await downloads.obtain(tap, self.settings.egress, url, get, self._streams.fetches)
            if body is None:
                sinkhole = next((vm.tftp for vm in self._vms.values() if vm.box is box), self._tftp)
                if sinkhole is not None:
                    sinkhole.refuse(request)
                return
            sock = await self._inside(lambda: bound_to(request.dst), box.netns)
            await tftp_send(sock, (request.src, request.port), body)
        except (OSError, TftpFailed, TimeoutError) as exc:
            log.info("tftp transfer to %s (session %s): %s", box.address, tap.session, exc)
        finally:
            box.tftp.discard((request.port, request.filename))
