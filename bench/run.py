"""One benchmark run: start the three systems side by side, measure each part in rotation, clean up."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import machine, timeline
from bench.measures import kex, latency, load
from bench.profiles import PySpy, pyinstrument_render, pyinstrument_wrap
from bench.stats import summary
from bench.systems import cowrie, openssh
from bench.systems import sandtrap as sandtrap_system
from bench.systems.base import Server
from bench.systems.floor import Floor, PtyTerminal, cold_creations, create_floor


@dataclass(frozen=True)
class Plan:
    auth_attempts: int = 200  # per system, split over the rounds
    auth_rounds: int = 2
    concurrency: int = 8
    per_connection: int = 3  # wrong passwords tried per connection
    kex_attempts: int = 600  # per system and kex algorithm, OpenSSH's client (bench/measures/kex.py)
    kex_samples: int = 20  # connect -> logged in, per system and kex algorithm
    latency_samples: int = 50  # connect-to-prompt and exec samples per system
    keystrokes: int = 200
    bulk_bytes: int = 20_000_000
    bulk_repeats: int = 3
    sessions_sandtrap: int = 200
    sessions_other: int = 50
    session_checkpoints: int = 4
    session_idle_s: float = 3.0
    cold_creations: int = 10
    pool_size: int = 20
    max_sandboxes: int = 220


QUICK = Plan(
    auth_attempts=24, auth_rounds=1, kex_attempts=60, kex_samples=4, latency_samples=4, keystrokes=20, bulk_bytes=2_000_000, bulk_repeats=1,
    sessions_sandtrap=8, sessions_other=4, session_checkpoints=2, session_idle_s=1.0, cold_creations=2,
    pool_size=4, max_sandboxes=30,
)  # fmt: skip

_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[bench {time.monotonic() - _T0:6.1f}s] {msg}", flush=True)


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Phases:
    """Each phase's duration and the machine's load around it; optionally a py-spy profile of sandtrap."""

    def __init__(self, spy: PySpy | None) -> None:
        self._spy = spy
        self.files: dict[str, str] = {}
        self.timeline: list[dict[str, Any]] = []

    @contextlib.asynccontextmanager
    async def __call__(self, name: str) -> AsyncIterator[None]:
        log(f"phase: {name} (load average {machine.load_1m()})")
        row = {"phase": name, "load_1m_start": machine.load_1m()}
        t0 = time.monotonic()
        try:
            if self._spy is None:
                yield
            else:
                async with self._spy.phase(name) as path:
                    yield
                self.files[name] = str(path)
        finally:
            row.update(seconds=round(time.monotonic() - t0, 1), load_1m_end=machine.load_1m())
            self.timeline.append(row)


async def wait_for_quiet(max_wait_s: float) -> float:
    """Give a busy machine (other jobs) up to ``max_wait_s`` to calm down below one runnable task per core."""
    limit = float(os.cpu_count() or 1)
    deadline = time.monotonic() + max_wait_s
    while machine.load_1m() > limit and time.monotonic() < deadline:
        log(f"waiting for a quieter machine: load average {machine.load_1m()} > {limit:.0f}")
        await asyncio.sleep(15)
    return machine.load_1m()


async def run(plan: Plan, work: Path, profile: str | None, max_wait_quiet_s: float = 120.0) -> dict[str, Any]:
    password = secrets.token_urlsafe(12)
    await wait_for_quiet(max_wait_quiet_s)
    await asyncio.to_thread(_fresh, work)
    results: dict[str, Any] = {"plan": asdict(plan), "machine": machine.facts(), "systems": {}, "raw": {}}
    raw = results["raw"]
    sandtrap_system.require_installed()
    servers: list[Server] = []
    floor: Floor | None = None
    st: sandtrap_system.SandtrapServer | None = None
    try:
        log("starting sandtrap (warming its pool), OpenSSH and Cowrie on 127.0.0.1")
        wrap = (
            pyinstrument_wrap(work / "profiles" / "sandtrap.pyinstrument.html") if profile == "pyinstrument" else None
        )
        st = await sandtrap_system.start(work / "sandtrap", password, plan.pool_size, plan.max_sandboxes, wrap)
        servers.append(st)
        servers.append(await openssh.start(work / "openssh", password))
        servers.append(await cowrie.start(work / "cowrie", password))
        for s in servers:
            results["systems"][s.name] = {
                "label": s.label, "version": s.version, "listening": s.listening, "notes": s.notes, "pid": s.pid,
            }  # fmt: skip
            log(f"  {s.version}: 127.0.0.1:{s.port}, listening on {s.listening}")
        floor = await create_floor(st.sensor)
        phases = Phases(PySpy(st.pid, work / "profiles") if profile == "py-spy" else None)
        by_name = {s.name: s for s in servers}

        async with phases("warm-up"):
            await latency.warm_up(servers)
            results["systems"]["algorithms"] = await _algorithms(servers)

        async with phases("cold-creation"):
            await st.settle(60)
            raw["cold"] = await cold_creations(st.sensor, plan.cold_creations)

        async with phases("auth-flood"):
            raw["flood"] = {s.name: [] for s in servers}
            per_round = plan.auth_attempts // plan.auth_rounds
            for r in range(plan.auth_rounds):
                for s in latency.rotated(servers, r):
                    row = await load.flood(s, per_round, plan.concurrency, plan.per_connection)
                    raw["flood"][s.name].append(row)
                    log(
                        f"  {s.name}: {row['attempts']} attempts in {row['wall_s']:.1f}s, server CPU {row['server_cpu_s']:.2f}s"
                    )
                    await st.settle(60)

        async with phases("kex"):  # OpenSSH's default kex (sntrup761) next to curve25519, its own client
            raw["kex"] = {}
            for s in (st, by_name["openssh"]):
                rows = await kex.compare(s, plan.kex_attempts, plan.concurrency, plan.per_connection, plan.kex_samples)
                raw["kex"][s.name] = rows
                log(
                    f"  {s.name}: attempts per server CPU-second "
                    + ", ".join(f"{k} {rows[k]['per_cpu_s'] or 0:.0f}" for k in kex.KEX_COMPARED)
                    + "; connect -> logged in p50 "
                    + ", ".join(f"{k} {rows[k]['auth_ms_p50'] or 0:.0f} ms" for k in kex.KEX_COMPARED)
                )
                await st.settle(60)

        async with phases("latency"):
            window = [now_iso()]
            values, health = await latency.sampled(servers, plan.latency_samples, log)
            window.append(now_iso())
            raw["latency"], raw["latency_health"], raw["latency_window"] = values, health, window

        terms: dict[str, Any] = {s.name: await latency.open_terminal(s) for s in servers}
        terms["floor"] = await PtyTerminal.open(floor.sandbox.id)
        try:
            async with phases("keystroke-echo"):
                raw["echo"] = await latency.keystroke_echo(terms, plan.keystrokes, log)
            async with phases("bulk"):
                raw["bulk"] = await _bulk(plan, servers, terms)
        finally:
            for term in terms.values():
                await term.close()

        async with phases("sessions"):
            raw["sessions"] = {}
            for s in (by_name["openssh"], by_name["cowrie"], st):
                n = plan.sessions_sandtrap if s is st else plan.sessions_other
                raw["sessions"][s.name] = await load.hold_sessions(
                    s, n, plan.concurrency, plan.session_checkpoints, plan.session_idle_s, log
                )
            sessions_window = [raw["latency_window"][1], now_iso()]

        await st.settle(60)
        results["systems"]["sandtrap"]["health"] = st.health()
        everything = st.events()
        raw["stages_latency"] = timeline.stages(everything, *raw["latency_window"])
        raw["stages_sessions"] = timeline.stages(everything, *sessions_window)
        assigned = [e for e in everything if e.get("eventid") == "sandtrap.sandbox.assigned"]
        raw["acquire_warm_ms"] = _acquire(assigned, *raw["latency_window"])
        raw["acquire_sessions_ms"] = _acquire(assigned, *sessions_window)
        results["profiles"] = phases.files
        results["timeline"] = phases.timeline
    finally:
        log("stopping the systems and removing this run's containers")
        if floor is not None:
            with contextlib.suppress(Exception):
                await floor.backend.close()
        for s in servers:
            with contextlib.suppress(Exception):
                await s.stop()
        if st is not None:
            removed = await sandtrap_system.remove_sensor_containers(st.sensor)
            log(f"  removed {removed} containers labelled sandtrap.sensor={st.sensor}")
            # The casts of 20 MB transfers are hundreds of MB; logs and events stay for inspection.
            for bulky in ("casts", "artifacts"):
                await asyncio.to_thread(shutil.rmtree, st.data_dir / bulky, True)
        openssh.lock_user()
        if profile == "pyinstrument":
            rendered = await asyncio.to_thread(pyinstrument_render, work / "profiles" / "sandtrap.pyisession")
            log(f"  pyinstrument: {', '.join(str(p) for p in rendered)}")
    return results


def _fresh(work: Path) -> None:
    if work.exists():
        shutil.rmtree(work)
    (work / "profiles").mkdir(parents=True)


async def _algorithms(servers: list[Server]) -> dict[str, dict[str, str]]:
    from bench.client import algorithms, connect

    out = {}
    for s in servers:
        conn = await connect(s)
        out[s.name] = algorithms(conn)
        conn.close()
        await s.settle()
    return out


async def _bulk(plan: Plan, servers: list[Server], terms: dict[str, Any]) -> dict[str, Any]:
    """PTY and exec transfers of ``bulk_bytes``; a system whose shell cannot produce them is n/a.

    Each system keeps its interactive terminal open meanwhile (``active=1`` when settling)."""
    out: dict[str, Any] = {"pty": {}, "exec": {}, "exec_binary": {}, "skipped": {}}
    able = []
    for s in servers:
        reason = await _bulk_probe(s)
        if reason:
            out["skipped"][s.name] = reason
            log(f"  {s.name}: no bulk output ({reason})")
        else:
            able.append(s)
    for rep in range(plan.bulk_repeats):
        for s in latency.rotated(able, rep):
            row = await load.bulk_pty(terms[s.name], s, plan.bulk_bytes)
            out["pty"].setdefault(s.name, []).append(row)
            log(f"  {s.name} PTY: {row['mb_per_s'] or 0:.1f} MB/s")
        for mode in ("exec", "exec_binary"):
            for s in latency.rotated(able, rep):
                await s.settle(active=1)
                row = await load.bulk_exec(s, plan.bulk_bytes, binary=mode == "exec_binary")
                out[mode].setdefault(s.name, []).append(row)
                log(f"  {s.name} {mode}: {row['mb_per_s'] or 0:.1f} MB/s")
    return out


async def _bulk_probe(server: Server) -> str:
    """Can the shell print 100 kB on demand? (Cowrie's emulated shell cannot.)"""
    try:
        async with asyncio.timeout(20):
            row = await load.bulk_exec(server, 100_000)
    except Exception as exc:
        return f"`{load.printable(100_000)}` failed ({type(exc).__name__})"
    finally:
        await server.settle(active=1)
    if not row["complete"]:
        return f"`{load.printable(100_000)}` printed {row['bytes']} bytes"
    return ""


def _acquire(events: list[dict[str, Any]], start: str, end: str) -> list[float]:
    return [float(e["acquire_ms"]) for e in events if start <= e.get("timestamp", "") <= end and "acquire_ms" in e]


def metrics(results: dict[str, Any]) -> dict[str, Any]:
    """The summaries the table and the plot show, from the raw samples."""
    raw = results["raw"]
    m: dict[str, Any] = {}
    flood = {}
    for name, rounds in raw["flood"].items():
        attempts = sum(r["attempts"] for r in rounds)
        wall = sum(r["wall_s"] for r in rounds)
        cpu = sum(r["server_cpu_s"] for r in rounds)
        flood[name] = {
            "per_s": attempts / wall if wall else None,
            "per_cpu_s": attempts / cpu if cpu else None,
            "rounds_per_s": [r["per_s"] for r in rounds],
            "rounds_per_cpu_s": [r["per_cpu_s"] for r in rounds],
            "attempts": attempts,
            "outcomes": [r["outcomes"] for r in rounds],
            "client_cpu_share": sum(r["client_cpu_s"] for r in rounds) / wall if wall else None,
        }
    m["flood"] = flood
    for key in ("auth_ms", "first_output_ms", "prompt_ms", "exec_ms"):
        m[key] = {name: summary(v.get(key, []), "ms") for name, v in raw["latency"].items()}
    m["echo_ms"] = {name: summary(v, "ms") for name, v in raw["echo"]["samples"].items()}
    for mode in ("pty", "exec", "exec_binary"):
        rows = {}
        for name, runs in raw["bulk"][mode].items():
            rates = [r["mb_per_s"] for r in runs if r["mb_per_s"]]
            rows[name] = {
                "median": statistics.median(rates) if rates else None,
                "min": min(rates) if rates else None,
                "max": max(rates) if rates else None,
                "runs": rates,
                "client_cpu_share": _share(runs, "client_cpu_s"),
                "server_cpu_share": _share(runs, "server_cpu_s"),
                "engine_cpu_share": _share(runs, "engine_cpu_s"),
            }
        m[f"bulk_{mode}"] = rows
    m["sessions"] = raw["sessions"]
    m["acquire_warm_ms"] = summary(raw["acquire_warm_ms"], "ms")
    m["acquire_sessions_ms"] = summary(raw["acquire_sessions_ms"], "ms")
    m["cold_create_ms"] = summary([c["create_start_ms"] for c in raw["cold"]], "ms")
    m["cold_ready_ms"] = summary([c["ready_ms"] for c in raw["cold"]], "ms")
    return m


def _share(runs: list[dict[str, Any]], key: str) -> float | None:
    secs = sum(r["seconds"] for r in runs)
    return sum(r[key] for r in runs) / secs if secs else None
