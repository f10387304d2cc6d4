"""Per-connection hooks that make asyncssh answer on the wire the way sshd 9.2p1 does, before login.

Each one replaces an asyncssh internal on one connection (never the class): the client's identification
line judged as sshd's ``kex_exchange_identification`` does, no DISCONNECT before encryption starts (sshd
drops such connections silently), zeroed padding on unencrypted packets, no ``global-requests-ok``.
``tests/integration/test_sshd_fingerprint.py`` shows each against a real sshd. asyncssh 2.24's internals.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable

import asyncssh

from sandtrap.ssh.algorithms import use_openssh_kex_extras

SSH_MAX_BANNER_LEN = 8192  # OpenSSH kex.c
INVALID_IDENT = b"Invalid SSH identification string."
VERSION_MISMATCH = b"Protocol major versions differ."
# sscanf(ident, "SSH-%d.%d-%[^\n]\n", ...) == 3
_IDENT_RE = re.compile(rb"SSH-\s*([+-]?\d+)\.\s*([+-]?\d+)-[^\n]")


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


def _judge_partial(buf: bytes) -> bytes | None:
    """For a line still without its ``\\n``: reject what sshd rejects before the line ends."""
    text = buf.rstrip(b"\r")
    if b"\r" in text or b"\0" in text or len(text) > SSH_MAX_BANNER_LEN:
        return INVALID_IDENT
    return None


def _is_plain_packet(data: bytes) -> bool:
    if len(data) < 9:
        return False
    length: int = struct.unpack_from(">I", data)[0]
    return length == len(data) - 4 and 4 <= data[4] <= length - 2


def imitate_sshd(conn: asyncssh.SSHServerConnection) -> None:
    """Install every hook on ``conn``; call from ``connection_made`` (before asyncssh reads a byte)."""
    use_openssh_kex_extras(conn)
    c = conn  # asyncssh internals below
    accept_version: Callable[[], bool] = c._recv_version

    def recv_identification() -> bool:
        buf = c._inpbuf
        idx = buf.find(b"\n")
        answer = _judge_partial(buf) if idx < 0 else judge_identification(buf[:idx])
        if answer is not None:
            c._send(answer + b"\r\n")
            c._force_close(asyncssh.ProtocolError(answer.decode()))
            return False
        return False if idx < 0 else accept_version()

    send = c._send

    def send_zero_padded(data: bytes) -> None:
        if c._send_encryption is None and _is_plain_packet(data):
            data = data[: len(data) - data[4]] + bytes(data[4])
        send(data)

    send_disconnect = c._send_disconnect

    def send_disconnect_once_encrypted(code: int, reason: str, lang: str) -> None:
        if c._send_encryption is not None:
            send_disconnect(code, reason, lang)

    send_ext_info = c._send_ext_info

    def send_openssh_ext_info() -> None:
        c._extensions_to_send.pop(b"global-requests-ok", None)
        send_ext_info()

    c._recv_handler = recv_identification
    c._send = send_zero_padded  # type: ignore[method-assign]
    c._send_disconnect = send_disconnect_once_encrypted  # type: ignore[method-assign]
    c._send_ext_info = send_openssh_ext_info  # type: ignore[method-assign]
