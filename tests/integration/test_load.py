"""Load, on loopback, bounded in counts and time: 200 interactive sessions at once, each in its own sandbox and
each typing a command every second for a minute, while 100 more connections run a password brute force.

Pass: every session is recorded completely (its events in the JSON log, its cast with the output of every
command, its commands in the database), no session ends but by its own ``exit`` (no limit, no sandbox
refusal), the honeypot's memory comes back near its baseline once all have closed, and no sandbox is leaked:
the count of running containers returns to the pool size.

The honeypot runs as ``sandtrap run`` in a subprocess (its RSS is its own, not the clients'); the clients are
asyncssh connections in this process. Marked ``slow``: CI runs it, ``pytest -m 'not slow'`` skips it. Sizes can
be lowered for a quick local look with ``SANDTRAP_LOAD_SESSIONS``, ``SANDTRAP_LOAD_BRUTE`` and
``SANDTRAP_LOAD_SECONDS``. The figures (sessions held, attempts, latencies, RSS, containers) are printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import httpx
import psutil
import pytest

from sandtrap.events import (
    CHANNEL_SHELL,
    COMMAND_INPUT,
    LIMIT_HIT,
    LOG_CLOSED,
    LOG_OPEN,
    LOGIN_FAILED,
    LOGIN_SUCCESS,
    SANDBOX_ASSIGNED,
    SANDBOX_UNAVAILABLE,
    SESSION_CLOSED,
    SESSION_CONNECT,
    SESSION_FILE_CHANGED,
)
from sandtrap.sandbox.docker import engine, seccomp
from sandtrap.sandbox.docker.spec import LABEL_SENSOR
from sandtrap.storage.repository import Repository

from helpers import DATA_DIR, remove_sensor_containers
from sshclient import asyncssh_options, free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timing,
    pytest.mark.timeout(600),
]

SESSIONS = int(os.environ.get("SANDTRAP_LOAD_SESSIONS", "200"))
BRUTE = int(os.environ.get("SANDTRAP_LOAD_BRUTE", "100"))
SECONDS = int(os.environ.get("SANDTRAP_LOAD_SECONDS", "60"))
POOL_SIZE = 10
LOGIN_PARALLELISM = 12  # logins in flight at once while the sessions ramp up (each may create a container)
RAMP_BUDGET_S = 150.0
ANSWER_BUDGET_S = 30.0  # a command's output must arrive within this
MEMORY_SLACK = 64 * 2**20  # "near the baseline": within this, or within a quarter of what the load added
SANDTRAP = Path(sys.executable).parent / "sandtrap"


client_options = functools.partial(asyncssh_options, login_timeout=120)  # logins queue behind 200 at once


# -- the honeypot in a subprocess ------------------------------------------------------------------------------
@dataclass
class Process:
    proc: asyncio.subprocess.Process
    ssh_port: int
    api_port: int
    data_dir: Path
    log: Path

    @property
    def rss(self) -> int:
        return int(psutil.Process(self.proc.pid).memory_info().rss)


@contextlib.asynccontextmanager
async def sandtrap_run(tmp_path: Path, sensor: str, image: str) -> AsyncIterator[Process]:
    ssh_port, api_port = free_port(), free_port()
    data_dir = tmp_path / "data"
    config = {
        "sensor": sensor,
        "ssh": {"listen": f"127.0.0.1:{ssh_port}", "host_key_dir": str(tmp_path / "hostkeys")},
        "sandbox": {
            "affinity": "session",  # a box per session (source_ip, the default, gives 127.0.0.1 one box for all)
            "pool_size": POOL_SIZE,
            "pool_max": POOL_SIZE,  # a fixed pool: this test counts what a set number of warm boxes serves
            # Raised for the test: a box per session, the warm ones, and room for the refill.
            "max_sandboxes": SESSIONS + 2 * POOL_SIZE,
            # the profile the set-up made
            "docker": {"image": image, "seccomp_profile": str(seccomp.find(DATA_DIR))},
        },
        # Everything comes from 127.0.0.1 here: per-source and overall caps raised above what the test opens.
        "limits": {"max_sessions": 2 * (SESSIONS + BRUTE), "max_sessions_per_ip": 2 * (SESSIONS + BRUTE)},
        "storage": {"data_dir": str(data_dir)},
        "auth": {"credentials": [{"username": "root", "password": "hunter2"}], "accept_all_after": 0},
        "api": {"listen": f"127.0.0.1:{api_port}"},
    }
    path = tmp_path / "sandtrap.yaml"
    path.write_text(json.dumps(config))
    log = tmp_path / "sandtrap.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            str(SANDTRAP), "-c", str(path), "run", stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        async with asyncio.timeout(180):
            while "ssh listening on" not in log.read_text(errors="replace"):
                assert proc.returncode is None, f"sandtrap run exited {proc.returncode}:\n{log.read_text()[-3000:]}"
                await asyncio.sleep(0.2)
        yield Process(proc, ssh_port, api_port, data_dir, log)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(120):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def running_containers(sensor: str) -> int:
    async with engine.engine() as client:
        rows = await client.containers.list(filters={"label": [f"{LABEL_SENSOR}={sensor}"], "status": ["running"]})
    return len(rows)


async def status(api_port: int) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", timeout=30) as client:
        r = await client.get("/api/v1/status")
    r.raise_for_status()
    data: dict[str, Any] = r.json()
    return data


def jsonlog(data_dir: Path) -> list[dict[str, Any]]:
    lines = []
    for path in sorted((data_dir / "log").glob("sandtrap.json*")):
        lines += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return lines


# -- the interactive sessions ----------------------------------------------------------------------------------
class Term(asyncssh.SSHClientSession[bytes]):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.changed = asyncio.Event()
        self.closed = asyncio.Event()
        self.exit_status: int | None = None

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.buf += data
        self.changed.set()

    def exit_status_received(self, status: int) -> None:
        self.exit_status = status

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()
        self.changed.set()

    async def wait_for(self, marker: bytes, start: int, timeout_s: float) -> int:
        async with asyncio.timeout(timeout_s):
            while (idx := self.buf.find(marker, start)) < 0:
                if self.closed.is_set():
                    raise EOFError(f"closed before {marker!r}")
                self.changed.clear()
                await self.changed.wait()
        return idx + len(marker)


def command(i: int, k: int) -> tuple[str, bytes]:
    """Session ``i``'s ``k``-th command and the output line that proves it ran (the echo shows ``$((...))``)."""
    return f"echo L{i}-{k}-$(({k}*7))", f"L{i}-{k}-{k * 7}\r\n".encode()


@dataclass
class Attacker:
    index: int
    port: int = 0  # the client's port: the honeypot's src_port
    logged_in_s: float = 0.0
    answered: int = 0
    latencies: list[float] = field(default_factory=list)
    exit_status: int | None = None
    error: str = ""


async def interactive(a: Attacker, port: int, gate: asyncio.Semaphore, ready: asyncio.Event, go: asyncio.Event) -> None:
    conn: asyncssh.SSHClientConnection | None = None
    try:
        async with gate:
            start = time.monotonic()
            async with asyncio.timeout(120):
                conn = await asyncssh.connect("127.0.0.1", port, **client_options())
                a.port = int(conn.get_extra_info("sockname")[1])
                chan, term = await conn.create_session(Term, term_type="xterm", term_size=(100, 30), encoding=None)
                pos = await term.wait_for(b"# ", 0, 120)
            a.logged_in_s = time.monotonic() - start
        ready.set()
        await go.wait()
        t0 = time.monotonic() + (a.index % 10) / 10  # spread over the second
        for k in range(SECONDS):
            await asyncio.sleep(max(0.0, t0 + k - time.monotonic()))
            text, proof = command(a.index, k)
            sent = time.monotonic()
            chan.write(text.encode() + b"\r")
            pos = await term.wait_for(proof, pos, ANSWER_BUDGET_S)
            a.latencies.append(time.monotonic() - sent)
            a.answered += 1
        chan.write(b"exit\r")
        async with asyncio.timeout(60):
            await chan.wait_closed()
        a.exit_status = term.exit_status
    except Exception as exc:
        a.error = f"{type(exc).__name__}: {exc}"
        ready.set()
    finally:
        if conn is not None:
            conn.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(30):
                    await conn.wait_closed()


# -- the brute force -------------------------------------------------------------------------------------------
class Guesser(asyncssh.SSHClient):
    """Offers a fresh wrong password on each prompt until the server gives up on it (max_auth_tries)."""

    def __init__(self, worker: int, tried: list[str]) -> None:
        self._worker = worker
        self._tried = tried

    def password_auth_requested(self) -> str:
        password = f"bf-{self._worker}-{len(self._tried)}"
        self._tried.append(password)
        return password


@dataclass
class Brute:
    tried: list[str] = field(default_factory=list)
    connections: int = 0
    errors: Counter[str] = field(default_factory=Counter)


async def brute_force(worker: int, port: int, until: asyncio.Event, b: Brute) -> None:
    names = ["root", "admin", "ubuntu", "oracle", "test", "pi"]
    while not until.is_set():
        b.connections += 1
        try:
            async with asyncio.timeout(120):
                conn = await asyncssh.connect(
                    "127.0.0.1",
                    port,
                    client_factory=lambda: Guesser(worker, b.tried),
                    **client_options(username=names[b.connections % len(names)], password=None),
                )
            conn.close()
            b.errors["logged in?!"] += 1
        except asyncssh.PermissionDenied:
            pass  # the client ran out of passwords (not expected: it always has one more)
        except asyncssh.ProtocolError as exc:
            if "Too many authentication failures" not in exc.reason:  # sshd's MaxAuthTries, as expected
                b.errors[f"ProtocolError: {exc.reason}"] += 1
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            b.errors[type(exc).__name__] += 1


# -- the test -----------------------------------------------------------------------------------------------------
async def test_200_sessions_typing_for_a_minute_during_a_brute_force(
    built_image: str, sensor: str, tmp_path: Path
) -> None:
    attackers = [Attacker(i) for i in range(SESSIONS)]
    brutes = [Brute() for _ in range(BRUTE)]
    rss_samples: list[int] = []
    try:
        async with sandtrap_run(tmp_path, sensor, built_image) as hp:
            await asyncio.sleep(3)
            containers_before = await running_containers(sensor)
            rss_before = hp.rss

            async def sample() -> None:
                while True:
                    with contextlib.suppress(psutil.Error):
                        rss_samples.append(hp.rss)
                    await asyncio.sleep(1.0)

            sampler = asyncio.create_task(sample())
            gate = asyncio.Semaphore(LOGIN_PARALLELISM)
            go, done = asyncio.Event(), asyncio.Event()
            readies = [asyncio.Event() for _ in attackers]
            ramp_start = time.monotonic()
            sessions = [
                asyncio.create_task(interactive(a, hp.ssh_port, gate, r, go))
                for a, r in zip(attackers, readies, strict=False)
            ]
            while time.monotonic() - ramp_start < RAMP_BUDGET_S and not all(r.is_set() for r in readies):
                await asyncio.sleep(1.0)
                if int(time.monotonic() - ramp_start) % 15 == 0:
                    st = await status(hp.api_port)
                    print(
                        f"[load] ramp {time.monotonic() - ramp_start:.0f}s: {sum(r.is_set() for r in readies)} "
                        f"ready; pool {st['pool']}",
                        flush=True,
                    )
            ramp_s = time.monotonic() - ramp_start
            for a, r, task in zip(attackers, readies, sessions, strict=False):
                if not r.is_set():
                    task.cancel()
                    a.error = f"NoShell: no prompt within the ramp budget ({RAMP_BUDGET_S:.0f}s)"
            held = sum(1 for a in attackers if a.logged_in_s and not a.error)
            print(f"[load] ramp done after {ramp_s:.0f}s: {held} sessions held", flush=True)
            # The minute: every session types, the brute force runs.
            go.set()
            workers = [asyncio.create_task(brute_force(w, hp.ssh_port, done, brutes[w])) for w in range(BRUTE)]
            minute_start = time.monotonic()
            await asyncio.sleep(SECONDS / 2)
            peak_status = await status(hp.api_port)
            _, late = await asyncio.wait(sessions, timeout=SECONDS / 2 + ANSWER_BUDGET_S + 90)
            for task in late:
                task.cancel()
            done.set()
            minute_s = time.monotonic() - minute_start
            print(
                f"[load] minute done after {minute_s:.0f}s ({len(late)} sessions still running, cancelled)", flush=True
            )
            _, stuck = await asyncio.wait(workers, timeout=150)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*sessions, *workers, return_exceptions=True)
            for a, task in zip(attackers, sessions, strict=False):
                if task in late and not a.error:
                    a.error = f"Stuck: still running {minute_s:.0f}s after the minute began ({a.answered} answered)"

            # Everything closed: the records complete, the pool back to its size, memory settled.
            tried = [p for b in brutes for p in b.tried]
            connections = sum(b.connections for b in brutes)
            deadline = time.monotonic() + 90
            containers_after = await running_containers(sensor)
            while time.monotonic() < deadline:
                st = await status(hp.api_port)
                containers_after = await running_containers(sensor)
                closed = sum(1 for line in jsonlog(hp.data_dir) if line["eventid"] == SESSION_CLOSED)
                if (
                    closed >= SESSIONS + connections
                    and st["storage"]["pending"] == 0
                    and containers_after == POOL_SIZE
                    and st["pool"]["active"] == 0
                ):
                    break
                await asyncio.sleep(2)
            await asyncio.sleep(5)
            sampler.cancel()
            rss_after = hp.rss
            rss_peak = max([*rss_samples, rss_after])
            final_status = await status(hp.api_port)
            lines = jsonlog(hp.data_dir)
            repo = Repository(f"sqlite:///{hp.data_dir / 'sandtrap.db'}")
            try:
                details = {}
                for line in lines:
                    if line["eventid"] == SESSION_CONNECT and line["src_port"] in {a.port for a in attackers}:
                        details[line["session"]] = await asyncio.to_thread(repo.get_session, line["session"])
            finally:
                repo.close()
            honeypot_log = hp.log.read_text(errors="replace")
    finally:
        await remove_sensor_containers(sensor)

    # -- figures ------------------------------------------------------------------------------------------------
    latencies = sorted(x for a in attackers for x in a.latencies)
    answered = sum(a.answered for a in attackers)
    errors = Counter(a.error.split(":")[0] for a in attackers if a.error)
    brute_errors = sum((b.errors for b in brutes), Counter())

    def q(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else float("nan")

    print(
        f"\n[load] sessions held at once: {held}/{SESSIONS} (ramp {ramp_s:.0f}s, {LOGIN_PARALLELISM} logins in "
        f"flight, pool_size {POOL_SIZE}); commands answered {answered}/{SESSIONS * SECONDS} in {minute_s:.0f}s; "
        f"latency p50 {q(0.5):.2f}s p99 {q(0.99):.2f}s max {q(1.0):.2f}s; client errors {dict(errors)}"
    )
    print(
        f"[load] brute force: {BRUTE} connections at a time, {connections} connections, {len(tried)} password "
        f"attempts; client errors {dict(brute_errors)}"
    )
    mb = 2**20
    print(
        f"[load] honeypot RSS before {rss_before / mb:.0f} MiB, peak {rss_peak / mb:.0f} MiB, "
        f"after {rss_after / mb:.0f} MiB; running containers before {containers_before}, after {containers_after} "
        f"(pool_size {POOL_SIZE}); pool at the end {final_status['pool']}; storage {final_status['storage']}"
    )
    if latencies:
        print(
            f"[load] login to prompt: median {statistics.median(a.logged_in_s for a in attackers if a.logged_in_s):.1f}s"
        )
    print(f"[load] pool during the minute: {peak_status['pool']}")
    warnings = [line for line in honeypot_log.splitlines() if " WARNING " in line or " ERROR " in line]
    print(f"[load] honeypot log: {len(honeypot_log.splitlines())} lines, {len(warnings)} warnings/errors")
    for text, count in Counter(_gist(w) for w in warnings).most_common(8):
        print(f"[load]   {count} x {text}")

    # -- verdicts -----------------------------------------------------------------------------------------------
    assert held == SESSIONS, f"only {held} of {SESSIONS} sessions got a shell: {dict(errors)}"
    assert not errors, f"sessions that broke: {dict(errors)}; e.g. {next(a.error for a in attackers if a.error)}"
    assert answered == SESSIONS * SECONDS
    assert all(a.exit_status == 0 for a in attackers), Counter(a.exit_status for a in attackers)

    by_session: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for line in lines:
        by_session[line["session"]].append(line)
    ports = {line["src_port"]: line["session"] for line in lines if line["eventid"] == SESSION_CONNECT}
    incomplete = []
    for a in attackers:
        session = ports.get(a.port)
        if session is None:
            incomplete.append((a.index, "no connect event"))
            continue
        events = by_session[session]
        ids = Counter(e["eventid"] for e in events)
        # Every login changes files in its box (auth.log, wtmp, the honeytokens): their record is part of the session.
        wanted = {SESSION_CONNECT, LOGIN_SUCCESS, SANDBOX_ASSIGNED, CHANNEL_SHELL, LOG_OPEN, LOG_CLOSED, SESSION_CLOSED}
        wanted |= {SESSION_FILE_CHANGED}
        if missing := wanted - set(ids):
            incomplete.append((a.index, f"events missing: {sorted(missing)}"))
            continue
        [closed] = [e for e in events if e["eventid"] == SESSION_CLOSED]
        if closed["reason"] != "client_closed":
            incomplete.append((a.index, f"closed as {closed['reason']}"))
        typed = [e["input"] for e in events if e["eventid"] == COMMAND_INPUT]
        expected = [command(a.index, k)[0] for k in range(SECONDS)] + ["exit"]
        if typed != expected:
            incomplete.append(
                (a.index, f"{len(typed)} commands in the log, first difference at {_first_diff(typed, expected)}")
            )
        [log_closed] = [e for e in events if e["eventid"] == LOG_CLOSED]
        cast = (hp.data_dir / log_closed["ttylog"]).read_text(encoding="utf-8")
        outputs = "".join(json.loads(line)[2] for line in cast.splitlines()[1:] if json.loads(line)[1] == "o")
        lost = [k for k in range(SECONDS) if command(a.index, k)[1].decode() not in outputs]
        if lost:
            incomplete.append((a.index, f"cast lacks the output of {len(lost)} commands"))
        detail = details.get(session)
        if detail is None or [c.input for c in detail.commands] != expected:
            incomplete.append((a.index, f"database has {len(detail.commands) if detail else 'no'} commands"))
    assert not incomplete, f"{len(incomplete)} sessions recorded incompletely, e.g. {incomplete[:5]}"

    refused = [line for line in lines if line["eventid"] in (LIMIT_HIT, SANDBOX_UNAVAILABLE)]
    assert not refused, Counter((r["eventid"], r.get("limit") or r.get("reason", "")[:60]) for r in refused)
    failed = {line["password"] for line in lines if line["eventid"] == LOGIN_FAILED}
    assert set(tried) <= failed, f"{len(set(tried) - failed)} attempts not recorded"
    assert not brute_errors, dict(brute_errors)

    assert containers_after == POOL_SIZE, f"{containers_after} containers running, pool_size is {POOL_SIZE}"
    assert final_status["pool"]["active"] == 0, final_status["pool"]
    grown = rss_after - rss_before
    allowed = max(MEMORY_SLACK, (rss_peak - rss_before) // 4)
    assert grown <= allowed, (
        f"RSS {grown / mb:.0f} MiB above the baseline after all closed (allowed {allowed / mb:.0f})"
    )


def _gist(line: str) -> str:
    """A log line without its time and session, cut short: what kind of warning it is."""
    words = line.split(" ", 3)
    text = words[3] if len(words) > 3 else line
    if text.startswith("["):
        text = text.split("] ", 1)[-1]
    return " ".join(w if not any(c.isdigit() for c in w) or len(w) < 6 else "…" for w in text.split())[:150]


def _first_diff(a: list[str], b: list[str]) -> str:
    for n, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"#{n}: {x!r} != {y!r}"
    return f"#{min(len(a), len(b))} (lengths {len(a)} vs {len(b)})"
