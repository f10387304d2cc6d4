"""Per-connection hooks that make asyncssh answer on the wire the way sshd 9.2p1 does, before login.

Each one replaces an asyncssh internal on one connection (never the class), applying the rules of
``ssh/preauth.py``: the client's identification line judged as sshd's ``kex_exchange_identification``
judges it and refused in sshd's two writes; packets before encryption taken as sshd takes them
(UNIMPLEMENTED, skipped, or sshd's DISCONNECT); no other DISCONNECT before the client's NEWKEYS (sshd
drops such connections without a word); a reset instead of a FIN wherever sshd would have left input
unread; zeroed padding on unencrypted packets; EXT_INFO without ``global-requests-ok`` and with
``publickey-hostbound@openssh.com=0``. Also here, registered once: the ``publickey-hostbound-v00`` auth
method. A client identification with non-ASCII bytes (sshd takes any byte but CR and NUL; asyncssh's
ASCII decode would drop the connection silently) is accepted as sshd accepts it: the exchange hash gets
the bytes as sent, and ``client_version`` holds them as ``bytes`` for the record to escape.

``tests/integration/test_sshd_fingerprint.py`` compares each with a real sshd;
``tests/unit/ssh/test_asyncssh_internals.py`` names every asyncssh 2.24 internal used here.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncssh
from asyncssh.auth import MSG_USERAUTH_PK_OK, ServerAuth, _server_auth_handlers
from asyncssh.packet import PacketDecodeError, SSHPacket, String, UInt32

from sandtrap.logs import RateLimited
from sandtrap.ssh.algorithms import use_openssh_kex_extras
from sandtrap.ssh.preauth import (
    DISC_PROTOCOL_ERROR,
    MSG_NEWKEYS,
    MSG_UNIMPLEMENTED,
    Verdict,
    disconnect_reason,
    identification_bytes_read,
    judge_identification,
    judge_partial,
    judge_plain_packet,
    packets_bytes_read,
)

log = logging.getLogger(__name__)
refusals = RateLimited(log)  # a flood of refused packets logs a line a minute per kind, not a line each


def _set_reset_on_close(conn: asyncssh.SSHServerConnection) -> None:
    """Make the coming close a reset (SO_LINGER 0), as the kernel does when sshd closes with input unread.

    asyncio has read everything the kernel had, so the kernel alone would send a FIN. What was written
    before is already on its way (asyncio writes at once while its buffer is empty).
    """
    sock = conn.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _is_plain_packet(data: bytes) -> bool:
    if len(data) < 9:
        return False
    length: int = struct.unpack_from(">I", data)[0]
    return length == len(data) - 4 and 4 <= data[4] <= length - 2


@dataclass
class _Stream:
    """What the client has sent so far, for how much of it sshd would have read."""

    received: int = 0
    identification: int = 0  # bytes of the identification line, CR LF included (0 until accepted)


def imitate_sshd(conn: asyncssh.SSHServerConnection) -> None:
    """Install every hook on ``conn``; call from ``connection_made`` (before asyncssh reads a byte)."""
    use_openssh_kex_extras(conn)
    c = conn  # asyncssh internals below
    stream = _Stream()
    accept_version: Callable[[], bool] = c._recv_version
    force_close = c._force_close
    send_disconnect = c._send_disconnect
    data_received = c.data_received

    def count_received(data: bytes, datatype: Any = None) -> None:
        stream.received += len(data)
        data_received(data, datatype)

    def close_as_sshd(exc: Exception | None) -> None:
        """Before login, a close resets when sshd would have left input unread (it reads 8 KiB at a time).

        Only for an error on a packet: at the login grace time sshd has read all there was (it waits for
        more), and a client that closed first gets nothing back anyway.
        """
        on_a_packet = isinstance(exc, asyncssh.DisconnectError) and not isinstance(exc, asyncssh.ConnectionLost)
        if on_a_packet and c._transport is not None and not c._auth_complete and stream.identification:
            processed = stream.received - len(c._inpbuf)
            if packets_bytes_read(stream.received, stream.identification, processed) < stream.received:
                _set_reset_on_close(c)
        force_close(exc)

    def recv_identification() -> bool:
        buf = c._inpbuf
        idx = buf.find(b"\n")
        answer = judge_partial(buf) if idx < 0 else judge_identification(buf[:idx])
        if answer is not None:
            # sshd's send_error: the text and CR LF in two writes, then exit; a reset if it left input unread.
            read = identification_bytes_read(buf)
            c._send(answer)
            c._send(b"\r\n")
            if read is not None and read < len(buf):
                _set_reset_on_close(c)
            force_close(asyncssh.ProtocolError(answer.decode()))
            return False
        if idx < 0:
            return False
        stream.identification = stream.received - len(buf) + idx + 1
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

    recv_packet = c._recv_packet

    def recv_packet_as_sshd() -> bool:
        """Before encryption, packets sshd takes differently than asyncssh: answered here, the rest passed on."""
        if c._recv_encryption is not None:
            return recv_packet()
        rem = 4 + c._pktlen - c._recv_blocksize  # no MAC before encryption
        if len(c._inpbuf) < rem:
            return False
        packet_data = c._packet[4:] + c._inpbuf[:rem]
        payload = packet_data[1 : len(packet_data) - packet_data[0]] if packet_data else b""
        if not payload:
            return recv_packet()
        seq: int = c._recv_seq
        verdict = judge_plain_packet(payload[0], bool(c._client_kexinit), c._strict_kex, _expected_kex_messages(c))
        if verdict is Verdict.PASS:
            return recv_packet()
        c._inpbuf = c._inpbuf[rem:]
        c._packet = b""
        if verdict in (Verdict.INVALID_TYPE, Verdict.STRICT_VIOLATION):
            reason = disconnect_reason(verdict, payload[0], seq)
            refusals.log(logging.INFO, verdict.value, "pre-auth packet refused as sshd refuses it: %s", reason)
            send_disconnect(DISC_PROTOCOL_ERROR, reason, "")
            close_as_sshd(asyncssh.ProtocolError(reason))
            return False
        if verdict is Verdict.UNIMPLEMENTED:
            c.send_packet(MSG_UNIMPLEMENTED, UInt32(seq))
        c._recv_seq = (seq + 1) & 0xFFFFFFFF
        c._recv_handler = c._recv_pkthdr
        return True

    send = c._send

    def send_zero_padded(data: bytes) -> None:
        if c._send_encryption is None and _is_plain_packet(data):
            data = data[: len(data) - data[4]] + bytes(data[4])
        send(data)

    def send_disconnect_once_encrypted(code: int, reason: str, lang: str) -> None:
        # sshd closes without a word on errors of the initial key exchange, even after its own NEWKEYS:
        # asyncssh's DISCONNECT is sent only once the client's NEWKEYS is in.
        if c._recv_encryption is not None:
            send_disconnect(code, reason, lang)

    send_ext_info = c._send_ext_info

    def send_openssh_ext_info() -> None:
        c._extensions_to_send.pop(b"global-requests-ok", None)
        c._extensions_to_send[HOSTBOUND_EXTENSION] = b"0"  # after server-sig-algs, as sshd sends them
        send_ext_info()

    c._recv_handler = recv_identification
    c.data_received = count_received  # type: ignore[method-assign]
    c._force_close = close_as_sshd  # type: ignore[method-assign]
    c._recv_packet = recv_packet_as_sshd  # type: ignore[method-assign]
    c._send = send_zero_padded  # type: ignore[method-assign]
    c._send_disconnect = send_disconnect_once_encrypted  # type: ignore[method-assign]
    c._send_ext_info = send_openssh_ext_info  # type: ignore[method-assign]


def _expected_kex_messages(conn: asyncssh.SSHServerConnection) -> frozenset[int]:
    """The key exchange messages a server waits for now: the method's own until it has replied, then NEWKEYS."""
    kex = conn._kex
    if kex is None:
        return frozenset({MSG_NEWKEYS}) if conn._next_recv_encryption is not None else frozenset()
    if MSG_KEX_DH_GEX_REQUEST in kex._packet_handlers:  # group exchange: the request, then (group sent) INIT
        return frozenset({MSG_KEX_DH_GEX_INIT}) if getattr(kex, "_p", 0) else frozenset({MSG_KEX_DH_GEX_REQUEST})
    return frozenset({MSG_KEX_ECDH_INIT})  # KEXDH_INIT and KEX_ECDH_INIT alike


MSG_KEX_ECDH_INIT, MSG_KEX_DH_GEX_INIT, MSG_KEX_DH_GEX_REQUEST = 30, 32, 34


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
