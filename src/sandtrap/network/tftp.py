"""TFTP at the gateway (RFC 1350), a sinkhole: a read or write request to any address's port 69 is recorded and
answered with TFTP's own "File not found" (error 1), from the address the box asked (``IP_PKTINFO``), as a
server without that file answers. ``busybox tftp -g`` and ``tftp`` then say what they say on a real miss.
Not fetched on the box's behalf, whatever ``network.egress.fetch`` says (README "Network").
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

IP_PKTINFO = 8  # linux/in.h
RRQ, WRQ, ERROR = 1, 2, 5


@dataclass(frozen=True, slots=True)
class Request:
    src: str
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
            request = Request(str(addr[0]), dst, *parsed)
            if not self._admit(request):
                continue
            source = struct.pack("=i4s4s", 0, socket.inet_aton(dst), b"\0" * 4)
            try:
                self._sock.sendmsg([error_packet(1, "File not found")], [(socket.SOL_IP, IP_PKTINFO, source)], 0, addr)
            except OSError as exc:
                log.debug("tftp reply: %s", exc)

    def close(self) -> None:
        if self._sock.fileno() >= 0:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
