"""Bad input against the SSH port, bounded: malformed identification lines, malformed, oversized and truncated
packets, random bytes after key exchange, a slowloris of idle connections, huge and binary strings in every field
and terminal escape sequences in commands.

Pass: the honeypot never crashes (after each batch a new login runs a command), its memory stays bounded, an
established interactive session keeps answering throughout, every connection is recorded once
(``cowrie.session.closed``) and the operator's log gets at most one line per refusal, rate-limited under a flood.

Raw asyncio sockets for what no SSH client would send, asyncssh (with a few of its internals) for what must come
after a key exchange. Each test prints how many cases it sent (``pytest -s``). The honeypot runs in this process
(fixture ``honeypot``), on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import logging
import os
import random
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncssh
import httpx
import psutil
import pytest
from asyncssh.packet import Boolean, String
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from sandtrap.events import (
    CHANNEL_EXEC,
    CLIENT_VAR,
    CLIENT_VERSION,
    COMMAND_INPUT,
    LIMIT_HIT,
    LOGIN_FAILED,
    SESSION_CLOSED,
    SESSION_CONNECT,
)
from sandtrap.logs import RateLimited
from sandtrap.ssh import server as ssh_server
from sandtrap.ssh import wire as ssh_wire

from sshclient import asyncssh_options as client_options

pytestmark = pytest.mark.timeout(420)

Honeypot = Callable[..., Any]
LOGIN_GRACE_S = 8.0
SLOWLORIS_GRACE_S = 4.0  # the slowloris test's own: what it proves does not depend on the length
MAX_SESSIONS = 150
OVERRIDES: dict[str, Any] = {
    # Every fuzz connection comes from 127.0.0.1: the per-IP cap would refuse them all; the global one stays.
    "limits": {"max_sessions": MAX_SESSIONS, "max_sessions_per_ip": 100_000},
    "ssh": {"login_grace_time_s": LOGIN_GRACE_S},
    "api": {"listen": "127.0.0.1:0"},
}
RNG = random.Random(20240611)  # the same cases every run
MSG_USERAUTH_REQUEST = 50
RSS_GROWTH_LIMIT = 96 * 2**20  # the whole fuzz battery may grow this process by at most this much
LOG_FLOOD_LIMIT = 30  # diagnostic lines a flood of refusals may cause (first few, then a summary)


# -- the honeypot's side: logs, memory, liveness --------------------------------------------------------------
class LogTap(logging.Handler):
    """What the operator's log would get: sandtrap's records at INFO and up, asyncssh's and asyncio's at WARNING."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        threshold = logging.INFO if record.name.startswith("sandtrap") else logging.WARNING
        if record.levelno >= threshold:
            self.records.append(record)

    def since(self, mark: int) -> list[logging.LogRecord]:
        return self.records[mark:]

    def lines(self, mark: int = 0) -> list[str]:
        return [f"{r.levelname} {r.name}: {r.getMessage()}" for r in self.since(mark)]


@pytest.fixture
def logtap() -> Iterator[LogTap]:
    tap = LogTap()
    loggers = {"sandtrap": logging.INFO, "asyncssh": logging.WARNING, "asyncio": logging.WARNING}
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name, level in loggers.items():
        logging.getLogger(name).setLevel(level)
        logging.getLogger(name).addHandler(tap)
    try:
        yield tap
    finally:
        for name, level in saved.items():
            logging.getLogger(name).removeHandler(tap)
            logging.getLogger(name).setLevel(level)


def rss() -> int:
    gc.collect()
    return int(psutil.Process().memory_info().rss)


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


class Term(asyncssh.SSHClientSession[bytes]):
    """A client session that keeps everything it received, for waiting on markers."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.changed = asyncio.Event()
        self.closed = asyncio.Event()
        self.exit_status: int | None = None
        self.exit_signal: str | None = None

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.buf += data
        self.changed.set()

    def exit_status_received(self, status: int) -> None:
        self.exit_status = status

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self.exit_signal = signal

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()
        self.changed.set()

    async def wait_for(self, marker: bytes, start: int = 0, timeout_s: float = 30.0) -> int:
        """Wait until ``marker`` appears at or after ``start``; the offset just past it."""
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    idx = self.buf.find(marker, start)
                    if idx >= 0:
                        return idx + len(marker)
                    if self.closed.is_set():
                        raise EOFError(f"channel closed before {marker!r}; got {bytes(self.buf[-300:])!r}")
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(f"no {marker!r} within {timeout_s}s; got {bytes(self.buf[-300:])!r}") from None


async def login_shell(port: int) -> tuple[asyncssh.SSHClientConnection, asyncssh.SSHClientChannel[bytes], Term]:
    async with asyncio.timeout(60):
        conn = await asyncssh.connect("127.0.0.1", port, **client_options())
        chan, term = await conn.create_session(Term, term_type="xterm", term_size=(120, 40), encoding=None)
        await term.wait_for(b"# ", timeout_s=45)
    return conn, chan, term


async def exec_ok(port: int, command: str = "echo alive-$((40+2))", expect: bytes = b"alive-42") -> float:
    """A fresh login runs ``command``; the seconds it took (AssertionError when the honeypot does not serve)."""
    start = time.monotonic()
    async with asyncio.timeout(90):
        async with asyncssh.connect("127.0.0.1", port, **client_options()) as conn:
            result = await conn.run(command, encoding=None)
    assert expect in (result.stdout or b""), result
    return time.monotonic() - start


@dataclass
class Heartbeat:
    """An established interactive session that types a command every ``interval_s`` and times each answer."""

    port: int
    interval_s: float = 0.5
    beats: int = 0
    worst_s: float = 0.0
    error: str = ""
    latencies: list[float] = field(default_factory=list)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Heartbeat]:
        conn, chan, term = await login_shell(self.port)
        task = asyncio.create_task(self._beat(chan, term))
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            conn.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(10):
                    await conn.wait_closed()

    async def _beat(self, chan: asyncssh.SSHClientChannel[bytes], term: Term) -> None:
        pos = len(term.buf)
        try:
            while True:
                n = self.beats
                start = time.monotonic()
                chan.write(f"echo beat-{n}-$(({n}*3))\r".encode())
                pos = await term.wait_for(f"beat-{n}-{n * 3}\r\n".encode(), pos, timeout_s=30)
                took = time.monotonic() - start
                self.latencies.append(took)
                self.worst_s = max(self.worst_s, took)
                self.beats += 1
                await asyncio.sleep(self.interval_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def check(self, min_beats: int = 1, worst_s: float = 5.0) -> None:
        assert not self.error, f"the established session broke: {self.error}"
        assert self.beats >= min_beats, f"only {self.beats} answers"
        assert self.worst_s <= worst_s, f"an answer took {self.worst_s:.1f}s"


# -- raw TCP ----------------------------------------------------------------------------------------------------
@dataclass
class Raw:
    src_port: int
    banner: bytes
    received: bytes
    closed_by_server: bool
    seconds: float


async def raw_case(
    port: int,
    payload: bytes,
    *,
    read_banner: bool = True,
    half_close: bool = True,
    timeout_s: float = 20.0,
    chunks: int = 1,
) -> Raw:
    """Connect, read the server's identification line, send ``payload`` (in ``chunks``), optionally half-close,
    then read until the server closes or ``timeout_s`` passes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    src_port = int(writer.get_extra_info("sockname")[1])
    banner = b""
    got = bytearray()
    start = time.monotonic()
    closed = False
    try:
        if read_banner:
            async with asyncio.timeout(10):
                banner = await reader.readline()
        try:
            step = max(1, -(-len(payload) // chunks))
            for i in range(0, len(payload), step):
                writer.write(payload[i : i + step])
                await writer.drain()
            if half_close:
                writer.write_eof()
        except (ConnectionError, OSError):
            pass  # the server hung up mid-payload: that is an answer too
        try:
            async with asyncio.timeout(timeout_s):
                while chunk := await reader.read(65536):
                    got += chunk
            closed = True
        except (ConnectionError, OSError):
            closed = True
        except TimeoutError:
            closed = False
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return Raw(src_port, banner, bytes(got), closed, time.monotonic() - start)


def packet(payload: bytes, pad: int | None = None, length: int | None = None) -> bytes:
    """A cleartext binary packet (RFC 4253 6), with optional lies about its padding and length."""
    padlen = pad if pad is not None else 4 + (-(len(payload) + 5 + 4)) % 8
    body = bytes([padlen & 0xFF]) + payload + bytes(max(padlen, 0))
    return struct.pack(">I", (len(body) if length is None else length) & 0xFFFFFFFF) + body


def name_list(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def kexinit_lists() -> list[bytes]:
    return [
        b"curve25519-sha256,ext-info-c",
        b"ssh-ed25519,rsa-sha2-256",
        b"aes128-ctr",
        b"aes128-ctr",
        b"hmac-sha2-256",
        b"hmac-sha2-256",
        b"none",
        b"none",
        b"",
        b"",
    ]


def kexinit(lists: list[bytes] | None = None, follows: int = 0, trailer: bytes = b"\0\0\0\0") -> bytes:
    lists = lists or kexinit_lists()
    return bytes([20]) + os.urandom(16) + b"".join(name_list(x) for x in lists) + bytes([follows]) + trailer


IDENT = b"SSH-2.0-fuzz_1.0\r\n"

# Identification lines sshd (and so the honeypot) must refuse or take, each on its own connection.
IDENT_CASES: list[tuple[str, bytes]] = [
    ("empty line", b"\r\n"),
    ("bare newline", b"\n"),
    ("ssh-1.5", b"SSH-1.5-OpenSSH_1.2\r\n"),
    ("ssh-3.0", b"SSH-3.0-future\r\n"),
    ("ssh-2.0 no software", b"SSH-2.0\r\n"),
    ("ssh-2.0- empty software", b"SSH-2.0-\r\n"),
    ("lowercase", b"ssh-2.0-OpenSSH_9.2\r\n"),
    ("http request", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
    ("tls client hello", bytes.fromhex("16030100a5010000a10303") + os.urandom(160)),
    ("smtp", b"EHLO fuzz\r\n"),
    ("nul inside", b"SSH-2.0-Open\0SSH\r\n"),
    ("nul first", b"\0SSH-2.0-x\r\n"),
    ("cr inside", b"SSH-2.0-Open\rSSH\r\n"),
    ("invalid utf-8", b"SSH-2.0-\xff\xfe\xc3\x28\xa0\xa1\r\n"),
    ("latin-1", b"SSH-2.0-caf\xe9\r\n"),
    ("escape sequences", b"SSH-2.0-\x1b]0;pwned\x07\x1b[2J\x1b[31mred\r\n"),
    ("8-bit csi", b"SSH-2.0-\x9b31mred\x9c\r\n"),
    ("overlong 255", b"SSH-2.0-" + b"A" * 247 + b"\r\n"),
    ("over 255", b"SSH-2.0-" + b"A" * 300 + b"\r\n"),
    ("8191 no newline", b"SSH-2.0-" + b"B" * 8183),
    ("8192 no newline", b"SSH-2.0-" + b"B" * 8184),
    ("64k no newline", b"C" * 65536),
    ("banner lines first", b"hello\r\nworld\r\nSSH-2.0-x\r\n"),
    ("many short lines", b"x\r\n" * 2000),
    ("spaces in version", b"SSH- 2.0-x\r\n"),
    ("negative major", b"SSH--2.0-x\r\n"),
    ("huge major", b"SSH-99999999999999999999.0-x\r\n"),
    ("1.99", b"SSH-1.99-OpenSSH_3.0\r\n"),
    ("version then garbage", b"SSH-2.0-x\r\n" + os.urandom(64)),
    ("version twice", b"SSH-2.0-x\r\nSSH-2.0-y\r\n"),
    ("only cr", b"SSH-2.0-x\r"),
    ("random 1", os.urandom(1)),
    ("random 100", os.urandom(100)),
    ("random 4096", os.urandom(4096)),
    ("all bytes", bytes(range(256))),
    ("unicode ident", "SSH-2.0-Ωmega_☃\r\n".encode()),
    ("tab and del", b"SSH-2.0-a\tb\x7fc\r\n"),
    ("comments", b"SSH-2.0-x comment with \x1b[5m blink\r\n"),
    ("slow drip", b"SSH-2.0-drip\r\n"),  # sent in 14 chunks
    ("nothing, then close", b""),
]

# Packets after a valid identification line: lies about length and padding, wrong message types, broken KEXINITs.
PACKET_CASES: list[tuple[str, bytes]] = [
    ("length 0xffffffff", struct.pack(">I", 0xFFFFFFFF) + os.urandom(64)),
    ("length 0x7fffffff", struct.pack(">I", 0x7FFFFFFF) + os.urandom(64)),
    ("length 1 MiB, header only", struct.pack(">I", 1 << 20) + os.urandom(16)),
    ("length 35001", struct.pack(">I", 35001) + os.urandom(35001)),
    ("length 0", struct.pack(">I", 0) + os.urandom(16)),
    ("length 1", struct.pack(">I", 1) + bytes(12)),
    ("length 4", struct.pack(">I", 4) + bytes(12)),
    ("padding > length", packet(b"\x14" + os.urandom(20), pad=250, length=32)),
    ("padding 255", packet(b"\x02", pad=255)),
    ("padding 0", packet(b"\x02abc", pad=0)),
    ("msg 0", packet(b"\x00")),
    ("msg 255", packet(b"\xff" + os.urandom(30))),
    ("disconnect garbage", packet(b"\x01" + os.urandom(40))),
    ("disconnect invalid utf-8", packet(b"\x01\0\0\0\x0b" + name_list(b"\xff\xfe\0bye") + name_list(b""))),
    ("ignore huge", packet(b"\x02" + name_list(os.urandom(30000)))),
    ("unimplemented", packet(b"\x03\0\0\0\x05")),
    ("debug invalid utf-8", packet(b"\x04\x01" + name_list(b"\xff\x00\x1b[2J") + name_list(b"\xfe"))),
    ("newkeys first", packet(b"\x15")),
    ("kexdh init first", packet(b"\x1e" + name_list(os.urandom(32)))),
    ("userauth before kex", packet(b"\x32" + name_list(b"root") + name_list(b"ssh-connection") + name_list(b"none"))),
    ("channel open before kex", packet(b"\x5a" + name_list(b"session") + bytes(12))),
    ("global request before kex", packet(b"\x50" + name_list(b"tcpip-forward") + b"\x01")),
    ("kexinit truncated", packet(kexinit()[:40])),
    ("kexinit nul in lists", packet(kexinit([b"curve25519\0-sha256", b"ssh-ed25519\0"] + [b"aes128-ctr\0"] * 8))),
    ("kexinit invalid utf-8", packet(kexinit([b"\xff\xfe", b"\xc3\x28"] + [b"\xa0\xa1"] * 8))),
    ("kexinit no common algs", packet(kexinit([b"nope"] * 10))),
    ("kexinit huge list", packet(kexinit([b",".join([b"x" * 60] * 450)] + [b"aes128-ctr"] * 9))),
    ("kexinit lying list length", packet(bytes([20]) + bytes(16) + struct.pack(">I", 0xFFFFFF00) + b"abc")),
    ("kexinit follows + garbage", packet(kexinit(follows=1)) + packet(b"\x1e" + os.urandom(200))),
    ("kexinit twice", packet(kexinit()) + packet(kexinit())),
    ("kexinit trailing junk", packet(kexinit(trailer=b"\0\0\0\0" + os.urandom(100)))),
    ("truncated packet", struct.pack(">I", 1000) + os.urandom(100)),
    ("random after ident 7", os.urandom(7)),
    ("random after ident 1000", os.urandom(1000)),
    ("random after ident 40000", os.urandom(40000)),
    ("escape sequences as packet", packet(b"\x02" + name_list(b"\x1b]52;c;ZXZpbA==\x07\x1b[6n"))),
]


async def wait_closed_events(hp: Any, ports: list[int], timeout_s: float = 30.0) -> dict[int, int]:
    """``cowrie.session.closed`` per client port, once all of ``ports`` have one (or the time is up)."""
    sessions: dict[int, str] = {}
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                sessions = {e.get("src_port"): e.session for e in hp.events(SESSION_CONNECT)}
                closed = Counter(e.session for e in hp.events(SESSION_CLOSED))
                if all(p in sessions and closed[sessions[p]] >= 1 for p in ports):
                    break
                await asyncio.sleep(0.1)
    except TimeoutError:
        pass
    closed = Counter(e.session for e in hp.events(SESSION_CLOSED))
    return {p: closed[sessions[p]] if p in sessions else 0 for p in ports}


def assert_json_log_is_clean(hp: Any) -> int:
    """Every line of the JSON log is one JSON object and the file is valid UTF-8; returns the line count."""
    path = hp.settings.data_dir / "log" / "sandtrap.json"
    raw = path.read_bytes()
    text = raw.decode("utf-8")  # strict: a Cowrie pipeline reads UTF-8
    lines = text.splitlines()
    for n, line in enumerate(lines, 1):
        assert isinstance(json.loads(line), dict), f"line {n}: {line[:200]}"
    return len(lines)


async def settle(hp: Any, timeout_s: float = 20.0) -> None:
    jsonlog = hp.services.jsonlog
    async with asyncio.timeout(timeout_s):
        while jsonlog.written + jsonlog.errors < hp.services.bus.events_emitted:
            await asyncio.sleep(0.05)


def no_raw_controls(lines: list[str]) -> list[str]:
    """Operator log lines that carry raw control characters (attacker bytes must be escaped when shown)."""
    return [line for line in lines if any((ord(c) < 32 and c not in "\t\n") or 0x7F <= ord(c) < 0xA0 for c in line)]


# -- 1. identification lines and packets ---------------------------------------------------------------------------
async def test_malformed_identification_and_packets_are_refused_and_recorded_once(
    honeypot: Honeypot, logtap: LogTap
) -> None:
    hp = await honeypot(**OVERRIDES)
    port = hp.port
    base = rss()
    mark = len(logtap.records)
    results: list[tuple[str, Raw]] = []
    async with Heartbeat(port).running() as beat:
        for name, data in IDENT_CASES:
            chunks = 14 if name == "slow drip" else 1
            results.append((f"ident: {name}", await raw_case(port, data, chunks=chunks)))
        for name, data in PACKET_CASES:
            results.append((f"packet: {name}", await raw_case(port, IDENT + data)))
        # Truncated and stalled (no EOF): the server must drop them itself, after its login grace time.
        stalled = [
            ("stall: after banner", b""),
            ("stall: half an ident", b"SSH-2.0-hal"),
            ("stall: half a packet", IDENT + struct.pack(">I", 1000) + os.urandom(100)),
            ("stall: after kexinit", IDENT + packet(kexinit())),
        ]
        stalls = await asyncio.gather(
            *(raw_case(port, data, half_close=False, timeout_s=LOGIN_GRACE_S + 20) for _, data in stalled)
        )
        results += [(name, r) for (name, _), r in zip(stalled, stalls, strict=True)]
        alive_s = await exec_ok(port)
    beat.check(min_beats=5)
    grown = rss() - base

    print(
        f"\n[fuzz] identification cases {len(IDENT_CASES)}, packet cases {len(PACKET_CASES)}, "
        f"stalled {len(stalled)}; heartbeat {beat.beats} answers, worst {beat.worst_s:.2f}s; "
        f"new login after {alive_s:.1f}s; RSS growth {mib(grown)}; log lines {len(logtap.since(mark))}"
    )
    not_closed = [name for name, r in results if not r.closed_by_server]
    assert not not_closed, f"the server kept these connections open: {not_closed}"
    slow = [(name, round(r.seconds, 1)) for name, r in results if r.seconds > LOGIN_GRACE_S + 10]
    assert not slow, slow
    banners = {r.banner for _, r in results}
    assert banners == {hp.settings.ssh.version.encode() + b"\r\n"}, banners
    records = await wait_closed_events(hp, [r.src_port for _, r in results])
    wrong = {name: records[r.src_port] for name, r in results if records[r.src_port] != 1}
    assert not wrong, f"connections not recorded exactly once (cowrie.session.closed count): {wrong}"
    versions = [e.get("version") for e in hp.events(CLIENT_VERSION)]
    assert all(len(v) <= 600 and no_raw_controls([v]) == [] for v in versions), versions
    lines = logtap.lines(mark)
    assert len(lines) <= len(results), "more than one log line per refused connection:\n" + "\n".join(lines)
    assert not no_raw_controls(lines), no_raw_controls(lines)
    await settle(hp)
    assert_json_log_is_clean(hp)
    assert grown < RSS_GROWTH_LIMIT, mib(grown)


async def test_non_ascii_client_identification_is_answered_and_recorded(honeypot: Honeypot) -> None:
    """sshd takes any byte but CR and NUL in the client's identification; so does the honeypot (ssh/wire.py), and
    the record escapes what is not printable ASCII. A client that goes on with such an identification logs in."""
    hp = await honeypot(**OVERRIDES)
    r = await raw_case(hp.port, b"SSH-2.0-caf\xe9_\xff\r\n", half_close=False, timeout_s=3)
    [connect] = await hp.wait_for(SESSION_CONNECT, src_port=r.src_port)
    await hp.wait_for(SESSION_CLOSED, session=connect.session)
    versions = [e.get("version") for e in hp.events(CLIENT_VERSION, session=connect.session)]
    assert r.received[5:6] == b"\x14", f"no KEXINIT in answer: {r.received[:60]!r}"  # SSH_MSG_KEXINIT
    assert versions == ["SSH-2.0-caf\\xe9_\\xff"], versions

    # The exchange hash covers the identification's bytes as sent: a real client with such a version gets in.
    async with asyncio.timeout(45):
        conn = await asyncssh.connect(
            "127.0.0.1", hp.port, client_factory=NonAsciiVersion, **client_options(client_version="cafe")
        )
        async with conn:
            src_port = int(conn.get_extra_info("sockname")[1])
            result = await conn.run("echo in-$((6*7))", check=False)
    assert result.stdout == "in-42\n", result
    [connect] = await hp.wait_for(SESSION_CONNECT, src_port=src_port)
    await hp.wait_for(SESSION_CLOSED, session=connect.session)
    versions = [e.get("version") for e in hp.events(CLIENT_VERSION, session=connect.session)]
    assert versions == ["SSH-2.0-caf\u00e9-\\xff"], versions


class NonAsciiVersion(asyncssh.SSHClient):
    """Sends ``SSH-2.0-café-\\xff`` (UTF-8 é, then an invalid byte) in place of the identification asyncssh built,
    and keeps those bytes for its own exchange hash."""

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        c: Any = conn
        ident = "SSH-2.0-café-".encode() + b"\xff"
        send = c._send

        def send_ident_once(data: bytes) -> None:
            if data.startswith(b"SSH-2.0-"):
                data = ident + b"\r\n"
                c._client_version = ident
                c._send = send
            send(data)

        c._send = send_ident_once


# -- 2. random bytes after the key exchange ----------------------------------------------------------------------
class GarbageAfterKex(asyncssh.SSHClient):
    """Completes the key exchange, then, when asked for a password, writes random bytes into the encrypted stream."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._conn: asyncssh.SSHClientConnection | None = None
        self.port = 0

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        self._conn = conn
        self.port = int(conn.get_extra_info("sockname")[1])

    async def password_auth_requested(self) -> str | None:
        assert self._conn is not None
        self._conn._transport.write(self._data)  # type: ignore[attr-defined]
        return "hunter2"  # its packet follows the garbage: a short garbage cannot just leave the server waiting


async def test_random_bytes_after_key_exchange_end_only_that_connection(honeypot: Honeypot, logtap: LogTap) -> None:
    hp = await honeypot(**OVERRIDES)
    port = hp.port
    base = rss()
    mark = len(logtap.records)
    sizes = [1, 3, 16, 17, 64, 255, 1024, 4096, 16384, 40000]
    before_auth: list[tuple[int, float]] = []
    after_auth: list[tuple[int, float, str | None]] = []
    async with Heartbeat(port).running() as beat:
        for size in sizes * 2:
            client = GarbageAfterKex(os.urandom(size))
            start = time.monotonic()
            with contextlib.suppress(asyncssh.Error, OSError, TimeoutError):
                async with asyncio.timeout(25):
                    conn = await asyncssh.connect(
                        "127.0.0.1", port, client_factory=lambda c=client: c, **client_options(password=None)
                    )
                    conn.close()
            before_auth.append((client.port, time.monotonic() - start))
        for size in sizes[:6]:  # in an open shell: each of these holds a sandbox until it is dropped
            conn, chan, term = await login_shell(port)
            src_port = int(conn.get_extra_info("sockname")[1])
            start = time.monotonic()
            conn._transport.write(os.urandom(size))  # type: ignore[attr-defined]
            # Less than a cipher block makes sshd wait for the rest too: the next ordinary packet misaligns it.
            chan.write(b"echo after-garbage\r")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(20):
                    await conn.wait_closed()
            after_auth.append((src_port, time.monotonic() - start, None if term.closed.is_set() else "still open"))
            conn.close()
        alive_s = await exec_ok(port)
    beat.check(min_beats=5)
    grown = rss() - base
    cases = len(before_auth) + len(after_auth)
    print(
        f"\n[fuzz] random bytes after kex: {len(before_auth)} during auth, {len(after_auth)} in a shell "
        f"({cases} cases); heartbeat {beat.beats} answers, worst {beat.worst_s:.2f}s; "
        f"new login after {alive_s:.1f}s; RSS growth {mib(grown)}"
    )
    slow = [round(s, 1) for _, s in before_auth if s > 20] + [round(s, 1) for _, s, _ in after_auth if s > 15]
    assert not slow, f"the server took this long to drop a garbled connection: {slow}"
    assert not [x for x in after_auth if x[2]], after_auth
    records = await wait_closed_events(hp, [p for p, _ in before_auth] + [p for p, _, _ in after_auth], 60)
    assert set(records.values()) == {1}, records
    lines = logtap.lines(mark)
    assert len(lines) <= cases, "more than one log line per garbled connection:\n" + "\n".join(lines[:50])
    # The garbled shells' sandboxes went back to the pool: only the heartbeat's (closed now) and the warm one remain.
    await hp.services.pool.wait_refilled()
    async with asyncio.timeout(60):
        while hp.services.pool.active:
            await asyncio.sleep(0.2)
    assert grown < RSS_GROWTH_LIMIT, mib(grown)


# -- 3. slowloris -------------------------------------------------------------------------------------------------
async def after(delay_s: float, coro: Awaitable[Raw]) -> Raw:
    await asyncio.sleep(delay_s)
    return await coro


async def test_slowloris_is_dropped_after_the_grace_time_and_the_refusals_are_rate_limited(
    honeypot: Honeypot, logtap: LogTap
) -> None:
    grace_s = SLOWLORIS_GRACE_S
    hp = await honeypot(**{**OVERRIDES, "ssh": {"login_grace_time_s": grace_s}})
    port = hp.port
    idle, drip = 300, 100
    base = rss()
    peak = base
    async with Heartbeat(port).running() as beat:
        mark = len(logtap.records)
        refused_before = len(hp.events(LIMIT_HIT))
        start = time.monotonic()
        tasks = [raw_case(port, b"", read_banner=False, half_close=False, timeout_s=grace_s + 25) for _ in range(idle)]
        # Slower still: an identification line one byte at a time, never finished.
        tasks += [
            raw_case(port, b"SSH-2.0-" + b"d" * 20, half_close=False, chunks=28, timeout_s=grace_s + 25)
            for _ in range(drip)
        ]
        # In waves of 100 a quarter second apart: all 400 at one instant overflow the listen backlog (100), and
        # the kernel's SYN retries (1, 3, 7, 15, 31 s) would stretch the flood to half a minute of waiting.
        gathered = asyncio.gather(*(after(i // 100 * 0.25, task) for i, task in enumerate(tasks)))
        while not gathered.done():
            peak = max(peak, int(psutil.Process().memory_info().rss))
            await asyncio.sleep(0.5)
        results: list[Raw] = await gathered
        flood_s = time.monotonic() - start
        await asyncio.sleep(1.0)
        refusals = len(hp.events(LIMIT_HIT)) - refused_before
        flood_lines = logtap.lines(mark)
        alive_s = await exec_ok(port)
    beat.check(min_beats=5)
    grown = rss() - base
    held = sum(1 for r in results if r.seconds > 2)
    print(
        f"\n[fuzz] slowloris: {idle} idle + {drip} dripping connections ({idle + drip} cases), {held} held until "
        f"dropped, {refusals} refused by max_sessions={MAX_SESSIONS}; all gone after {flood_s:.1f}s; "
        f"heartbeat {beat.beats} answers, worst {beat.worst_s:.2f}s; new login after {alive_s:.1f}s; "
        f"RSS peak +{mib(peak - base)}, after +{mib(grown)}; diagnostic log lines {len(flood_lines)}"
    )
    assert all(r.closed_by_server for r in results), sum(not r.closed_by_server for r in results)
    # Held for the login grace time, counted from when the server accepted each one (the kernel's accept
    # queue can hold a burst of connections a while before that).
    records = await wait_closed_events(hp, [r.src_port for r in results], 60)
    assert set(records.values()) == {1}, Counter(records.values())
    by_port = {e.get("src_port"): e.session for e in hp.events(SESSION_CONNECT)}
    durations = {e.session: e.get("duration_ms") for e in hp.events(SESSION_CLOSED)}
    longest_s = max(durations[by_port[r.src_port]] for r in results) / 1000
    print(f"[fuzz] slowloris: longest server-side hold {longest_s:.1f}s (login_grace_time_s={grace_s:g})")
    assert longest_s <= grace_s + 3, longest_s
    assert refusals > 0  # the flood did reach the cap
    assert grown < RSS_GROWTH_LIMIT, mib(grown)
    assert len(flood_lines) <= LOG_FLOOD_LIMIT, (
        f"{len(flood_lines)} diagnostic lines for {idle + drip} connections ({refusals} refusals); first lines:\n"
        + "\n".join(flood_lines[:5])
    )


# -- 4. huge and binary strings in every field ------------------------------------------------------------------------
class PortTracker(asyncssh.SSHClient):
    def __init__(self) -> None:
        self.port = 0

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        self.port = int(conn.get_extra_info("sockname")[1])


class RawUserauth(asyncssh.SSHClient):
    """When asked for a password, sends its own USERAUTH_REQUEST with arbitrary bytes as user and password."""

    def __init__(self, username: bytes, password: bytes) -> None:
        self._username = username
        self._password = password
        self._conn: asyncssh.SSHClientConnection | None = None
        self.port = 0

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        self._conn = conn
        self.port = int(conn.get_extra_info("sockname")[1])

    async def password_auth_requested(self) -> str | None:
        assert self._conn is not None
        self._conn.send_packet(
            MSG_USERAUTH_REQUEST,
            String(self._username),
            String(b"ssh-connection"),
            String(b"password"),
            Boolean(False),
            String(self._password),
        )
        await asyncio.sleep(1.0)
        return None


BINARY = b"\x00\xff\xfe\xc3\x28\x1b]0;t\x07\x9b2J"
HUGE_AUTH: list[tuple[str, str, str]] = [
    ("username 1000", "u" * 1000, "x"),
    ("username 1023 multibyte", "\u00e9" * 511, "x"),
    ("password 30000", "root", "p" * 30000),
    ("password multibyte 10000", "root", "\u2603" * 10000),
    ("username empty", "", "x"),
    ("password empty", "root", ""),
]
RAW_AUTH: list[tuple[str, bytes, bytes]] = [
    ("username invalid utf-8", b"r\xffo\xfeot", b"x"),
    ("password invalid utf-8", b"root", b"\xff\xfe\xc3\x28"),
    ("both binary", BINARY, BINARY),
    ("username 5000", b"u" * 5000, b"x"),
    ("username 30000", b"u" * 30000, b"x"),
    # asyncssh's client will not send these (SASLprep), an attacker's will.
    ("username nul", b"ro\0ot", b"hunter2"),
    ("password nul", b"root", b"hunter2\0"),
    ("password only nuls", b"root", b"\0" * 64),
    ("username c1 controls", "\x85\x9b\x9d".encode(), b"x"),
    ("username escapes", b"\x1b]0;owned\x07\x1b[2J", b"x"),
    ("password escapes", b"root", b"\x1b[31m\x1b]52;c;ZXZpbA==\x07"),
    ("password 30000 binary", b"root", os.urandom(30000)),
]


async def test_huge_and_binary_strings_in_every_field(honeypot: Honeypot, logtap: LogTap) -> None:
    hp = await honeypot(**OVERRIDES)
    port = hp.port
    base = rss()
    mark = len(logtap.records)
    ports: list[int] = []
    sent = 0
    async with Heartbeat(port).running() as beat:
        # Authentication strings through asyncssh (valid UTF-8, any content and size).
        for _name, username, password in HUGE_AUTH:
            tracker = PortTracker()
            with contextlib.suppress(asyncssh.Error, OSError, TimeoutError):
                async with asyncio.timeout(30):
                    conn = await asyncssh.connect(
                        "127.0.0.1",
                        port,
                        client_factory=lambda t=tracker: t,
                        **client_options(username=username, password=password),
                    )
                    conn.close()
            ports.append(tracker.port)
            sent += 1
        # ... and as raw bytes (invalid UTF-8, longer than sshd's limits).
        for _name, username_b, password_b in RAW_AUTH:
            client = RawUserauth(username_b, password_b)
            with contextlib.suppress(asyncssh.Error, OSError, TimeoutError):
                async with asyncio.timeout(30):
                    conn = await asyncssh.connect(
                        "127.0.0.1", port, client_factory=lambda c=client: c, **client_options(password=None)
                    )
                    conn.close()
            ports.append(client.port)
            sent += 1

        # Channel strings after a successful login: env, terminal type, exec command, subsystem, window sizes.
        channel_cases: list[tuple[str, dict[str, Any]]] = [
            ("env binary", {"env": {b"LC_\xff\x00": BINARY, b"LANG": b"\xc3\x28\0", b"\x1b[2J": b"x"}}),
            ("env huge", {"env": {b"LC_HUGE": b"v" * 30000, b"X" * 20000: b"y"}}),
            ("env flood", {"env": {f"LC_{i}".encode(): b"z" * 100 for i in range(300)}}),
            ("term binary", {"term_type": b"xterm\xff\x00\x1b[2J", "command": b"echo t"}),
            ("term huge", {"term_type": "x" * 20000, "command": "echo t"}),
            ("term escapes", {"term_type": "\x1b]0;t\x07", "command": "echo t"}),
            ("term size huge", {"term_type": "xterm", "term_size": (2**32 - 1, 2**32 - 1, 2**32 - 1, 2**32 - 1)}),
            ("term modes garbage", {"term_type": "xterm", "term_modes": {1: 2**32 - 1, 53: 0, 128: 0, 129: 2**32 - 1}}),
            ("exec nul", {"command": b"echo exec-\x00hidden"}),
            ("exec invalid utf-8", {"command": b"echo exec-\xff\xfe-binary"}),
            ("exec huge", {"command": b"echo " + b"h" * 30000}),
            ("exec escapes", {"command": b"printf '\\033]52;c;ZXZpbA==\\007'; echo \x1b[2Jexec-esc"}),
            ("subsystem binary", {"subsystem": b"sftp\x00\xff"}),
            ("subsystem huge", {"subsystem": b"s" * 20000}),
        ]
        outcomes: dict[str, str] = {}
        for name, kw in channel_cases:
            kw = dict(kw)
            command = kw.pop("command", None)
            subsystem = kw.pop("subsystem", None)
            kw.setdefault("term_type", None)
            try:
                async with asyncio.timeout(45):
                    async with asyncssh.connect("127.0.0.1", port, **client_options()) as conn:
                        ports.append(int(conn.get_extra_info("sockname")[1]))
                        if command is None and subsystem is None:
                            command = "echo ok"
                        chan, term = await conn.create_session(
                            Term, command=command, subsystem=subsystem, encoding=None, **kw
                        )
                        await chan.wait_closed()
                        outcomes[name] = f"ran, exit {term.exit_status}, {len(term.buf)} bytes"
            except (asyncssh.Error, OSError) as exc:
                outcomes[name] = f"refused: {type(exc).__name__}: {exc}"
            sent += 1
        alive_s = await exec_ok(port)
    beat.check(min_beats=5)
    grown = rss() - base
    print(
        f"\n[fuzz] huge/binary strings: {len(HUGE_AUTH)} auth via asyncssh, {len(RAW_AUTH)} raw userauth, "
        f"{len(channel_cases)} channel cases ({sent} cases); heartbeat {beat.beats} answers, "
        f"worst {beat.worst_s:.2f}s; new login after {alive_s:.1f}s; RSS growth {mib(grown)}"
    )
    for name, outcome in outcomes.items():
        print(f"[fuzz]   {name}: {outcome}")
    records = await wait_closed_events(hp, ports, 60)
    assert set(records.values()) == {1}, {p: n for p, n in records.items() if n != 1}
    await settle(hp)
    assert_json_log_is_clean(hp)
    # Every string an attacker chose is bounded in the record.
    for e in hp.events():
        for key, value in e.fields.items():
            if isinstance(value, str):
                limit = 70_000 if e.eventid in (COMMAND_INPUT, CHANNEL_EXEC) else 2_100
                assert len(value) <= limit, (e.eventid, key, len(value))
    # NULs and control characters reach the record escaped, never raw.
    for e in hp.events(LOGIN_FAILED):
        assert not no_raw_controls([e.get("username"), e.get("password")]), e
    assert len([e for e in hp.events(CLIENT_VAR)]) <= 64 * len(channel_cases)
    lines = logtap.lines(mark)
    assert len(lines) <= sent, "\n".join(lines[:40])
    assert not no_raw_controls(lines), no_raw_controls(lines)
    assert grown < RSS_GROWTH_LIMIT, mib(grown)


async def test_exec_of_a_non_utf8_command_is_run_and_recorded(honeypot: Honeypot) -> None:
    """sshd runs a command whatever its bytes; so does the honeypot (ssh/wire.py). The record keeps ``input`` a
    string (invalid bytes as \\xNN escapes), flags it ``utf8: false`` and keeps the exact bytes in ``input_b64``."""
    hp = await honeypot(**OVERRIDES)
    command = b"echo nonutf8-\xff\xfe-$((6*7))"
    async with asyncio.timeout(45):
        async with asyncssh.connect("127.0.0.1", hp.port, **client_options()) as conn:
            src_port = int(conn.get_extra_info("sockname")[1])
            chan, term = await conn.create_session(Term, command=command, encoding=None)
            await chan.wait_closed()
            plain = await conn.run("echo plain-$((6*7))", check=False)
    # It ran with its exact bytes (the box's listener carries bytes; only `docker exec`, the fallback, would
    # give the box U+FFFD for them), and the connection goes on as before.
    assert term.exit_status == 0, term.ending
    assert bytes(term.buf) == b"nonutf8-\xff\xfe-42\n", bytes(term.buf)
    assert plain.stdout == "plain-42\n", plain
    [connect] = await hp.wait_for(SESSION_CONNECT, src_port=src_port)
    await hp.wait_for(SESSION_CLOSED, session=connect.session)
    inputs = hp.events(COMMAND_INPUT, session=connect.session)
    execs = hp.events(CHANNEL_EXEC, session=connect.session)
    assert [e.get("input") for e in inputs] == ["echo nonutf8-\\xff\\xfe-$((6*7))", "echo plain-$((6*7))"]
    assert [e.get("input") for e in execs] == [e.get("input") for e in inputs]
    for e in (inputs[0], execs[0]):
        assert e.get("utf8") is False and base64.b64decode(e.get("input_b64")) == command, e.fields
    assert inputs[1].get("utf8") is None and inputs[1].get("input_b64") is None  # only where it is needed
    await settle(hp)
    assert_json_log_is_clean(hp)
    stored = await asyncio.to_thread(hp.services.repository.get_session, connect.session)
    assert stored is not None and [c.input for c in stored.commands][:1] == ["echo nonutf8-\\xff\\xfe-$((6*7))"]


# -- 5. terminal escape sequences in commands ----------------------------------------------------------------------
ESCAPES = [
    "\x1b]52;c;ZWNobyBwd25lZA==\x07",  # OSC 52: write the clipboard
    "\x1b]0;window-title\x07",  # set the title
    "\x1b[6n",  # ask the terminal for the cursor position (it answers on stdin)
    "\x1b[21t",  # report the window title
    "\x1bP+q544e\x1b\\",  # DCS: request termcap
    "\x1b[2J\x1b[H",  # clear the screen
    "\x1b[?1049h",  # alternate screen
    "\x9b31m",  # 8-bit CSI
    "\x1b]8;;http://example.invalid/\x07link\x1b]8;;\x07",  # hyperlink
    "\x1b[31m\x1b[5mred blink\x1b[0m",
]


def ansi_c(c: str) -> str:
    """One character for bash's ``$'...'`` quoting."""
    if c in "\\'":
        return "\\" + c
    return f"\\x{ord(c):02x}" if ord(c) < 32 or 0x7F <= ord(c) < 0xA0 else c


async def test_terminal_escape_sequences_in_commands_are_recorded_as_data(honeypot: Honeypot, logtap: LogTap) -> None:
    """Raw escape sequences typed at the prompt (readline takes them as key bindings, as on a real server),
    commands that print them, and exec commands that carry them: the session goes on, the keystrokes are kept
    byte for byte, the records stay valid JSON and the operator's log never shows them raw."""
    hp = await honeypot(**OVERRIDES)
    mark = len(logtap.records)
    conn, chan, term = await login_shell(hp.port)
    src_port = int(conn.get_extra_info("sockname")[1])
    typed = bytearray()
    sent = 0

    def type_(data: bytes) -> None:
        typed.extend(data)
        chan.write(data)

    try:
        pos = len(term.buf)
        for i, esc in enumerate(ESCAPES):
            type_(f"echo 'esc-{i}' '{esc}'\r".encode())
            await asyncio.sleep(0.2)
            # ^C: whatever state the sequence left readline in (it reads ESC as the start of a key binding, as on
            # any server), a fresh prompt; the blanks before the marker may still be eaten by a pending binding.
            type_(b"\x03")
            await asyncio.sleep(0.2)
            type_(f"   echo mark-{i}-$(({i}+1000))\r".encode())
            pos = await term.wait_for(f"mark-{i}-{i + 1000}\r\n".encode(), pos)
            # The same sequence printed by the box (ANSI-C quoting): output, not input.
            quoted = "".join(ansi_c(c) for c in esc)
            type_(f"printf '%s' $'{quoted}'; echo out-{i}-$(({i}+2000))\r".encode())
            pos = await term.wait_for(f"out-{i}-{i + 2000}\r\n".encode(), pos)
            sent += 2
        for i, esc in enumerate(ESCAPES):
            async with asyncio.timeout(45):
                async with asyncssh.connect("127.0.0.1", hp.port, **client_options()) as other:
                    result = await other.run(f"echo 'xesc-{i}' '{esc}'", encoding=None)
                    assert f"xesc-{i}".encode() in (result.stdout or b"")
            sent += 1
        type_(b"exit\r")
        async with asyncio.timeout(30):
            await chan.wait_closed()
    finally:
        conn.close()
    [connect] = await hp.wait_for(SESSION_CONNECT, src_port=src_port)
    await hp.wait_for(SESSION_CLOSED, session=connect.session)
    print(f"\n[fuzz] escape sequences: {sent} commands sent ({2 * len(ESCAPES)} typed, {len(ESCAPES)} exec)")
    lines = [e.get("input") for e in hp.events(COMMAND_INPUT, session=connect.session)]
    for i in range(len(ESCAPES)):
        assert any(f"echo mark-{i}-$(({i}+1000))" in line for line in lines), lines
    execs = {e.get("input") for e in hp.events(COMMAND_INPUT) if e.get("source") == "exec"}
    for i, esc in enumerate(ESCAPES):
        assert f"echo 'xesc-{i}' '{esc}'" in execs, (i, execs)
    await settle(hp)
    assert_json_log_is_clean(hp)
    [closed] = [e for e in hp.events("cowrie.log.closed", session=connect.session)]
    cast = hp.settings.data_dir / closed.get("ttylog")
    for n, line in enumerate(cast.read_text(encoding="utf-8").splitlines()):
        assert isinstance(json.loads(line), dict if n == 0 else list)
    assert cast.with_name(cast.name + ".input.raw").read_bytes() == bytes(typed)
    assert await exec_ok(hp.port) < 60
    log_lines = logtap.lines(mark)
    assert not no_raw_controls(log_lines), no_raw_controls(log_lines)


# -- 6. status after the battery ---------------------------------------------------------------------------------
async def test_status_and_metrics_answer_during_a_flood(honeypot: Honeypot) -> None:
    """While 200 connections sit idle, the API still answers (it shares the event loop with the SSH server)."""
    hp = await honeypot(**OVERRIDES)
    api_port = hp.services.api.port
    flood = [
        raw_case(hp.port, b"", read_banner=False, half_close=False, timeout_s=LOGIN_GRACE_S + 20) for _ in range(200)
    ]
    gathered = asyncio.gather(*flood)
    try:
        await asyncio.sleep(1.0)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", timeout=10) as client:
            status = await client.get("/api/v1/status")
            metrics = await client.get("/metrics")
        assert not gathered.done(), "the flood was over before the API was asked"
    finally:
        # The server's dropping of idle connections is the slowloris test's; here the clients hang up.
        gathered.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gathered
    assert status.status_code == 200, status.text
    assert metrics.status_code == 200
    assert "sandtrap_sessions_active" in metrics.text


# -- 7. post-quantum key exchange and KEXINIT floods -------------------------------------------------------------
SNTRUP_PUBLIC_BYTES = 1158
STRICT_KEXINIT = kexinit([b"curve25519-sha256,ext-info-c,kex-strict-c-v00@openssh.com", *kexinit_lists()[1:]])


def sntrup_init(client_pub: bytes, alg: bytes = b"sntrup761x25519-sha512@openssh.com") -> bytes:
    """Identification, a KEXINIT offering only ``alg`` (strict kex), and a KEX_ECDH_INIT carrying ``client_pub``."""
    lists = [alg + b",ext-info-c,kex-strict-c-v00@openssh.com", *kexinit_lists()[1:]]
    return IDENT + packet(kexinit(lists)) + packet(b"\x1e" + name_list(client_pub))


def x25519_public() -> bytes:
    return X25519PrivateKey.generate().public_key().public_bytes_raw()


def plain_messages(data: bytes) -> list[str]:
    """The server's cleartext after its identification line (``Raw.received``): message types (DISCONNECT with
    its reason), up to its NEWKEYS; what follows is encrypted."""
    out: list[str] = []
    pos = 0
    while pos + 5 <= len(data):
        length, padding = struct.unpack_from(">IB", data, pos)
        payload = data[pos + 5 : pos + 4 + length - padding]
        pos += 4 + length
        if not payload:
            break
        if payload[0] == 1:
            (n,) = struct.unpack_from(">I", payload, 5)
            out.append(f"DISCONNECT {payload[9 : 9 + n].decode(errors='replace')}")
        elif payload[0] == 3:
            out.append(f"UNIMPLEMENTED {struct.unpack_from('>I', payload, 1)[0]}")
        else:
            out.append(str(payload[0]))
        if payload[0] == 21:
            out.append("encrypted" if pos < len(data) else "")
            break
    return out


async def test_sntrup761_abuse_and_kexinit_floods_get_sshds_answer_a_record_and_no_crash(
    honeypot: Honeypot, logtap: LogTap, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What ssh/wire.py answers here is checked against the real sshd, case by case, in test_sshd_fingerprint.py;
    this test sends each many times, with the heartbeat running, and checks the record and the log."""
    # Fresh rate limits: earlier tests in this process may have used this minute's line of each kind.
    monkeypatch.setattr(ssh_server, "refusals", RateLimited(ssh_server.log))
    monkeypatch.setattr(ssh_wire, "refusals", RateLimited(ssh_wire.log))
    hp = await honeypot(**OVERRIDES)
    port = hp.port
    base = rss()
    mark = len(logtap.records)
    kexinit_only = ["20"]
    cases: list[tuple[str, bytes, list[str]]] = []
    for _ in range(5):
        cases += [
            ("truncated key", sntrup_init(os.urandom(SNTRUP_PUBLIC_BYTES - 1) + x25519_public()), kexinit_only),
            ("oversized key", sntrup_init(os.urandom(SNTRUP_PUBLIC_BYTES + 1) + x25519_public()), kexinit_only),
            ("huge key", sntrup_init(os.urandom(30000)), kexinit_only),
            ("empty key", sntrup_init(b""), kexinit_only),
            ("sntrup part only", sntrup_init(os.urandom(SNTRUP_PUBLIC_BYTES), b"sntrup761x25519-sha512"), kexinit_only),
            ("all-zero key", sntrup_init(bytes(SNTRUP_PUBLIC_BYTES + 32)), kexinit_only),
            # A key of the right size is any key (the specification decodes every byte string): the server
            # answers; the client cannot decapsulate, so its NEWKEYS and what follows are garbage to the server.
            (
                "garbage key, garbage ciphertext after",
                sntrup_init(os.urandom(SNTRUP_PUBLIC_BYTES) + x25519_public()) + packet(b"\x15") + os.urandom(4096),
                ["20", "31", "21", "encrypted"],
            ),
            (
                "strict KEXINIT flood",
                IDENT + packet(STRICT_KEXINIT) * 2000,
                ["20", "DISCONNECT strict KEX violation: unexpected packet type 20 (seqnr 1)"],
            ),
            (
                "KEXINIT flood",
                IDENT + packet(kexinit()) * 300,
                ["20", *(f"UNIMPLEMENTED {seq}" for seq in range(1, 300))],
            ),
        ]
    # No half-close: sshd answers everything sent before an EOF, asyncssh closes at once (see README).
    # The non-strict flood's connection stays open (as sshd's does) until the login grace time.
    async with Heartbeat(port).running() as beat:
        replies = await asyncio.gather(
            *(raw_case(port, data, half_close=False, timeout_s=LOGIN_GRACE_S + 10) for _, data, _ in cases)
        )
        alive_s = await exec_ok(port)
    results = [(name, reply, expected) for (name, _, expected), reply in zip(cases, replies, strict=True)]
    beat.check(min_beats=1)
    grown = rss() - base
    print(
        f"\n[fuzz] sntrup761 and KEXINIT floods: {len(results)} cases; heartbeat {beat.beats} answers, "
        f"worst {beat.worst_s:.2f}s; new login after {alive_s:.1f}s; RSS growth {mib(grown)}"
    )
    wrong = [(name, plain_messages(r.received)) for name, r, want in results if plain_messages(r.received) != want]
    assert not wrong, wrong
    assert all(r.closed_by_server for _, r, _ in results)
    records = await wait_closed_events(hp, [r.src_port for _, r, _ in results])
    assert set(records.values()) == {1}, records
    closed = {e.get("src_port"): e for e in hp.events(SESSION_CLOSED)}
    sessions = {e.get("src_port"): e.session for e in hp.events(SESSION_CONNECT)}
    reasons = {name: closed[r.src_port].get("reason") for name, r, _ in results if r.src_port in sessions}
    assert str(reasons["truncated key"]).startswith("error:"), reasons
    assert str(reasons["strict KEXINIT flood"]).startswith("error: strict KEX violation"), reasons
    lines = logtap.lines(mark)
    assert any("ended before login" in line for line in lines), lines
    assert any("refused as sshd refuses it: strict KEX violation" in line for line in lines), lines
    assert len(lines) <= len(results), "more than one log line per case:\n" + "\n".join(lines[:50])
    await settle(hp)
    assert_json_log_is_clean(hp)
    assert grown < RSS_GROWTH_LIMIT, mib(grown)
