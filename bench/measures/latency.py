"""Latencies, sampled in rotation across the systems so the machine's noise falls on all of them alike.

* connect-to-prompt: TCP connect, key exchange, password login, PTY shell, until the first shell output
  (and, reported beside it, until the prompt itself is on screen);
* exec round trip: ``ssh host 'uname -a'`` from TCP connect to the exit status;
* keystroke echo: one key typed into an idle interactive shell until its echo arrives.

After every sandtrap sample the harness waits until its pool is refilled and the used box released,
so the next sample (of any system) does not pay for sandtrap's background work.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from bench.client import Screen, ScreenSession, Terminal, connect, ends_with_prompt, received_more
from bench.systems.base import Server

Log = Callable[[str], None]


class Typable(Protocol):
    screen: Screen

    def send(self, data: bytes) -> None: ...


def rotated(items: Sequence[Any], i: int) -> list[Any]:
    k = i % len(items) if items else 0
    return [*items[k:], *items[:k]]


async def connect_to_prompt(server: Server) -> dict[str, float]:
    t0 = time.perf_counter()
    conn = await connect(server)
    t_auth = time.perf_counter()
    try:
        screen = Screen()
        await conn.create_session(lambda: ScreenSession(screen), term_type="xterm", term_size=(80, 24), encoding=None)
        first = await screen.wait(received_more(0), 30)
        prompt = await screen.wait(ends_with_prompt, 30)
    finally:
        conn.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10):
                await conn.wait_closed()
    return {
        "auth_ms": (t_auth - t0) * 1000,
        "first_output_ms": (first - t0) * 1000,
        "prompt_ms": (prompt - t0) * 1000,
    }


async def exec_round_trip(server: Server) -> dict[str, float]:
    t0 = time.perf_counter()
    conn = await connect(server)
    try:
        result = await conn.run("uname -a", check=False)
        t1 = time.perf_counter()
    finally:
        conn.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10):
                await conn.wait_closed()
    out = str(result.stdout or "")
    if result.exit_status != 0 or not out.startswith("Linux"):
        raise RuntimeError(f"uname -a: exit {result.exit_status}, output {out[:80]!r}")
    return {"exec_ms": (t1 - t0) * 1000}


async def warm_up(servers: Sequence[Server], count: int = 2) -> None:
    """A few unmeasured logins so lazily loaded code and caches are in place on every system."""
    for _ in range(count):
        for server in servers:
            await connect_to_prompt(server)
            await server.settle()
            await exec_round_trip(server)
            await server.settle()


async def sampled(
    servers: Sequence[Server], samples: int, log: Log
) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, Any]]]:
    """``samples`` rounds; each round one connect-to-prompt and one exec sample per system."""
    values: dict[str, dict[str, list[float]]] = {s.name: {} for s in servers}
    health: dict[str, dict[str, Any]] = {s.name: {"errors": [], "settle_timeouts": 0} for s in servers}
    kinds: list[Callable[[Server], Awaitable[dict[str, float]]]] = [connect_to_prompt, exec_round_trip]
    for i in range(samples):
        for measure in kinds:
            for server in rotated(servers, i):
                try:
                    async with asyncio.timeout(90):
                        row = await measure(server)
                    for key, value in row.items():
                        values[server.name].setdefault(key, []).append(value)
                except Exception as exc:
                    health[server.name]["errors"].append(f"{measure.__name__}: {type(exc).__name__}: {exc}"[:200])
                if not await server.settle():
                    health[server.name]["settle_timeouts"] += 1
        if (i + 1) % 10 == 0 or i + 1 == samples:
            log(f"  latency round {i + 1}/{samples}")
    return values, health


async def keystroke_echo(terms: dict[str, Typable], keystrokes: int, log: Log) -> dict[str, Any]:
    """Type ``x`` and wait for its echo, then erase it (DEL, not measured); rotate over the terminals."""
    for name, term in terms.items():
        try:
            await term.screen.wait(ends_with_prompt, 30)
        except TimeoutError:
            log(f"  {name}: no prompt seen before typing; typing anyway")
        await term.screen.quiet(0.3, 5)
    samples: dict[str, list[float]] = {name: [] for name in terms}
    wrong_echo: dict[str, int] = dict.fromkeys(terms, 0)
    names = list(terms)
    for i in range(keystrokes):
        for name in rotated(names, i):
            term = terms[name]
            mark = term.screen.received
            t0 = time.perf_counter()
            term.send(b"x")
            t1 = await term.screen.wait(received_more(mark), 10)
            samples[name].append((t1 - t0) * 1000)
            await term.screen.quiet(0.004, 2)
            if b"x" not in term.screen.tail[-max(1, term.screen.received - mark) :]:
                wrong_echo[name] += 1
            mark = term.screen.received
            term.send(b"\x7f")
            await term.screen.wait(received_more(mark), 10)
            await term.screen.quiet(0.004, 2)
        if (i + 1) % 50 == 0:
            log(f"  keystrokes {i + 1}/{keystrokes}")
    return {"samples": samples, "wrong_echo": wrong_echo}


async def open_terminal(server: Server) -> Terminal:
    async with asyncio.timeout(90):
        return await Terminal.open(server)
