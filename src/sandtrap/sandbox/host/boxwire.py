"""The host<->box wire protocol, host side: its constants, the request encoder and the reply parser.

``src/sandtrap/box/PROTOCOL.md`` describes the protocol; this module is its one machine-readable source.
``box/protocol.h`` (the constants as the box's C code sees them) is generated from :data:`CONSTANTS` by
``python -m sandtrap.sandbox.host.boxwire > src/sandtrap/box/protocol.h`` (the header names no ``sandtrap``:
the box's sources must not). ``tests/unit/box/`` checks that the committed header is current, that
PROTOCOL.md names the same values, and that the box's own parser and encoder (``box/wire.c``, compiled by the
test) read what :func:`encode_request` writes and write what :func:`parse_reply` reads.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sandtrap.errors import SandboxError
from sandtrap.sandbox.base import ExitStatus, TermSize, exit_status

# --- the constants both sides use (protocol.h is generated from CONSTANTS) -----------------------------------

SOCKET_PATH = "/org/freedesktop/systemd1/private"  # an abstract unix socket (SOCK_SEQPACKET) in the box's netns
SOCKET_NAME = b"\0" + SOCKET_PATH.encode()  # as Python's socket module spells an abstract address
INETD_SOCKET_PATH = "/org/freedesktop/systemd1/inetd"  # inetd's listener (telnet logins), the same protocol
INETD_SOCKET_NAME = b"\0" + INETD_SOCKET_PATH.encode()
MAGIC = b"STB1"
HEADER = struct.Struct("<4sBHHHH")  # magic, flags, cols, rows, argc, envc
FLAG_TTY = 1
FLAG_RELAY = 2
MAX_REQUEST = 65536  # one request packet, header included
MAX_STRINGS = 512  # argc + envc
MAX_REPLY = 512  # the largest packet the host reads from the box
MAX_FDS = 3  # fds one reply may carry (SCM_RIGHTS)
MAX_FAILED_TEXT = 128  # the text of an 'E' reply, at most
MAX_PID = 1 << 22  # PID_MAX_LIMIT: a started pid is 0 < pid < this
REPLY_STARTED = b"O"  # u32 pid + fds
REPLY_EXITED = b"X"  # u32 wait status
REPLY_FAILED = b"E"  # text
REPLY_CONNECT = b"R"  # the relay's peer is expected now
REPLY_NO_RELAY = b"N"  # from the box: no expectation taken; from the host: it will not connect
SEND_SIGNAL = b"K"  # host -> box: u8 signal for the process group
MAX_SIGNAL = 31  # signals 1..31
REQUEST_TIMEOUT_MS = 5000  # the box's worker waits this long for the request
RELAY_WAIT_MS = 3000  # ...and this long for the relay's connection
EXPECT_TIMEOUT_MS = 5000  # the listener holds an expected peer this long
HANGUP_KILL_MS = 2000  # SIGHUP on the host's hang-up, SIGKILL this much later

#: What ``protocol.h`` defines, in its order: (C name, value). Strings become C string literals, a one-byte
#: ``bytes`` a character literal, ints numbers.
CONSTANTS: tuple[tuple[str, str | bytes | int], ...] = (
    ("BOX_SOCKET", SOCKET_PATH),
    ("INETD_SOCKET", INETD_SOCKET_PATH),
    ("REQUEST_MAGIC", MAGIC.decode()),
    ("REQUEST_MAGIC_SIZE", len(MAGIC)),
    ("REQUEST_FLAGS_AT", struct.calcsize("<4s")),
    ("REQUEST_COLS_AT", struct.calcsize("<4sB")),
    ("REQUEST_ROWS_AT", struct.calcsize("<4sBH")),
    ("REQUEST_ARGC_AT", struct.calcsize("<4sBHH")),
    ("REQUEST_ENVC_AT", struct.calcsize("<4sBHHH")),
    ("REQUEST_HEADER_SIZE", HEADER.size),
    ("REQUEST_TTY", FLAG_TTY),
    ("REQUEST_RELAY", FLAG_RELAY),
    ("MAX_REQUEST", MAX_REQUEST),
    ("MAX_STRINGS", MAX_STRINGS),
    ("MAX_REPLY", MAX_REPLY),
    ("MAX_REPLY_FDS", MAX_FDS),
    ("MAX_FAILED_TEXT", MAX_FAILED_TEXT),
    ("REPLY_STARTED", REPLY_STARTED),
    ("REPLY_EXITED", REPLY_EXITED),
    ("REPLY_FAILED", REPLY_FAILED),
    ("REPLY_CONNECT", REPLY_CONNECT),
    ("REPLY_NO_RELAY", REPLY_NO_RELAY),
    ("SEND_SIGNAL", SEND_SIGNAL),
    ("MAX_SIGNAL", MAX_SIGNAL),
    ("REQUEST_TIMEOUT_MS", REQUEST_TIMEOUT_MS),
    ("RELAY_WAIT_MS", RELAY_WAIT_MS),
    ("EXPECT_TIMEOUT_MS", EXPECT_TIMEOUT_MS),
    ("HANGUP_KILL_MS", HANGUP_KILL_MS),
)


class BrokerError(SandboxError):
    """The listener could not start the process (the caller falls back to ``docker exec``)."""


# --- requests ---------------------------------------------------------------------------------------------


def encode_request(
    argv: Sequence[str | bytes],
    env: Mapping[str, str],
    user: str,
    workdir: str,
    tty: TermSize | None,
    peer: str | None = None,
) -> bytes:
    """One request packet; refuses what the listener would refuse. ``peer`` ("ADDR PORT"): the connection to :22
    the listener is to expect for this session (:data:`FLAG_RELAY`)."""
    if not argv or len(argv) + len(env) > MAX_STRINGS:
        raise BrokerError("argv empty or too many strings")
    texts = [user, workdir, *([peer] if peer is not None else []), *argv, *(f"{k}={v}" for k, v in env.items())]
    strings = [s if isinstance(s, bytes) else s.encode("utf-8", "surrogateescape") for s in texts]
    if any(b"\0" in s for s in strings) or any("=" in k or not k for k in env):
        raise BrokerError("NUL in a string, or a bad variable name")
    cols = min(max(tty.cols, 0), 0xFFFF) if tty else 0
    rows = min(max(tty.rows, 0), 0xFFFF) if tty else 0
    flags = (FLAG_TTY if tty else 0) | (FLAG_RELAY if peer is not None else 0)
    head = HEADER.pack(MAGIC, flags, cols, rows, len(argv), len(env))
    data = head + b"".join(s + b"\0" for s in strings)
    if len(data) > MAX_REQUEST:
        raise BrokerError("request too large")
    return data


def encode_signal(signum: int) -> bytes:
    """The host's 'K' message: ``signum`` (1..MAX_SIGNAL) for the process group."""
    if not 0 < signum <= MAX_SIGNAL:
        raise BrokerError(f"signal {signum} out of range")
    return SEND_SIGNAL + bytes([signum])


# --- replies ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Started:
    pid: int


@dataclass(frozen=True, slots=True)
class Exited:
    status: ExitStatus


@dataclass(frozen=True, slots=True)
class Failed:
    reason: str


@dataclass(frozen=True, slots=True)
class Connect:
    """The listener expects the session's connection now (``ready``), or cannot (the host does not connect)."""

    ready: bool


Reply = Started | Exited | Failed | Connect


def wait_status(raw: int) -> ExitStatus:
    """A waitpid status as the engine reports an exec's: the code, or 128+N for signal N (named for SSH)."""
    raw &= 0xFFFFFFFF
    sig = raw & 0x7F
    if sig == 0:  # the session helper exits 128+N for a shell signal N ended, as the engine reports it
        return exit_status((raw >> 8) & 0xFF)
    if sig != 0x7F:  # killed by a signal (0x7f would be "stopped", which waitpid without WUNTRACED never says)
        return exit_status(128 + sig)
    return ExitStatus(255)


def parse_reply(data: bytes) -> Reply:
    """One packet from the listener; anything else is a :class:`BrokerError`."""
    if not data:
        raise BrokerError("empty reply")
    kind, body = data[:1], data[1:]
    if kind == REPLY_STARTED and len(body) == 4:
        pid = struct.unpack("<I", body)[0]
        if not 0 < pid < MAX_PID:
            raise BrokerError("bad pid")
        return Started(pid)
    if kind == REPLY_EXITED and len(body) == 4:
        return Exited(wait_status(struct.unpack("<I", body)[0]))
    if kind == REPLY_FAILED and len(body) <= MAX_FAILED_TEXT:
        return Failed(body.decode("ascii", "replace"))
    if kind in (REPLY_CONNECT, REPLY_NO_RELAY) and not body:
        return Connect(kind == REPLY_CONNECT)
    raise BrokerError(f"unexpected reply ({len(data)} bytes)")


# --- protocol.h -------------------------------------------------------------------------------------------


def _c_literal(value: str | bytes | int) -> str:
    if isinstance(value, bytes):
        return f"'{value.decode()}'"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def c_header() -> str:
    """``box/protocol.h`` as it must read."""
    width = max(len(name) for name, _ in CONSTANTS)
    lines = [
        "/*",
        " * The host<->box wire protocol's constants, as PROTOCOL.md describes them. Generated from the host's",
        " * protocol module (boxwire.py, see PROTOCOL.md): do not edit.",
        " */",
        "#ifndef PROTOCOL_H",
        "#define PROTOCOL_H",
        "",
        *(f"#define {name:<{width}} {_c_literal(value)}" for name, value in CONSTANTS),
        "",
        "#endif",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(c_header())
