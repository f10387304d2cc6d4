"""A raw service's record: the JSON-lines stream and the synthesised pcap (valid checksums, sequence numbers)."""

from __future__ import annotations

import base64
import io
import json
import struct
from pathlib import Path

from sandtrap.bridge.stream import PcapWriter, StreamRecorder, _checksum


def packets(pcap: bytes) -> list[bytes]:
    magic, _, _, _, _, _, linktype = struct.unpack("<IHHiIII", pcap[:24])
    assert (magic, linktype) == (0xA1B2C3D4, 101)
    out, i = [], 24
    while i < len(pcap):
        _, _, incl, orig = struct.unpack("<IIII", pcap[i : i + 16])
        assert incl == orig
        out.append(pcap[i + 16 : i + 16 + incl])
        i += 16 + incl
    return out


def test_tcp_pcap_has_a_handshake_valid_checksums_and_the_payload_in_order() -> None:
    buf = io.BytesIO()
    w = PcapWriter(buf, ("203.0.113.9", 40000), ("192.0.2.1", 80), "tcp")
    w.data(True, b"GET / HTTP/1.1\r\n\r\n")
    w.data(False, b"x" * 140_000)  # split in segments
    w.close(True)
    pkts = packets(buf.getvalue())
    flags = [p[20 + 13] for p in pkts]
    assert flags[:3] == [0x02, 0x12, 0x10] and flags[-3:] == [0x11, 0x11, 0x10]
    payload: dict[bool, bytes] = {True: b"", False: b""}
    seq: dict[bool, int] = {}
    for p in pkts:
        assert _checksum(p[:20]) == 0  # IPv4 header checksum verifies
        src = p[12:16] == bytes([203, 0, 113, 9])
        pseudo = p[12:20] + struct.pack("!BBH", 0, 6, len(p) - 20)
        assert _checksum(pseudo + p[20:]) == 0  # TCP checksum verifies
        s = struct.unpack("!I", p[24:28])[0]
        body = p[40:]
        if body:
            assert s == seq.get(src, s)
            seq[src] = s + len(body)
            payload[src] += body
    assert payload == {True: b"GET / HTTP/1.1\r\n\r\n", False: b"x" * 140_000}


def test_udp_pcap_datagrams() -> None:
    buf = io.BytesIO()
    w = PcapWriter(buf, ("203.0.113.9", 5353), ("192.0.2.1", 53), "udp")
    w.data(True, b"query")
    w.data(False, b"answer!")
    pkts = packets(buf.getvalue())
    assert [p[28:] for p in pkts] == [b"query", b"answer!"]
    for p in pkts:
        assert _checksum(p[12:20] + struct.pack("!BBH", 0, 17, len(p) - 20) + p[20:]) == 0


def test_stream_recorder_lines_and_cap(tmp_path: Path) -> None:
    header = {"session": "abcdefabcdef", "service": "http", "target_port": 80}
    rec = StreamRecorder(
        tmp_path, header, ("203.0.113.9", 1), ("192.0.2.1", 80), "tcp", jsonl=True, pcap=True, max_bytes=10
    )
    rec.record(True, b"hello")
    rec.record(False, b"world!!")  # past the cap: cut
    rec.record(True, b"more")  # nothing more recorded
    sha = rec.close()
    lines = (tmp_path / "abcdefabcdef.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["service"] == "http"
    chunks = [(json.loads(x)[1], base64.b64decode(json.loads(x)[2])) for x in lines[1:]]
    assert chunks == [("i", b"hello"), ("o", b"world")]
    assert len(sha) == 64 and (tmp_path / "abcdefabcdef.pcap").stat().st_size > 24


def test_ipv6_client_gets_no_pcap_but_a_stream(tmp_path: Path) -> None:
    rec = StreamRecorder(
        tmp_path, {"session": "s6"}, ("2001:db8::1", 1), ("::1", 80), "tcp", jsonl=True, pcap=True, max_bytes=100
    )
    rec.record(True, b"x")
    rec.close()
    assert rec.pcap_path is None and (tmp_path / "s6.jsonl").exists()
