"""What the key exchange costs an auth: OpenSSH's own client with its default kex (sntrup761x25519-sha512, a
post-quantum hybrid) next to curve25519-sha256.

asyncssh's client (the rest of the bench) has no sntrup761, so both figures here come from ``ssh`` itself,
with the same options apart from ``KexAlgorithms``:

* auth attempts per server CPU-second: ``concurrency`` clients, each connection trying ``per_connection``
  wrong passwords (``SSH_ASKPASS``, ``NumberOfPasswordPrompts``); the server's CPU from the kernel;
* connect → logged in: from starting ``ssh -v -N`` to its "Authenticated to" line, with the right password.

The client's own process start is inside the second figure, the same for both algorithms.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bench.systems.base import Server

KEX_COMPARED = ("sntrup761x25519-sha512", "curve25519-sha256")  # OpenSSH 9.2's default first
HOST = "127.0.0.1"


@contextlib.contextmanager
def askpass(password: str) -> Any:
    """An SSH_ASKPASS program that answers every password prompt with ``password``."""
    with tempfile.TemporaryDirectory(prefix="bench-askpass-") as d:
        path = Path(d) / "askpass"
        path.write_text(f"#!/bin/sh\nprintf '%s\\n' '{password}'\n", encoding="utf-8")
        path.chmod(0o700)
        yield path


def ssh_argv(server: Server, kex: str, prompts: int, *extra: str, command: str | None = None) -> list[str]:
    argv = [
        *("ssh", "-F", "/dev/null", "-p", str(server.port), "-o", f"KexAlgorithms={kex}"),
        *("-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "PubkeyAuthentication=no"),
        *("-o", "PreferredAuthentications=password", "-o", f"NumberOfPasswordPrompts={prompts}"),
        *("-o", "IdentityAgent=none", "-o", "ConnectTimeout=60", *extra, f"{server.username}@{HOST}"),
    ]
    return argv if command is None else [*argv, command]


def _env(program: Path) -> dict[str, str]:
    return {**os.environ, "SSH_ASKPASS": str(program), "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0"}


@contextlib.asynccontextmanager
async def _ssh(argv: list[str], env: dict[str, str]) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env=env, start_new_session=True,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()


async def flood(server: Server, kex: str, attempts: int, concurrency: int, per_connection: int) -> dict[str, Any]:
    """Wrong passwords, ``per_connection`` on each connection, ``concurrency`` connections at a time."""
    connections = max(1, attempts // per_connection)
    queue = list(range(connections))
    failures = 0
    with askpass("not-the-password-" + os.urandom(4).hex()) as program:
        env = _env(program)

        async def worker() -> None:
            nonlocal failures
            while queue:
                queue.pop()
                async with _ssh(ssh_argv(server, kex, per_connection, command="true"), env) as proc:
                    async with asyncio.timeout(120):
                        _, err = await proc.communicate()
                if b"Permission denied" not in err:
                    failures += 1

        cpu0 = server.cpu_seconds()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        await asyncio.sleep(1.0)  # sshd reaps its per-connection processes
        cpu = server.cpu_seconds() - cpu0
    made = connections * per_connection
    return {
        "kex": kex,
        "attempts": made,
        "wall_s": wall,
        "server_cpu_s": cpu,
        "per_cpu_s": made / cpu if cpu > 0 else None,
        "not_denied": failures,
    }


async def auth_ms(server: Server, kex: str, samples: int) -> list[float]:
    """connect → logged in, one connection at a time: ``ssh -v -N`` until it says it is authenticated."""
    out: list[float] = []
    with askpass(server.password) as program:
        env = _env(program)
        for _ in range(samples):
            t0 = time.perf_counter()
            async with _ssh(ssh_argv(server, kex, 1, "-v", "-N"), env) as proc:
                assert proc.stderr is not None
                async with asyncio.timeout(60):
                    while line := await proc.stderr.readline():
                        if line.startswith(b"Authenticated to"):
                            out.append((time.perf_counter() - t0) * 1000)
                            break
                    else:
                        raise RuntimeError(f"{server.name} with {kex}: no login")
    return out


async def compare(server: Server, attempts: int, concurrency: int, per_connection: int, samples: int) -> dict[str, Any]:
    """Both algorithms on one server, alternating (sntrup761 first, then curve25519, twice)."""
    rows: dict[str, Any] = {kex: {"flood": [], "auth_ms": []} for kex in KEX_COMPARED}
    for _round in range(2):
        for kex in KEX_COMPARED:
            rows[kex]["flood"].append(await flood(server, kex, attempts // 2, concurrency, per_connection))
            rows[kex]["auth_ms"] += await auth_ms(server, kex, max(1, samples // 2))
    for row in rows.values():
        attempts_made = sum(r["attempts"] for r in row["flood"])
        cpu = sum(r["server_cpu_s"] for r in row["flood"])
        row["per_cpu_s"] = attempts_made / cpu if cpu > 0 else None
        row["auth_ms_p50"] = statistics.median(row["auth_ms"]) if row["auth_ms"] else None
    default, classic = (rows[k]["per_cpu_s"] for k in KEX_COMPARED)
    rows["default_over_curve25519"] = default / classic if default and classic else None
    return rows
