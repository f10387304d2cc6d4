"""A raw UDP service: each peer (source address and port) proxied into ``target_port`` of its own IP's box.

A peer is a connection (admitted, counted per IP, recorded) from its first datagram until it has been silent for
``session.idle_timeout_seconds``, its ``timeout_seconds`` or ``max_bytes`` are reached, or the sensor stops.
Datagrams that arrive before the box's socket is ready wait in a bounded queue; a flood past it is dropped,
counted and logged (once a minute), and costs no other peer anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import cast

from sandtrap.bridge.connection import Connection, Hub, ServiceBounds, printable
from sandtrap.bridge.stream import RawService, StreamRecorder, open_box_port, recorder_for
from sandtrap.config import split_listen
from sandtrap.errors import SandboxError
from sandtrap.events import LIMIT_HIT, STREAM_CLOSED, STREAM_INPUT, STREAM_OPEN
from sandtrap.logs import RateLimited, session_context

log = logging.getLogger(__name__)
floods = RateLimited(log)

MAX_DATAGRAM = 65535
MAX_QUEUED = 64  # datagrams held per peer while its box socket is made
MAX_PEERS = 4096  # peers tracked at once (each also counts against limits.max_sessions)
REFUSED_TTL_S = 10.0  # a peer refused by a limit: its datagrams dropped quietly this long (one record, not one each)


class UDPPeer:
    def __init__(self, front: UDPFrontEnd, addr: tuple[str, int], local: tuple[str, int]) -> None:
        self.front = front
        self.addr = addr
        service = front.service
        bounds = ServiceBounds(service.name, service.timeout_s, service.max_bytes, service.persona)
        self.link = Connection(front.hub, addr, local, self.end, "udp", bounds)
        self.link.owns_box_activity = False
        self.queue: list[bytes] = []
        self.dropped = 0
        self.sock: socket.socket | None = None
        self.recorder: StreamRecorder | None = None
        self.last = time.monotonic()
        self.used = 0
        self.first = True
        self.task: asyncio.Task[None] | None = None
        self.ended = False

    def start(self) -> bool:
        if not self.link.open():
            self.link.lost()
            return False
        self.task = asyncio.get_running_loop().create_task(self._run())
        return True

    def received(self, data: bytes) -> None:
        self.last = time.monotonic()
        if self.sock is None:
            if len(self.queue) < MAX_QUEUED:
                self.queue.append(data)
            else:
                self._drop("queue_full")
            return
        self._to_box(data)

    def _drop(self, why: str) -> None:
        self.dropped += 1
        if self.dropped == 1:
            self.link.emitter.emit(LIMIT_HIT, limit=f"udp_{why}", value=MAX_QUEUED)
        floods.log(logging.INFO, why, "udp %s: datagrams from %s dropped (%s)", self.front.service.name,
                   self.addr[0], why)  # fmt: skip

    def _budget(self, n: int) -> int:
        limit = self.front.service.max_bytes
        if limit is None:
            return n
        allowed = max(0, min(n, limit - self.used))
        self.used += allowed
        if self.used >= limit:
            asyncio.get_running_loop().call_soon(self.link.end, "max_bytes", self.used)
        return allowed

    def _to_box(self, data: bytes) -> None:
        n = self._budget(len(data))
        if n < len(data):
            return  # a datagram is whole or not at all
        usage = self.link.usage
        usage.bytes_in += n
        usage.touch()
        if self.first:
            self.first = False
            self.link.emitter.emit(STREAM_INPUT, input=printable(data, 1024), size=len(data))
        if self.recorder is not None:
            self.recorder.record(True, data)
        assert self.sock is not None
        try:
            self.sock.send(data)
        except BlockingIOError:
            self._drop("box_busy")
        except OSError:  # nothing listens on the box's port (ICMP refused): as on a real host, no answer
            pass

    async def _run(self) -> None:
        link = self.link
        session_context.set(f"{link.session} {link.src_ip}")
        loop = asyncio.get_running_loop()
        try:
            try:
                self.sock, box_name = await open_box_port(link, self.front.service)
            except (SandboxError, OSError, TimeoutError) as exc:
                link.close_reason = "box_port_unreachable"
                log.warning("udp %s: the box's port: %s", self.front.service.name, exc)
                return
            self.recorder = recorder_for(link, self.front.service)
            stream = self.recorder.path
            link.emitter.emit(
                STREAM_OPEN,
                target_port=self.front.service.target_port,
                transport="udp",
                stream=str(stream.relative_to(link.hub.data_dir)) if stream else "",
                sandbox_name=box_name,
            )
            queued, self.queue = self.queue, []
            for data in queued:
                self._to_box(data)
            while True:
                try:
                    data = await loop.sock_recv(self.sock, MAX_DATAGRAM)
                except ConnectionRefusedError:  # the last datagram was refused in the box: keep listening
                    continue
                if not data and self.sock.type == socket.SOCK_STREAM:
                    return
                if self._budget(len(data)) < len(data):
                    return
                self.last = time.monotonic()
                link.usage.bytes_out += len(data)
                link.usage.touch()
                if self.recorder is not None:
                    self.recorder.record(False, data)
                self.front.send(data, self.addr)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("udp peer failed")
        finally:
            self._close_all()

    def end(self) -> None:
        """The link's closer (limits, shutdown) and the idle sweep."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
        else:
            self._close_all()

    def _close_all(self) -> None:
        if self.ended:
            return
        self.ended = True
        self.front.forget(self)
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
        recorder, self.recorder = self.recorder, None
        if recorder is not None:
            sha = recorder.close()
            usage = self.link.usage
            hub = self.link.hub
            self.link.emitter.emit(
                STREAM_CLOSED,
                target_port=self.front.service.target_port,
                bytes_in=usage.bytes_in,
                bytes_out=usage.bytes_out,
                stream=str(recorder.path.relative_to(hub.data_dir)) if recorder.path else "",
                pcap=str(recorder.pcap_path.relative_to(hub.data_dir)) if recorder.pcap_path else "",
                shasum=sha,
                reason=self.link.close_reason or "closed",
                dropped=self.dropped,
            )
        self.link.lost()


class UDPFrontEnd(asyncio.DatagramProtocol):
    """Owns one raw UDP listener and its peers."""

    def __init__(self, hub: Hub, service: RawService, listen: str) -> None:
        self.hub = hub
        self.service = service
        self._listen = listen
        self._transport: asyncio.DatagramTransport | None = None
        self._peers: dict[tuple[str, int], UDPPeer] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._refused: dict[tuple[str, int], float] = {}
        self.refused = 0

    @property
    def port(self) -> int:
        assert self._transport is not None
        return int(self._transport.get_extra_info("sockname")[1])

    async def start(self) -> None:
        host, port = split_listen(self._listen)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=(host or "0.0.0.0", port))
        self._transport = transport
        self._sweeper = loop.create_task(self._sweep())
        log.info("udp service %s listening on %s (port %d) -> box port %d", self.service.name, self._listen,
                 self.port, self.service.target_port)  # fmt: skip

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A datagram endpoint's transport (Python 3.11's selector one is no DatagramTransport subclass).
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        peer_addr = (str(addr[0]), int(addr[1]))
        peer = self._peers.get(peer_addr)
        if peer is None:
            until = self._refused.get(peer_addr)
            if until is not None and until > time.monotonic():
                self.refused += 1
                return
            if len(self._peers) >= MAX_PEERS:
                self.refused += 1
                floods.log(logging.WARNING, "peers", "udp %s: %d peers tracked; new peers dropped",
                           self.service.name, MAX_PEERS)  # fmt: skip
                return
            assert self._transport is not None
            local = self._transport.get_extra_info("sockname") or ("", 0)
            peer = UDPPeer(self, peer_addr, (str(local[0]), int(local[1])))
            if not peer.start():  # refused by a limit (recorded once): its datagrams are dropped for a while
                if len(self._refused) >= MAX_PEERS:
                    self._refused.clear()
                self._refused[peer_addr] = time.monotonic() + REFUSED_TTL_S
                return
            self._peers[peer_addr] = peer
        peer.received(data)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp %s: %s", self.service.name, exc)

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.sendto(data, addr)

    def forget(self, peer: UDPPeer) -> None:
        if self._peers.get(peer.addr) is peer:
            del self._peers[peer.addr]

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.service.idle_timeout_s / 2))
            now = time.monotonic()
            for peer in list(self._peers.values()):
                if now - peer.last > self.service.idle_timeout_s:
                    peer.link.close_reason = peer.link.close_reason or "idle_timeout_seconds"
                    peer.end()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for peer in list(self._peers.values()):
            peer.link.close_reason = peer.link.close_reason or "shutdown"
            peer.end()
        if self._transport is not None:
            self._transport.close()
