"""The benchmark's SSH client (asyncssh) and a screen that timestamps every chunk as it arrives.

Latencies are taken from the arrival stamp of the chunk that completed what we waited for, not from
when a waiting task happened to resume, so scheduling in the client adds as little as possible.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncssh

from bench.systems.base import HOST, Server

Predicate = Callable[["Screen", bytes], bool]
TAIL = 8192
COMMON_PASSWORDS = [
    "123456", "password", "admin", "12345678", "qwerty", "123456789", "12345", "1234", "111111", "1234567",
    "dragon", "123123", "abc123", "letmein", "monkey", "root", "toor", "test", "guest", "ubuntu",
]  # fmt: skip


class Screen:
    """Bytes from a terminal or a channel: counters, a bounded tail, stamped waits."""

    def __init__(self) -> None:
        self.received = 0
        self.tail = b""
        self.first_at: float | None = None
        self.last_at = 0.0
        self.eof = False
        self._waiters: list[tuple[Predicate, asyncio.Future[float]]] = []

    def feed(self, data: bytes) -> None:
        now = time.perf_counter()
        if self.first_at is None:
            self.first_at = now
        self.last_at = now
        self.received += len(data)
        self.tail = (self.tail + data)[-TAIL:]
        self._check(data, now)

    def feed_eof(self) -> None:
        self.eof = True
        self._check(b"", time.perf_counter())

    def _check(self, chunk: bytes, now: float) -> None:
        keep = []
        for pred, fut in self._waiters:
            if fut.done():
                continue
            if pred(self, chunk):
                fut.set_result(now)
            elif self.eof:
                fut.set_exception(EOFError("the other side closed"))
            else:
                keep.append((pred, fut))
        self._waiters = keep

    async def wait(self, pred: Predicate, timeout_s: float) -> float:
        """Arrival time (perf_counter) of the chunk that made ``pred`` true."""
        if pred(self, b""):
            return self.last_at
        if self.eof:
            raise EOFError("the other side closed")
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiters.append((pred, fut))
        async with asyncio.timeout(timeout_s):
            return await fut

    async def quiet(self, quiet_s: float, timeout_s: float) -> None:
        """Wait until nothing has arrived for ``quiet_s`` (bounded by ``timeout_s``)."""
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            idle = time.perf_counter() - self.last_at
            if idle >= quiet_s:
                return
            await asyncio.sleep(quiet_s - idle)


def ends_with_prompt(screen: Screen, _: bytes) -> bool:
    return screen.tail.rstrip(b" ").endswith((b"#", b"$")) and screen.tail.endswith(b" ")


def received_more(count: int) -> Predicate:
    return lambda screen, _: screen.received > count


class ScreenSession(asyncssh.SSHClientSession[bytes]):
    def __init__(self, screen: Screen) -> None:
        self.screen = screen
        self.exit_status: int | None = None

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.screen.feed(data)

    def eof_received(self) -> bool:
        self.screen.feed_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.screen.feed_eof()

    def exit_status_received(self, status: int) -> None:
        self.exit_status = status


# OpenSSH 9.2's client order (certificates left out): what most clients negotiate, Ed25519 first.
# (asyncssh's own default puts RSA first, which makes every server pay for an RSA signature.)
HOST_KEY_ALGS = [
    "ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "rsa-sha2-512", "rsa-sha2-256",
]  # fmt: skip


def options(**extra: Any) -> dict[str, Any]:
    """No user config, no keys, no agent, no host key check: a password login and nothing else."""
    return {
        "server_host_key_algs": HOST_KEY_ALGS,
        "known_hosts": None,
        "client_keys": None,
        "agent_path": None,
        "config": [],
        "preferred_auth": "password",
        "connect_timeout": 60,
        **extra,
    }


async def connect(server: Server, **extra: Any) -> asyncssh.SSHClientConnection:
    return await asyncssh.connect(
        HOST, server.port, username=server.username, password=server.password, **options(**extra)
    )


def algorithms(conn: asyncssh.SSHClientConnection) -> dict[str, str]:
    key = conn.get_server_host_key()
    return {
        "host_key": key.get_algorithm() if key is not None else "?",
        "cipher": str(conn.get_extra_info("send_cipher")),
        "mac": str(conn.get_extra_info("send_mac")),
        "server_version": str(conn.get_extra_info("server_version")),
    }


@dataclass
class Terminal:
    """An interactive PTY shell over SSH."""

    conn: asyncssh.SSHClientConnection
    chan: asyncssh.SSHClientChannel[bytes]
    screen: Screen
    connected_at: float = 0.0

    @classmethod
    async def open(cls, server: Server, cols: int = 80, rows: int = 24) -> Terminal:
        t0 = time.perf_counter()
        conn = await connect(server)
        screen = Screen()
        chan, _ = await conn.create_session(
            lambda: ScreenSession(screen), term_type="xterm", term_size=(cols, rows), encoding=None
        )
        return cls(conn, chan, screen, t0)

    def send(self, data: bytes) -> None:
        self.chan.write(data)

    async def close(self) -> None:
        self.conn.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10):
                await self.conn.wait_closed()


@dataclass
class Budget:
    """A flood's shared allowance of attempts, handed out to connections before they connect."""

    remaining: int
    issued: int = 0

    def reserve(self, most: int) -> list[str]:
        n = min(most, self.remaining)
        self.remaining -= n
        out = [COMMON_PASSWORDS[(self.issued + i) % len(COMMON_PASSWORDS)] for i in range(n)]
        self.issued += n
        return out


class FloodClient(asyncssh.SSHClient):
    """Tries its wrong passwords one after the other on one connection, then gives up."""

    def __init__(self, passwords: list[str]) -> None:
        self._passwords = list(passwords)
        self.tried = 0

    def password_auth_requested(self) -> str | None:
        if not self._passwords:
            return None
        self.tried += 1
        return self._passwords.pop(0)


async def flood_connection(server: Server, passwords: list[str]) -> tuple[int, str]:
    """One brute-force connection: (attempts made, outcome)."""
    client = FloodClient(passwords)
    try:
        conn = await asyncssh.connect(
            HOST, server.port, username=server.username, client_factory=lambda: client, **options()
        )
    except asyncssh.PermissionDenied:
        return client.tried, "denied"
    except (OSError, asyncssh.Error, TimeoutError) as exc:
        return client.tried, f"error: {type(exc).__name__}"
    conn.close()  # a wrong password got in: the flood's passwords must all fail
    return client.tried, "accepted"
