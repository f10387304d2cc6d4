"""One session's capture file: classic pcap (libpcap 2.4, Ethernet), written as packets arrive, capped.

The format is a 24-byte file header and a 16-byte header per packet (seconds, microseconds, bytes kept,
bytes on the wire): what tshark, Wireshark and tcpdump read. Packets come from an AF_PACKET socket on the
gateway's end of the box's link, so both directions are seen exactly as they crossed it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

MAGIC = 0xA1B2C3D4
LINKTYPE_ETHERNET = 1


def file_header(snaplen: int) -> bytes:
    return struct.pack("<IHHiIII", MAGIC, 2, 4, 0, 0, snaplen, LINKTYPE_ETHERNET)


def record(packet: bytes, wire_len: int, stamp: float) -> bytes:
    sec = int(stamp)
    return struct.pack("<IIII", sec, int((stamp - sec) * 1e6), len(packet), wire_len) + packet


class PcapWriter:
    """Reads ``sock`` (an AF_PACKET socket) on the loop and appends to ``path`` until :meth:`close`."""

    def __init__(self, sock: socket.socket, path: Path, max_bytes: int, snaplen: int) -> None:
        self.path = path
        self.packets = 0
        self.not_written = 0
        self.size = 0
        self._sock = sock
        self._max = max_bytes
        self._snaplen = snaplen
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: BinaryIO | None = open(path, "wb")
        self._write(file_header(snaplen))
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)

    def _write(self, data: bytes) -> None:
        if self._file is None:
            return
        try:
            self._file.write(data)
            self.size += len(data)
        except OSError as exc:
            log.warning("pcap %s: %s (capture stopped)", self.path, exc)
            self._file.close()
            self._file = None

    def _readable(self) -> None:
        for _ in range(256):  # a burst at a time; the loop comes back for the rest
            try:
                data = self._sock.recv(262144)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.info("pcap %s: the link is gone (%s)", self.path, exc)
                self._stop_reading()
                return
            self.packets += 1
            kept = data[: self._snaplen]
            if self.size + 16 + len(kept) > self._max:
                self.not_written += 1
                continue
            self._write(record(kept, len(data), time.time()))

    def _stop_reading(self) -> None:
        if self._sock.fileno() >= 0:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()

    def close(self) -> None:
        self._readable()  # what is already queued
        self._stop_reading()
        if self._file is not None:
            self._file.close()
            self._file = None
