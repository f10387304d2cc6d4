"""TFTP at the gateway (RFC 1350): a read or write request to any address's port 69 is recorded; the gateway
decides (:mod:`.gateway`): answered with TFTP's own "File not found" (error 1) from the address the box asked
(``IP_PKTINFO``), as a server without that file answers, or, with ``network.egress.fetch``, the file fetched
(:func:`fetch`, the sensor's own client) and sent to the box (:func:`send`) from a new port of that address.

Both transfer loops are ours: lock-step, 512-byte blocks, options ignored (RFC 2347 lets a server), bounded in
bytes, retries and time. tftpy, the maintained package, is blocking and threaded, with no byte cap, and cannot
answer from an address chosen per request inside the gateway's namespace.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

IP_PKTINFO = 8  # linux/in.h
RRQ, WRQ, DATA, ACK, ERROR = 1, 2, 3, 4, 5
BLOCK = 512
RETRIES = 5
WAIT_S = 1.0


class TftpFailed(Exception):
    """A transfer that did not complete (an error packet, no answer, too large)."""


@dataclass(frozen=True, slots=True)
class Request:
    src: str
    port: int
    dst: str
    opcode: int
    filename: str
    mode: str


def parse(data: bytes) -> tuple[int, str, str] | None:
    """(opcode, filename, mode) of a read or write request; None for anything else."""
    if len(data) < 4 or len(data) > 1024:
        return None
    (opcode,) = struct.unpack(">H", data[:2])
    if opcode not in (RRQ, WRQ):
        return None
    parts = data[2:].split(b"\0")
    if len(parts) < 3:
        return None
    return opcode, parts[0][:512].decode("latin-1"), parts[1][:16].decode("latin-1").lower()


def error_packet(code: int, message: str) -> bytes:
    return struct.pack(">HH", ERROR, code) + message.encode() + b"\0"


def socket_for_any_address() -> socket.socket:
    """UDP :69 on every address (the namespace's AnyIP route), told each datagram's destination (made inside)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_IP, IP_PKTINFO, 1)
        sock.bind(("0.0.0.0", 69))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class TftpSinkhole:
    """Reads ``sock`` on the loop; ``admit(request)`` says whether to answer (and records it)."""

    def __init__(self, sock: socket.socket, admit: Callable[[Request], bool]) -> None:
        self._sock = sock
        self._admit = admit
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        for _ in range(64):
            try:
                data, ancillary, _, addr = self._sock.recvmsg(2048, socket.CMSG_SPACE(12))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("tftp: %s", exc)
                return
            dst = ""
            for level, kind, value in ancillary:
                if level == socket.SOL_IP and kind == IP_PKTINFO and len(value) >= 12:
                    dst = socket.inet_ntoa(value[8:12])
            parsed = parse(data)
            if parsed is None or not dst:
                continue
            request = Request(str(addr[0]), int(addr[1]), dst, *parsed)
            if self._admit(request):
                self.refuse(request)

    def refuse(self, request: Request, code: int = 1, message: str = "File not found") -> None:
        """Answer ``request`` with an error, from the address it was sent to."""
        source = struct.pack("=i4s4s", 0, socket.inet_aton(request.dst), b"\0" * 4)
        try:
            self._sock.sendmsg(
                [error_packet(code, message)], [(socket.SOL_IP, IP_PKTINFO, source)], 0, (request.src, request.port)
            )
        except OSError as exc:
            log.debug("tftp reply: %s", exc)

    def close(self) -> None:
        if self._sock.fileno() >= 0:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()


def bound_to(address: str) -> socket.socket:
    """A UDP socket on a new port of ``address`` (a transfer's own TID; made inside the namespace)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind((address, 0))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class _Inbox(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue(maxsize=64)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if not self.queue.full():
            self.queue.put_nowait((data, (str(addr[0]), int(addr[1]))))


async def _next(inbox: _Inbox, wait_s: float) -> tuple[bytes, tuple[str, int]] | None:
    try:
        async with asyncio.timeout(wait_s):
            return await inbox.queue.get()
    except TimeoutError:
        return None


def _error_text(packet: bytes) -> str:
    code = struct.unpack(">H", packet[2:4])[0] if len(packet) >= 4 else 0
    message = packet[4:132].split(b"\0", 1)[0].decode("latin-1")
    return f"tftp error {code}: {message}"


async def fetch(address: str, port: int, filename: str, max_bytes: int, permits: Callable[[str], bool]) -> bytes:
    """Read ``filename`` from the TFTP server at ``address`` (the caller checked it and bounds the time).

    A server may answer from another of its addresses (one whose transfer socket is not bound: the route's
    source): the first DATA's sender becomes the peer only if ``permits`` its address, as for any destination."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    transport, inbox = await loop.create_datagram_endpoint(_Inbox, family=family)
    try:
        request = struct.pack(">H", RRQ) + filename.encode("latin-1", "replace")[:400] + b"\0octet\0"
        last, dest = request, (address, port)
        peer: tuple[str, int] | None = None
        body = bytearray()
        expected = 1
        misses = 0
        transport.sendto(last, dest)
        while True:
            got = await _next(inbox, WAIT_S)
            if got is None:
                misses += 1
                if misses > RETRIES:
                    raise TftpFailed("tftp: no answer")
                transport.sendto(last, dest)
                continue
            packet, source = got
            if (peer is None and source[0] != address and not permits(source[0])) or (
                peer is not None and source != peer
            ):
                continue  # not a sender we may answer (or another of the server's transfers)
            opcode = struct.unpack(">H", packet[:2])[0] if len(packet) >= 2 else 0
            if opcode == ERROR:
                raise TftpFailed(_error_text(packet))
            if opcode != DATA or len(packet) < 4:
                continue
            block = struct.unpack(">H", packet[2:4])[0]
            if peer is None:
                peer = dest = source  # the server's transfer port (its TID)
            if block == expected & 0xFFFF:
                body += packet[4:]
                if len(body) > max_bytes:
                    raise TftpFailed(f"larger than {max_bytes} bytes")
                expected += 1
                misses = 0
            last = struct.pack(">HH", ACK, block)
            transport.sendto(last, dest)
            if block == (expected - 1) & 0xFFFF and len(packet) - 4 < BLOCK:
                return bytes(body)
    finally:
        transport.close()


async def send(sock: socket.socket, peer: tuple[str, int], data: bytes) -> None:
    """Send ``data`` to a box's client at ``peer`` from ``sock`` (a transfer's own port), block by block."""
    loop = asyncio.get_running_loop()
    transport, inbox = await loop.create_datagram_endpoint(_Inbox, sock=sock)
    try:
        blocks = len(data) // BLOCK + 1  # a last short (maybe empty) block ends the transfer
        for index in range(blocks):
            number = (index + 1) & 0xFFFF
            packet = struct.pack(">HH", DATA, number) + data[index * BLOCK : (index + 1) * BLOCK]
            for _ in range(RETRIES + 1):
                transport.sendto(packet, peer)
                acked = False
                while (got := await _next(inbox, WAIT_S)) is not None:
                    answer, source = got
                    if source != peer or len(answer) < 4:
                        continue
                    opcode, block = struct.unpack(">HH", answer[:4])
                    if opcode == ERROR:
                        raise TftpFailed(_error_text(answer))
                    if opcode == ACK and block == number:
                        acked = True
                        break
                if acked:
                    break
            else:
                raise TftpFailed("tftp: the box stopped acknowledging")
    finally:
        transport.close()
