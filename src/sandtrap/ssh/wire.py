"""Per-connection hooks that make asyncssh answer on the wire the way sshd 9.2p1 does, before login.

Each one replaces an asyncssh internal on one connection (never the class): the client's identification
line judged as sshd's ``kex_exchange_identification`` does, no DISCONNECT before encryption starts (sshd
drops such connections silently), zeroed padding on unencrypted packets, no ``global-requests-ok``. A
client identification with non-ASCII bytes (sshd takes any byte but CR and NUL; asyncssh's ASCII decode
would drop the connection silently) is accepted as sshd accepts it: the exchange hash gets the bytes as
sent, and ``client_version`` holds them as ``bytes`` for the record to escape.
``tests/integration/test_sshd_fingerprint.py`` shows each against a real sshd. asyncssh 2.24's internals.
"""

from __future__ import annotations

import contextlib
import re
import socket
import struct
from collections.abc import Callable
from typing import Any

import asyncssh
from asyncssh.auth import MSG_USERAUTH_PK_OK, ServerAuth, _server_auth_handlers
from asyncssh.packet import PacketDecodeError, SSHPacket, String

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


def sshd_bytes_read(buf: bytes) -> int | None:
    """How many bytes of ``buf`` sshd has read when it has judged the first line (None: it waits for more).

    sshd reads the client's identification one byte at a time and stops at the line's ``\\n``, at a byte it
    refuses (NUL, anything after a CR but ``\\n``) or at the byte that makes the line too long. What it has
    not read is still in the socket when it closes, and the kernel answers that with a reset.
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


def close_as_sshd(conn: asyncssh.SSHServerConnection, answer: bytes, unread: int) -> None:
    """sshd's ``send_error`` and exit: the text, then ``\\r\\n`` in a write of its own, then the close.

    When sshd leaves input unread the kernel resets the connection instead of a FIN; asyncio has read
    everything, so SO_LINGER 0 makes the same reset (after the two writes, already on their way).
    """
    c = conn  # asyncssh internals below
    c._send(answer)
    c._send(b"\r\n")
    sock = c.get_extra_info("socket")
    if unread and sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c._force_close(asyncssh.ProtocolError(answer.decode()))


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
            read = sshd_bytes_read(buf)
            close_as_sshd(c, answer, len(buf) - (len(buf) if read is None else read))
            return False
        if idx < 0:
            return False
        line = buf[:idx]
        if line.isascii():
            return accept_version()
        # asyncssh decodes the line as ASCII: let it parse a same-length stand-in, then put the real bytes back
        # (the exchange hash is computed later, from _client_version).
        raw = line[:-1] if line.endswith(b"\r") else line
        c._inpbuf = bytes(b if b < 0x80 else 0x3F for b in line) + buf[idx:]
        accepted = accept_version()
        if c._client_version:
            c._client_version = raw
            c.set_extra_info(client_version=raw)
        return accepted

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
        c._extensions_to_send[HOSTBOUND_EXTENSION] = b"0"  # after server-sig-algs, as sshd sends them
        send_ext_info()

    c._recv_handler = recv_identification
    c._send = send_zero_padded  # type: ignore[method-assign]
    c._send_disconnect = send_disconnect_once_encrypted  # type: ignore[method-assign]
    c._send_ext_info = send_openssh_ext_info  # type: ignore[method-assign]


HOSTBOUND_METHOD = b"publickey-hostbound-v00@openssh.com"
HOSTBOUND_EXTENSION = b"publickey-hostbound@openssh.com"


class HostBoundPublicKeyAuth(ServerAuth):
    """OpenSSH's ``publickey-hostbound-v00@openssh.com`` (PROTOCOL §2.5), as sshd 9.2 takes it.

    The ``publickey`` request with one more field, the server's host key, which the signature covers too.
    sshd drops the connection, without a word, when that key is not the one of the key exchange or the
    request does not parse; otherwise it answers as for ``publickey`` (PK_OK, success or failure), and the
    key goes through the same ``validate_public_key`` hook, so it is recorded like any other.
    """

    _conn: asyncssh.SSHServerConnection

    @classmethod
    def supported(cls, conn: asyncssh.SSHServerConnection) -> bool:
        return conn.public_key_auth_supported()

    async def _start(self, packet: SSHPacket) -> None:
        c = self._conn  # asyncssh internals below
        try:
            has_signature = packet.get_boolean()
            algorithm = packet.get_string()
            key_data = packet.get_string()
            host_key = packet.get_string()
            msg = packet.get_consumed_payload() if has_signature else b""
            signature = packet.get_string() if has_signature else b""
            packet.check_end()
        except PacketDecodeError:
            c._force_close(asyncssh.ProtocolError("malformed publickey-hostbound request"))
            return
        ours = c.get_server_host_key()
        if ours is None or host_key != ours.public_data:
            c._force_close(asyncssh.ProtocolError("publickey-hostbound request with another host key"))
            return
        if await c.validate_public_key(self._username, key_data, msg, signature):
            if has_signature:
                await self.send_success()
            else:
                self.send_packet(MSG_USERAUTH_PK_OK, String(algorithm), String(key_data))
        else:
            self.send_failure()


def register_hostbound_auth() -> None:
    """Give asyncssh's servers the method without listing it: sshd counts it as ``publickey`` (a synonym),
    so "Authentications that can continue" stays ``publickey,password``. asyncssh 2.24's auth registry:
    the handler table that ``lookup_server_auth`` reads, not the method list failures name."""
    _server_auth_handlers.setdefault(HOSTBOUND_METHOD, HostBoundPublicKeyAuth)


register_hostbound_auth()


def accept_any_exec_command(chan: asyncssh.SSHServerChannel[bytes]) -> None:
    """Hand an exec request whose command is not UTF-8 to the session instead of refusing it.

    sshd passes the command's bytes to the shell whatever they are; asyncssh answers such a request with
    a failure before the session sees it. Installed on one channel, this decodes the command with
    ``surrogateescape``: ``exec_requested`` gets a ``str`` from which the exact bytes come back with
    ``command.encode("utf-8", "surrogateescape")``.
    """
    c = chan  # asyncssh internals below

    def process_exec_request(packet: Any) -> bool:
        command_bytes: bytes = packet.get_string()
        packet.check_end()
        return bool(c._start_session(command=command_bytes.decode("utf-8", "surrogateescape")))

    c._process_exec_request = process_exec_request  # type: ignore[method-assign]
