"""SFTP and SCP watchers: events from the attacker's side of the stream, robust to hostile input."""

from __future__ import annotations

import os
import struct
from typing import Any

from sandtrap.bridge.transfers import ScpWatcher, SftpWatcher, is_scp_sink


def sftp_packet(kind: int, *fields: bytes | int, request_id: int = 1) -> bytes:
    body = bytes([kind]) + struct.pack(">I", request_id)
    for f in fields:
        body += struct.pack(">I", f) if isinstance(f, int) else struct.pack(">I", len(f)) + f
    return struct.pack(">I", len(body)) + body


def collect() -> tuple[list[dict[str, Any]], Any]:
    seen: list[dict[str, Any]] = []
    return seen, lambda **f: seen.append(f)


def test_sftp_requests_reported_across_chunk_boundaries() -> None:
    seen, report = collect()
    w = SftpWatcher(report)
    stream = (
        b"\x00\x00\x00\x05\x01\x00\x00\x00\x03"  # INIT v3 (no path)
        + sftp_packet(3, b"/root/x.sh", 0x1A, 0)  # OPEN write|create|truncate, empty attrs
        + sftp_packet(18, b"/tmp/a", b"/tmp/b")
        + sftp_packet(13, b"/etc/\xffpasswd")
        + sftp_packet(5, b"handle", 0, 0, 100)  # READ: not path-bearing
    )
    for i in range(0, len(stream), 3):  # worst-case fragmentation
        w.on_input(stream[i : i + 3])
    assert seen == [
        {"op": "open", "path": "/root/x.sh", "flags": "write,create,truncate"},
        {"op": "rename", "path": "/tmp/a", "target": "/tmp/b"},
        {"op": "remove", "path": "/etc/\\xffpasswd"},
    ]


def test_sftp_garbage_stops_watching_without_raising() -> None:
    seen, report = collect()
    w = SftpWatcher(report)
    w.on_input(b"\xff\xff\xff\xff" + os.urandom(64))  # absurd length
    w.on_input(sftp_packet(13, b"/never"))
    assert seen == []
    w2 = SftpWatcher(report)
    w2.on_input(struct.pack(">I", 9) + b"\x0d\x00\x00\x00\x01\x00\x00\xff\xff")  # string past end
    assert seen == []


def test_scp_headers_reported_and_content_skipped() -> None:
    seen, report = collect()
    w = ScpWatcher(report)
    content = b"line1\nC0777 1 fake\nline3\n"  # content that looks like a header must not count
    stream = b"D0755 0 dir\n" + b"C0644 %d evil.sh\n" % len(content) + content + b"\0" + b"E\n"
    for i in range(0, len(stream), 5):
        w.on_input(stream[i : i + 5])
    assert seen == [
        {"kind": "dir", "mode": "0755", "size": 0, "filename": "dir"},
        {"kind": "file", "mode": "0644", "size": len(content), "filename": "evil.sh"},
    ]


def test_scp_endless_line_stops_watching() -> None:
    seen, report = collect()
    w = ScpWatcher(report)
    w.on_input(b"C" * 10000)
    w.on_input(b"\nC0644 1 x\n")
    assert seen == []


def test_is_scp_sink() -> None:
    assert is_scp_sink("scp -t /tmp")
    assert is_scp_sink("/usr/bin/scp -r -t -- .")
    assert not is_scp_sink("scp -f /etc/passwd")
    assert not is_scp_sink("echo scp -t")
    assert not is_scp_sink("")
