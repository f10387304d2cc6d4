"""The record of a raw service's connection (tcp/udp): the bytes both ways with their timing, and a pcap.

``<data_dir>/streams/<session>.jsonl``: a header line (like an asciicast's: version, session, service,
transport, addresses, target port, start time), then one line per chunk, ``[seconds, "i"|"o", base64]`` ("i":
from the attacker, "o": from the box). ``<data_dir>/streams/<session>.pcap`` (capture.pcap): the same chunks as
packets between the attacker's address and the listener's, as a capture on the sensor's interface would show
them (IPv4; the TCP handshake and close synthesised, sequence numbers following the bytes; LINKTYPE_RAW), so
Wireshark and Zeek read it. Both stop recording at ``max_bytes`` (the rest is counted, not written).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import logging
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from sandtrap.bridge.connection import Connection
from sandtrap.errors import SandboxError
from sandtrap.outputs.recording import RecordingHealth
from sandtrap.sandbox.base import BoxPorts, ClientAddress

log = logging.getLogger(__name__)

LINKTYPE_RAW = 101
_SEGMENT = 65000  # bytes of payload per TCP packet: as a capture on a host with GRO/TSO shows a fast stream


def _checksum(data: bytes) -> int:
    """RFC 1071's checksum at C speed: the ones'-complement sum of the 16-bit words is the big-endian number
    the bytes make, modulo 0xFFFF (2**16 = 1 mod 0xFFFF), 0xFFFF for a nonzero number that is a multiple."""
    if len(data) % 2:
        data += b"\0"
    n = int.from_bytes(data, "big")
    total = n % 0xFFFF
    if total == 0 and n:
        total = 0xFFFF
    return ~total & 0xFFFF


@dataclass
class PcapWriter:
    """Packets of one conversation (client <-> listener), synthesised from its payloads."""

    out: IO[bytes]
    client: tuple[str, int]
    server: tuple[str, int]
    transport: str
    seq: dict[bool, int] = field(default_factory=lambda: {True: 1000, False: 5000})  # from client?: next seq
    ident: int = 0
    _packed: dict[str, bytes] = field(default_factory=dict)

    def _addr(self, ip: str) -> bytes:
        packed = self._packed.get(ip)
        if packed is None:
            packed = self._packed[ip] = ipaddress.IPv4Address(ip).packed
        return packed

    def __post_init__(self) -> None:
        self.out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, LINKTYPE_RAW))
        if self.transport == "tcp":
            self._tcp(True, b"", 0x02)  # SYN
            self.seq[True] += 1
            self._tcp(False, b"", 0x12)  # SYN-ACK
            self.seq[False] += 1
            self._tcp(True, b"", 0x10)

    def data(self, from_client: bool, payload: bytes) -> None:
        if self.transport == "udp":
            self._packet(from_client, 17, self._udp(from_client, payload))
            return
        for i in range(0, len(payload), _SEGMENT):
            part = payload[i : i + _SEGMENT]
            self._tcp(from_client, part, 0x18)
            self.seq[from_client] += len(part)

    def close(self, from_client: bool) -> None:
        if self.transport == "tcp":
            self._tcp(from_client, b"", 0x11)  # FIN-ACK
            self.seq[from_client] += 1
            self._tcp(not from_client, b"", 0x11)
            self.seq[not from_client] += 1
            self._tcp(from_client, b"", 0x10)

    def _ends(self, from_client: bool) -> tuple[tuple[str, int], tuple[str, int]]:
        return (self.client, self.server) if from_client else (self.server, self.client)

    def _pseudo(self, from_client: bool, proto: int, length: int) -> bytes:
        (sip, _), (dip, _) = self._ends(from_client)
        return (
            ipaddress.IPv4Address(sip).packed
            + ipaddress.IPv4Address(dip).packed
            + struct.pack("!BBH", 0, proto, length)
        )

    def _udp(self, from_client: bool, payload: bytes) -> bytes:
        (_, sport), (_, dport) = self._ends(from_client)
        head = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
        csum = _checksum(self._pseudo(from_client, 17, 8 + len(payload)) + head + payload) or 0xFFFF
        return struct.pack("!HHHH", sport, dport, 8 + len(payload), csum) + payload

    def _tcp(self, from_client: bool, payload: bytes, flags: int) -> None:
        (_, sport), (_, dport) = self._ends(from_client)
        ack = self.seq[not from_client] if flags != 0x02 else 0
        head = struct.pack("!HHIIBBHHH", sport, dport, self.seq[from_client], ack, 5 << 4, flags, 65535, 0, 0)
        csum = _checksum(self._pseudo(from_client, 6, 20 + len(payload)) + head + payload)
        head = head[:16] + struct.pack("!H", csum) + head[18:]
        self._packet(from_client, 6, head + payload)

    def _packet(self, from_client: bool, proto: int, body: bytes) -> None:
        (sip, _), (dip, _) = self._ends(from_client)
        self.ident = (self.ident + 1) & 0xFFFF
        ip = struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(body),
            self.ident,
            0x4000,
            64,
            proto,
            0,
            self._addr(sip),
            self._addr(dip),
        )
        ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
        now = time.time()
        frame = ip + body
        self.out.write(struct.pack("<IIII", int(now), int((now % 1) * 1e6), len(frame), len(frame)))
        self.out.write(frame)


def _is_v4(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).version == 4
    except ValueError:
        return False


class StreamRecorder:
    """One raw connection's stream file (and pcap); every write guarded: a full disk costs the record, never the
    connection (reported to the recording health)."""

    def __init__(
        self,
        directory: Path,
        header: dict[str, object],
        client: tuple[str, int],
        server: tuple[str, int],
        transport: str,
        *,
        jsonl: bool,
        pcap: bool,
        max_bytes: int,
        health: RecordingHealth | None = None,
    ) -> None:
        self._started = time.monotonic()
        self._max = max_bytes
        self._written = 0
        self._health = health
        self._sha = hashlib.sha256()
        self._lines: IO[str] | None = None
        self._pcap: PcapWriter | None = None
        self._pcap_file: IO[bytes] | None = None
        self.path: Path | None = None
        self.pcap_path: Path | None = None
        session = str(header["session"])
        try:
            directory.mkdir(parents=True, exist_ok=True)
            if jsonl:
                self.path = directory / f"{session}.jsonl"
                self._lines = self.path.open("w", encoding="utf-8")
                self._lines.write(json.dumps({"version": 1, "encoding": "base64", **header}) + "\n")
            if pcap and _is_v4(client[0]) and _is_v4(server[0]):
                self.pcap_path = directory / f"{session}.pcap"
                self._pcap_file = self.pcap_path.open("wb")
                self._pcap = PcapWriter(self._pcap_file, client, server, transport)
        except OSError as exc:
            self._failed(exc)

    def record(self, from_client: bool, data: bytes) -> None:
        if self._written >= self._max or not data:
            return
        data = data[: self._max - self._written]
        self._written += len(data)
        try:
            if self._lines is not None:
                self._sha.update(data)
                t = round(time.monotonic() - self._started, 6)
                self._lines.write(json.dumps([t, "i" if from_client else "o", base64.b64encode(data).decode()]) + "\n")
            if self._pcap is not None:
                self._pcap.data(from_client, data)
        except OSError as exc:
            self._failed(exc)

    def close(self, closed_by_client: bool = True) -> str:
        """Close the files; the sha256 of the bytes recorded (both ways, in order)."""
        try:
            if self._pcap is not None:
                self._pcap.close(closed_by_client)
            for f in (self._lines, self._pcap_file):
                if f is not None:
                    f.close()
        except OSError as exc:
            self._failed(exc)
        self._lines = self._pcap_file = None
        self._pcap = None
        return self._sha.hexdigest()

    def _failed(self, exc: OSError) -> None:
        log.warning("stream record failed: %s", exc)
        if self._health is not None:
            self._health.failed("streams", exc)
        for f in (self._lines, self._pcap_file):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        self._lines = self._pcap_file = None
        self._pcap = None


@dataclass(frozen=True, slots=True)
class RawService:
    """What a raw (tcp/udp) listener needs to know of its service (config ``services``)."""

    name: str
    transport: str  # "tcp" | "udp"
    target_port: int
    pcap: bool = False
    metadata: bool = True
    max_bytes: int | None = None
    timeout_s: float | None = None
    idle_timeout_s: float = 60.0  # udp: a peer silent this long is forgotten
    persona: str = ""  # the persona its connections' boxes are (services[].persona; '' = by weight)


async def open_box_port(conn: Connection, service: RawService) -> tuple[socket.socket, str]:
    """The connection's box (the source IP's: raw services share boxes by IP) and a socket to its port, and the
    box's name. Raises SandboxError when the box cannot be had or its backend cannot reach its ports."""
    lease = await conn.lease()
    box = lease.sandbox
    if not box.features.box_ports or not isinstance(box, BoxPorts):
        raise SandboxError(f"this sandbox backend cannot reach a box's ports ({service.transport} {service.name})")
    client = ClientAddress(conn.src_ip, conn.src_port, conn.dst_ip)
    sock = await box.open_port(service.target_port, "udp" if service.transport == "udp" else "tcp", client)
    return sock, box.name


def recorder_for(conn: Connection, service: RawService) -> StreamRecorder:
    hub = conn.hub
    header: dict[str, object] = {
        "session": conn.session,
        "service": service.name,
        "transport": service.transport,
        "src_ip": conn.src_ip,
        "src_port": conn.src_port,
        "dst_ip": conn.dst_ip,
        "dst_port": conn.dst_port,
        "target_port": service.target_port,
        "timestamp": int(time.time()),
    }
    limit = min(hub.recording.max_cast_bytes, service.max_bytes or hub.recording.max_cast_bytes)
    return StreamRecorder(
        hub.data_dir / "streams",
        header,
        (conn.src_ip, conn.src_port),
        (conn.dst_ip, conn.dst_port),
        service.transport,
        jsonl=service.metadata,
        pcap=service.pcap,
        max_bytes=limit,
        health=hub.health,
    )
