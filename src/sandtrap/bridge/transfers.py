"""Watch file transfers as they cross the relay: SFTP requests and SCP file headers become events.

The parsers read the attacker's side of the stream only, never change it, and stop watching (the
relay goes on) at the first packet that does not parse or is larger than sftp-server accepts.
"""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Callable
from typing import Any

from sandtrap.sandbox.base import TermSize

log = logging.getLogger(__name__)

Report = Callable[..., Any]

# SFTP v3 request types whose first field(s) are paths (draft-ietf-secsh-filexfer-02).
_SFTP_OPS = {
    3: "open",
    9: "setstat",
    11: "opendir",
    13: "remove",
    14: "mkdir",
    15: "rmdir",
    16: "realpath",
    17: "stat",
    18: "rename",
    19: "readlink",
    20: "symlink",
}
_TWO_PATHS = {18, 20}
_MAX_SFTP_PACKET = 256 * 1024 + 1024  # OpenSSH sftp-server's SFTP_MAX_MSG_LENGTH plus headers
_PFLAGS = {1: "read", 2: "write", 4: "append", 8: "create", 16: "truncate", 32: "excl"}
_MAX_PATH = 4096


def _string(buf: bytes, pos: int) -> tuple[bytes, int]:
    (n,) = struct.unpack_from(">I", buf, pos)
    pos += 4
    if n > len(buf) - pos:
        raise ValueError("string past end of packet")
    return buf[pos : pos + n], pos + n


def _text(raw: bytes) -> str:
    return raw[:_MAX_PATH].decode("utf-8", "backslashreplace")


class SftpWatcher:
    """Reports each path-bearing SFTP request: ``report(op=..., path=..., [target=...], [flags=...])``."""

    def __init__(self, report: Report) -> None:
        self._report = report
        self._buf = bytearray()
        self._broken = False
        self.requests = 0

    def on_input(self, data: bytes) -> None:
        if self._broken:
            return
        self._buf += data
        while len(self._buf) >= 4:
            (length,) = struct.unpack_from(">I", self._buf, 0)
            if length == 0 or length > _MAX_SFTP_PACKET:
                self._stop(f"packet length {length}")
                return
            if len(self._buf) < 4 + length:
                return
            packet = bytes(self._buf[4 : 4 + length])
            del self._buf[: 4 + length]
            try:
                self._packet(packet)
            except (ValueError, struct.error) as exc:
                self._stop(str(exc))
                return

    def _packet(self, packet: bytes) -> None:
        kind = packet[0]
        op = _SFTP_OPS.get(kind)
        if op is None:
            return
        pos = 5  # type byte + request id
        path, pos = _string(packet, pos)
        fields: dict[str, Any] = {"op": op, "path": _text(path)}
        if kind in _TWO_PATHS:
            target, pos = _string(packet, pos)
            fields["target"] = _text(target)
        if kind == 3:
            (pflags,) = struct.unpack_from(">I", packet, pos)
            fields["flags"] = ",".join(name for bit, name in _PFLAGS.items() if pflags & bit)
        self.requests += 1
        self._report(**fields)

    def _stop(self, why: str) -> None:
        self._broken = True
        self._buf.clear()
        log.info("sftp stream no longer parsed: %s", why)

    def on_output(self, data: bytes, stderr: bool) -> None:
        pass

    def on_resize(self, size: TermSize) -> None:
        pass


_SCP_HEADER = re.compile(rb"([CD])([0-7]{4}) (\d{1,20}) ([^\n/]{1,4096})\n")


class ScpWatcher:
    """Reports each file and directory header an ``scp -t`` sink receives (uploads)."""

    def __init__(self, report: Report) -> None:
        self._report = report
        self._buf = bytearray()
        self._skip = 0  # bytes of file content still to pass over
        self._broken = False

    def on_input(self, data: bytes) -> None:
        if self._broken:
            return
        view = memoryview(data)
        while view:
            if self._skip:
                n = min(self._skip, len(view))
                self._skip -= n
                view = view[n:]
                continue
            nl = bytes(view).find(b"\n")
            if nl < 0:
                self._buf += view
                if len(self._buf) > 8192:
                    self._broken = True
                return
            self._buf += view[: nl + 1]
            view = view[nl + 1 :]
            line = bytes(self._buf)
            self._buf.clear()
            m = _SCP_HEADER.fullmatch(line)
            if m:
                kind, mode, size, name = m.groups()
                self._report(
                    kind="file" if kind == b"C" else "dir", mode=mode.decode(), size=int(size), filename=_text(name)
                )
                if kind == b"C":
                    self._skip = int(size) + 1  # content, then the \0 that ends it
            # T (times), E (end of dir) and anything else: no event.

    def on_output(self, data: bytes, stderr: bool) -> None:
        pass

    def on_resize(self, size: TermSize) -> None:
        pass


def is_scp_sink(command: str) -> bool:
    """``scp -t ...`` (legacy protocol upload) as the client runs it on the server."""
    parts = command.split()
    return bool(parts) and parts[0].rsplit("/", 1)[-1] == "scp" and "-t" in parts[1:]
