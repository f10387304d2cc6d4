"""Load: an auth flood, bulk output, and many sessions held at once.

The server's CPU is read from the kernel (its process tree, reaped children included); the
harness's own CPU is recorded beside it to show when the client, not the server, was the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import psutil

from bench.client import Budget, Screen, ScreenSession, Terminal, connect, ends_with_prompt, flood_connection
from bench.systems.base import Server, cpu_seconds, engine_procs, host_used_bytes

Log = Callable[[str], None]
ME = psutil.Process()
PAYLOAD = b"Z"  # what the PTY transfer prints; the typed command never contains it
END_MARK = b"BENCH_END"


def client_cpu() -> float:
    t = ME.cpu_times()
    return float(t.user + t.system)


async def flood(server: Server, attempts: int, concurrency: int, per_connection: int) -> dict[str, Any]:
    """``concurrency`` workers, each connection trying ``per_connection`` wrong passwords."""
    budget = Budget(attempts)
    outcomes: Counter[str] = Counter()
    made = 0

    async def worker() -> None:
        nonlocal made
        while passwords := budget.reserve(per_connection):
            async with asyncio.timeout(120):
                tried, outcome = await flood_connection(server, passwords)
            made += tried
            outcomes[outcome] += 1

    cpu0, me0 = server.cpu_seconds(), client_cpu()
    t0 = time.perf_counter()
    async with asyncio.timeout(600):
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    me1 = client_cpu()
    await asyncio.sleep(1.0)  # sshd reaps its per-connection processes; queued event writes finish
    cpu = server.cpu_seconds() - cpu0
    return {
        "attempts": made,
        "wall_s": wall,
        "per_s": made / wall if wall else None,
        "server_cpu_s": cpu,
        "per_cpu_s": made / cpu if cpu > 0 else None,
        "client_cpu_s": me1 - me0,
        "outcomes": dict(outcomes),
    }


def printable(nbytes: int) -> str:
    """A shell command printing ``nbytes`` of ``Z`` (the typed command itself holds no ``Z``)."""
    return f"head -c {nbytes} /dev/zero | tr '\\000' '\\132'"


async def bulk_exec(server: Server, nbytes: int, binary: bool = False) -> dict[str, Any]:
    """The output of one exec channel (printable, or raw NULs from /dev/zero); rate from first to last byte."""
    command = f"head -c {nbytes} /dev/zero" if binary else printable(nbytes)
    conn = await connect(server)
    try:
        screen = Screen()
        cpu0, me0, eng0 = server.cpu_seconds(), client_cpu(), cpu_seconds(engine_procs())
        chan, _ = await conn.create_session(lambda: ScreenSession(screen), command, encoding=None)
        await screen.wait(lambda s, _: s.eof, 300)
        await chan.wait_closed()
        return _rate(server, screen.received, nbytes, screen.first_at, screen.last_at, cpu0, me0, eng0)
    finally:
        conn.close()


async def bulk_pty(term: Terminal, server: Server, nbytes: int) -> dict[str, Any]:
    """The same amount printed in the interactive shell (through the PTY), up to an end mark."""
    screen = term.screen
    await screen.quiet(0.2, 5)
    screen.tail = b""  # the previous transfer's end mark must not count
    mark = screen.received
    cpu0, me0, eng0 = server.cpu_seconds(), client_cpu(), cpu_seconds(engine_procs())
    term.send(f'{printable(nbytes)}; echo; echo BENCH_""END\r'.encode())
    first = await screen.wait(lambda s, chunk: PAYLOAD in chunk, 60)
    last = await screen.wait(lambda s, _: END_MARK in s.tail, 300)
    return _rate(server, screen.received - mark, nbytes, first, last, cpu0, me0, eng0)


def _rate(
    server: Server, got: int, nbytes: int, first: float | None, last: float, cpu0: float, me0: float, eng0: float
) -> dict[str, Any]:
    seconds = last - first if first is not None else 0.0
    server_cpu = server.cpu_seconds() - cpu0
    return {
        "bytes": got,
        "complete": got >= nbytes,
        "seconds": seconds,
        "mb_per_s": nbytes / seconds / 1e6 if seconds > 0 and got >= nbytes else None,
        "server_cpu_s": server_cpu,
        "client_cpu_s": client_cpu() - me0,
        "engine_cpu_s": cpu_seconds(engine_procs()) - eng0,
    }


async def memory(server: Server) -> dict[str, Any]:
    return {
        "rss": server.rss_bytes(),
        "pss": server.pss_bytes(),
        "host_used": host_used_bytes(),
        "session": await server.session_memory_bytes(),
    }


def slope(points: list[tuple[int, int | None]]) -> float | None:
    """Least-squares bytes per session."""
    pts = [(x, y) for x, y in points if y is not None]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / den if den else None


async def hold_sessions(
    server: Server, count: int, concurrency: int, checkpoints: int, idle_s: float, log: Log, budget_s: float = 300.0
) -> dict[str, Any]:
    """Open ``count`` interactive sessions (prompt seen), hold them idle, measure memory along the way.

    Bounded: the ramp stops when ``budget_s`` is spent or 16 opens in a row failed (the report says so)."""
    await server.settle()
    await asyncio.sleep(idle_s)
    points: list[tuple[int, dict[str, Any]]] = [(0, await memory(server))]
    terms: list[Terminal] = []
    errors: Counter[str] = Counter()
    sem = asyncio.Semaphore(concurrency)
    t0 = time.perf_counter()
    state: dict[str, Any] = {"failed_in_a_row": 0, "stopped": ""}

    async def one() -> None:
        async with sem:
            if state["stopped"]:
                return
            if time.perf_counter() - t0 > budget_s:
                state["stopped"] = f"ramp budget of {budget_s:.0f} s spent"
                return
            try:
                async with asyncio.timeout(90):
                    term = await Terminal.open(server)
                    try:
                        await term.screen.wait(ends_with_prompt, 60)
                    except BaseException:
                        await term.close()
                        raise
                terms.append(term)
                state["failed_in_a_row"] = 0
            except Exception as exc:
                errors[f"{type(exc).__name__}: {exc}"[:120]] += 1
                state["failed_in_a_row"] += 1
                if state["failed_in_a_row"] >= 16:
                    state["stopped"] = "16 opens in a row failed"

    try:
        for k in range(1, checkpoints + 1):
            target = count * k // checkpoints
            await asyncio.gather(*(one() for _ in range(target - len(terms) - sum(errors.values()))))
            await asyncio.sleep(idle_s)
            points.append((len(terms), await memory(server)))
            log(f"  {server.name}: {len(terms)} sessions held ({sum(errors.values())} failed)")
            if state["stopped"]:
                log(f"  {server.name}: ramp stopped: {state['stopped']}")
                break
        ramp_s = time.perf_counter() - t0
        alive = sum(1 for t in terms if not t.screen.eof)
    finally:
        close_sem = asyncio.Semaphore(32)

        async def close(t: Terminal) -> None:
            async with close_sem:
                await t.close()

        await asyncio.gather(*(close(t) for t in terms), return_exceptions=True)
    held = points[-1][0]
    base, full = points[0][1], points[-1][1]

    def per_session(key: str) -> dict[str, Any]:
        series = [(n, m[key]) for n, m in points]
        simple = (full[key] - base[key]) / held if held and full[key] is not None and base[key] is not None else None
        return {"slope": slope(series), "simple": simple, "series": series}

    return {
        "requested": count,
        "held": held,
        "alive_at_end": alive,
        "errors": dict(errors),
        "stopped_early": state["stopped"],
        "ramp_s": ramp_s,
        "rss": per_session("rss"),
        "pss": per_session("pss"),
        "host": per_session("host_used"),
        "session": per_session("session"),
    }


async def settle_quietly(server: Server) -> None:
    with contextlib.suppress(Exception):
        await server.settle(120.0)
