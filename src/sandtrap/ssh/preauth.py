"""What sshd 9.2p1 answers before login, as pure rules (no asyncssh): ``ssh/wire.py`` applies them.

Each rule was measured against Debian's real sshd (``tests/integration/test_sshd_fingerprint.py``
compares both servers on every case): the identification line is judged as ``kex_exchange_identification``
judges it, reading one byte at a time; packets before encryption as ``ssh_packet_read_poll2`` and
``kex_protocol_error`` take them. Where sshd closes with input it has not read, the kernel resets the
connection, so how much sshd has read matters as much as what it writes.
"""

from __future__ import annotations

import re
from enum import Enum

SSH_MAX_BANNER_LEN = 8192  # OpenSSH kex.c
SSHD_READ_CHUNK = 8192  # sshd reads the socket 8 KiB at a time once the identification line is in (measured)
INVALID_IDENT = b"Invalid SSH identification string."
VERSION_MISMATCH = b"Protocol major versions differ."
# sscanf(ident, "SSH-%d.%d-%[^\n]\n", ...) == 3
_IDENT_RE = re.compile(rb"SSH-\s*([+-]?\d+)\.\s*([+-]?\d+)-[^\n]")

MSG_DISCONNECT, MSG_IGNORE, MSG_UNIMPLEMENTED, MSG_DEBUG = 1, 2, 3, 4
MSG_KEXINIT, MSG_NEWKEYS = 20, 21
MSG_KEX_LAST = 49
MSG_LOCAL_MIN = 192  # sshd refuses types 0 and >= 192 outright
DISC_PROTOCOL_ERROR = 2


def judge_identification(line: bytes) -> bytes | None:
    """sshd's answer to a client's identification line (without its ``\\n``), or None if it accepts it."""
    text = line.rstrip(b"\r")
    if b"\r" in text or b"\0" in text or len(text) > SSH_MAX_BANNER_LEN:
        return INVALID_IDENT
    if not (len(text) > 4 and text.startswith(b"SSH-")):
        return INVALID_IDENT  # sshd takes no other line before a client's identification
    m = _IDENT_RE.match(text)
    if m is None:
        return INVALID_IDENT
    major, minor = int(m.group(1)), int(m.group(2))
    if major == 2 or (major == 1 and minor == 99):
        return None
    return VERSION_MISMATCH


def judge_partial(buf: bytes) -> bytes | None:
    """For a line still without its ``\\n``: reject what sshd rejects before the line ends."""
    text = buf.rstrip(b"\r")
    if b"\r" in text or b"\0" in text or len(text) > SSH_MAX_BANNER_LEN:
        return INVALID_IDENT
    return None


def identification_bytes_read(buf: bytes) -> int | None:
    """How many bytes of ``buf`` sshd has read when it has judged the first line (None: it waits for more).

    sshd reads the client's identification one byte at a time and stops at the line's ``\\n``, at a byte it
    refuses (NUL, anything after a CR but ``\\n``) or at the byte that makes the line too long.
    """
    expect_nl = False
    length = 0
    for i, byte in enumerate(buf):
        if byte == 0x0D:
            expect_nl = True
            continue
        if byte == 0x0A or byte == 0 or expect_nl:
            return i + 1
        length += 1
        if length > SSH_MAX_BANNER_LEN:
            return i + 1
    return None


def packets_bytes_read(received: int, identification: int, processed: int) -> int:
    """Bytes sshd has read of a connection when it stops after ``processed`` bytes (its last packet's end).

    After the identification line (``identification`` bytes, read one at a time) sshd reads 8 KiB at a
    time, at least once (it always wants a packet): whole chunks up to the one holding the end of its last
    packet, or all there was.
    """
    chunks = max(1, -(-(processed - identification) // SSHD_READ_CHUNK))
    return min(received, identification + chunks * SSHD_READ_CHUNK)


class Verdict(Enum):
    """What sshd does with a packet before encryption starts (the client's NEWKEYS)."""

    PASS = "pass"  # what asyncssh does is what sshd does: let it handle the packet
    SKIP = "skip"  # sshd takes it and says nothing (IGNORE, DEBUG, UNIMPLEMENTED; it does not parse them)
    UNIMPLEMENTED = "unimplemented"  # kex_protocol_error: SSH_MSG_UNIMPLEMENTED with its sequence number
    INVALID_TYPE = "invalid type"  # DISCONNECT "Invalid ssh2 packet type: %d"
    STRICT_VIOLATION = "strict violation"  # DISCONNECT "strict KEX violation: unexpected packet type %u (seqnr %u)"


def judge_plain_packet(pkttype: int, kexinit_seen: bool, strict: bool, expected: frozenset[int]) -> Verdict:
    """sshd's verdict on a packet before encryption, given the state of the initial key exchange.

    ``kexinit_seen``: the client's KEXINIT is in; ``strict``: it offered ``kex-strict-c-v00@openssh.com``;
    ``expected``: the key exchange messages the exchange waits for now.
    """
    if pkttype == 0 or pkttype >= MSG_LOCAL_MIN:
        return Verdict.INVALID_TYPE
    if pkttype > MSG_KEX_LAST or pkttype == MSG_DISCONNECT:
        return Verdict.PASS  # sshd closes without a word on both; so does asyncssh
    if not kexinit_seen:
        if pkttype == MSG_KEXINIT:
            return Verdict.PASS
        return Verdict.SKIP if pkttype in (MSG_IGNORE, MSG_UNIMPLEMENTED, MSG_DEBUG) else Verdict.UNIMPLEMENTED
    if pkttype in expected:
        return Verdict.PASS
    if strict:
        return Verdict.STRICT_VIOLATION
    return Verdict.SKIP if pkttype in (MSG_IGNORE, MSG_UNIMPLEMENTED, MSG_DEBUG) else Verdict.UNIMPLEMENTED


def disconnect_reason(verdict: Verdict, pkttype: int, seq: int) -> str:
    if verdict is Verdict.INVALID_TYPE:
        return f"Invalid ssh2 packet type: {pkttype}"
    return f"strict KEX violation: unexpected packet type {pkttype} (seqnr {seq})"
