"""sshd's pre-login rules (ssh/preauth.py) as pure functions; the integration fingerprint test checks them
against the real sshd on the wire."""

from __future__ import annotations

import pytest

from sandtrap.ssh.preauth import (
    INVALID_IDENT,
    SSHD_READ_CHUNK,
    VERSION_MISMATCH,
    Verdict,
    disconnect_reason,
    identification_bytes_read,
    judge_identification,
    judge_partial,
    judge_plain_packet,
    packets_bytes_read,
)


@pytest.mark.parametrize(
    ("line", "answer"),
    [
        (b"SSH-2.0-OpenSSH_9.2p1\r", None),
        (b"SSH-1.99-x", None),
        (b"SSH-1.5-x", VERSION_MISMATCH),
        (b"SSH-1337-x", INVALID_IDENT),
        (b"GET / HTTP/1.0\r", INVALID_IDENT),
        (b"/\r", INVALID_IDENT),
        (b"\r", INVALID_IDENT),
        (b"SSH-2.0-x\ry", INVALID_IDENT),
        (b"SSH-2.0-\xff\xfe", None),
    ],
)
def test_identification_lines(line: bytes, answer: bytes | None) -> None:
    assert judge_identification(line) == answer


def test_a_partial_line_is_refused_only_for_what_sshd_refuses_before_its_end() -> None:
    assert judge_partial(b"SSH-2.0-x\r") is None
    assert judge_partial(b"SSH-2.0-x\0") == INVALID_IDENT
    assert judge_partial(b"x" * 8193) == INVALID_IDENT


@pytest.mark.parametrize(
    ("buf", "read"),
    [
        (b"/\r\n/\r\n", 3),
        (b"GET / HTTP/1.0\r\n\r\n", 16),
        (b"SSH-2.0-x\0more", 10),
        (b"SSH-2.0-x\ry\r\n", 11),
        (b"SSH-2.0-x\r\r\nrest", 12),
        (b"SSH-2.0-x", None),
        (b"x" * 9000, 8193),
    ],
)
def test_how_far_sshd_reads_the_identification(buf: bytes, read: int | None) -> None:
    assert identification_bytes_read(buf) == read


def test_sshd_reads_packets_8_kib_at_a_time() -> None:
    assert packets_bytes_read(received=100, identification=41, processed=60) == 100
    assert packets_bytes_read(received=45, identification=41, processed=41) == 45  # half a header: read too
    assert packets_bytes_read(received=41 + SSHD_READ_CHUNK, identification=41, processed=500) == 41 + SSHD_READ_CHUNK
    assert packets_bytes_read(received=50_000, identification=41, processed=500) == 41 + SSHD_READ_CHUNK
    assert packets_bytes_read(received=50_000, identification=41, processed=41 + SSHD_READ_CHUNK + 1) == 41 + 16384


NONE: frozenset[int] = frozenset()


@pytest.mark.parametrize(
    ("pkttype", "seen", "strict", "expected", "verdict"),
    [
        (20, False, False, NONE, Verdict.PASS),
        (2, False, False, NONE, Verdict.SKIP),
        (5, False, False, NONE, Verdict.UNIMPLEMENTED),
        (30, False, False, NONE, Verdict.UNIMPLEMENTED),
        (0, False, False, NONE, Verdict.INVALID_TYPE),
        (200, True, True, NONE, Verdict.INVALID_TYPE),
        (50, True, True, NONE, Verdict.PASS),
        (1, True, True, NONE, Verdict.PASS),
        (30, True, True, frozenset({30}), Verdict.PASS),
        (20, True, True, frozenset({30}), Verdict.STRICT_VIOLATION),
        (2, True, True, frozenset({30}), Verdict.STRICT_VIOLATION),
        (20, True, False, frozenset({30}), Verdict.UNIMPLEMENTED),
        (4, True, False, frozenset({30}), Verdict.SKIP),
        (21, True, False, frozenset({21}), Verdict.PASS),
    ],
)
def test_packets_before_encryption(
    pkttype: int, seen: bool, strict: bool, expected: frozenset[int], verdict: Verdict
) -> None:
    assert judge_plain_packet(pkttype, seen, strict, expected) is verdict


def test_disconnect_reasons_are_sshds() -> None:
    assert disconnect_reason(Verdict.INVALID_TYPE, 200, 0) == "Invalid ssh2 packet type: 200"
    assert disconnect_reason(Verdict.STRICT_VIOLATION, 20, 1) == (
        "strict KEX violation: unexpected packet type 20 (seqnr 1)"
    )
