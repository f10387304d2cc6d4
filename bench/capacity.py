"""Capacity bench (issue 19): the pool against arrival rates, and a burst of logins against a single warm one.

    python -m bench.capacity [--quick] [--image TAG]

Runs a honeypot in this process on 127.0.0.1 with the defaults (pool_size 16, pool_max 20, pool_refill_parallel 4,
max_sandboxes 50), except: affinity ``session`` (every login comes from 127.0.0.1: with the default ``source_ip``
they would all share one box and the pool would not be measured), the image `make setup` built, a unique sensor
name, session limits per IP raised, no auth delays. Its containers are removed at the end.

* single warm login: login -> prompt (asyncssh: connect, password, PTY shell, the prompt on screen) with the pool
  full, one at a time (the pool refilled between);
* 20 back-to-back logins: each starts when the previous one has its prompt, all held open until the last;
  login -> prompt p50 against the single warm login's p50, in the same run;
* arrivals at 1, 2 and 5 logins a second for a while, each session held 2 s: ``acquire_ms`` (the honeypot's own,
  from ``sandtrap.sandbox.assigned``) p50/p95, boxes made on demand, and the warm-up time the pool saw.
  The sustained rate served warm is the highest of those whose p95 acquire stays under 300 ms; Docker's own
  create+start rate (pool_refill_parallel / warm-up time) is what bounds it.

Writes bench/results/capacity.md and capacity.json (--quick: bench/.work/quick/).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncssh

from bench.client import Screen, ScreenSession, ends_with_prompt, options
from sandtrap.app import running
from sandtrap.config import load_settings
from sandtrap.events import SANDBOX_ASSIGNED, CaptureSink
from sandtrap.sandbox.docker import seccomp

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = secrets.token_hex(8)


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    ys = sorted(xs)
    return ys[min(len(ys) - 1, round(p / 100 * (len(ys) - 1)))]


async def login(port: int, hold_s: float = 0.0) -> tuple[float, asyncssh.SSHClientConnection]:
    """Login -> prompt in ms; the connection is returned open (closed after ``hold_s`` if given)."""
    t0 = time.perf_counter()
    conn = await asyncssh.connect("127.0.0.1", port, username="root", password=PASSWORD, **options())
    screen = Screen()
    await conn.create_session(lambda: ScreenSession(screen), term_type="xterm", term_size=(80, 24), encoding=None)
    prompt = await screen.wait(ends_with_prompt, 60)
    if hold_s:
        await asyncio.sleep(hold_s)
        await close(conn)
    return (prompt - t0) * 1000, conn


async def close(conn: asyncssh.SSHClientConnection) -> None:
    conn.close()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(10):
            await conn.wait_closed()


async def settle(svc: Any) -> None:
    """Every session closed and released, the pool refilled: the next measure starts from a quiet honeypot."""
    async with asyncio.timeout(300):
        # Connections gone, and their boxes stopped (a release stops the box after the session's record is
        # closed; until then it counts as live against max_sandboxes).
        while svc.manager.active_connections or svc.pool.active:  # noqa: ASYNC110 (another component's counts)
            await asyncio.sleep(0.1)
        await svc.pool.wait_refilled()


async def main(quick: bool, image: str) -> dict[str, Any]:
    sensor = f"bench-cap-{secrets.token_hex(4)}"
    tmp = Path(tempfile.mkdtemp(prefix="sandtrap-bench-capacity-"))
    settings = load_settings(
        None,
        {
            "sensor": sensor,
            "ssh": {"listen": "127.0.0.1:0"},
            "sandbox": {"docker": {"image": image}, "affinity": "session"},
            "storage": {"data_dir": str(tmp / "data")},
            "api": {"listen": "127.0.0.1:0"},
            "auth": {"credentials": [{"username": "root", "password": PASSWORD}], "accept_all_after": 0,
                     "failure_delay_s": 0, "success_delay_s": 0},
            "limits": {"max_sessions_per_ip": 100, "max_sessions": 200},
        },
    )  # fmt: skip
    made = seccomp.profile_path(ROOT / "data")
    if made.exists():
        seccomp.profile_path(settings.data_dir).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(made, seccomp.profile_path(settings.data_dir))
    singles, burst, rate_s = (3, 20, 6.0) if quick else (10, 20, 20.0)
    res: dict[str, Any] = {"quick": quick, "sensor": sensor, "defaults": settings.sandbox.model_dump(
        include={"pool_size", "pool_max", "pool_refill_parallel", "max_sandboxes", "pool_shrink_after_s"})}  # fmt: skip
    capture = CaptureSink()
    try:
        async with running(settings, sinks=[capture]) as svc:
            port = svc.ssh.port
            pool = svc.pool
            one = []
            for _ in range(singles):
                ms, conn = await login(port)
                one.append(ms)
                await close(conn)
                await settle(svc)
            res["single_warm_login_ms"] = one
            print(f"single warm login -> prompt: p50 {statistics.median(one):.0f} ms", flush=True)

            # 20 back to back, held open until the last.
            held = []
            b2b = []
            for _ in range(burst):
                ms, conn = await login(port)
                b2b.append(ms)
                held.append(conn)
            for conn in held:
                await close(conn)
            res["back_to_back_login_ms"] = b2b
            res["back_to_back_on_demand"] = pool.on_demand_creations
            ratio = statistics.median(b2b) / statistics.median(one)
            res["back_to_back_ratio"] = ratio
            print(
                f"{burst} back to back: p50 {statistics.median(b2b):.0f} ms ({ratio:.2f}x the single warm login's); "
                f"pool {pool.stats()}",
                flush=True,
            )
            await settle(svc)

            # The same 20 from one address as the default affinity (source_ip) serves them: one box, reused.
            svc.manager.share_by_ip = True  # bench only: the by-IP path, as affinity source_ip takes it
            one_ip = []
            held = []
            for _ in range(burst):
                ms, conn = await login(port)
                one_ip.append(ms)
                held.append(conn)
            for conn in held:
                await close(conn)
            svc.manager.share_by_ip = False
            res["back_to_back_one_ip_login_ms"] = one_ip
            res["back_to_back_one_ip_ratio"] = statistics.median(one_ip) / statistics.median(one)
            print(
                f"{burst} back to back from one address (source_ip): {res['back_to_back_one_ip_ratio']:.2f}x",
                flush=True,
            )
            for ip, box in list(svc.manager._by_ip.items()):  # its box goes back now, not after ip_ttl_s (bench only)
                del svc.manager._by_ip[ip]
                if box.timer is not None:
                    box.timer.cancel()
                await svc.manager._release(box.sandbox)
            await settle(svc)

            res["rates"] = {}
            for rate in (1.0, 2.0, 5.0):
                before = len(capture.of(SANDBOX_ASSIGNED))
                on_demand = pool.on_demand_creations
                tasks = []
                t_end = time.perf_counter() + rate_s
                while time.perf_counter() < t_end:
                    tasks.append(asyncio.create_task(login(port, hold_s=2.0)))
                    await asyncio.sleep(1.0 / rate)
                results = await asyncio.gather(*tasks, return_exceptions=True)
                failed = [r for r in results if isinstance(r, BaseException)]
                prompts = [r[0] for r in results if not isinstance(r, BaseException)]
                acquire = [float(e.get("acquire_ms")) for e in capture.of(SANDBOX_ASSIGNED)[before:]]
                row = {
                    "logins": len(tasks),
                    "failed": len(failed),
                    "acquire_p50_ms": pct(acquire, 50),
                    "acquire_p95_ms": pct(acquire, 95),
                    "prompt_p50_ms": pct(prompts, 50),
                    "prompt_p95_ms": pct(prompts, 95),
                    "on_demand": pool.on_demand_creations - on_demand,
                    "warm_up_s": pool.demand.warm_s,
                    "target": pool.demand.target(),
                    "acquire_ms": acquire,
                }
                res["rates"][str(rate)] = row
                print(
                    f"{rate:g}/s: {len(tasks)} logins ({len(failed)} failed), acquire p50 {row['acquire_p50_ms']:.0f} "
                    f"p95 {row['acquire_p95_ms']:.0f} ms, prompt p50 {row['prompt_p50_ms']:.0f} ms, on demand "
                    f"{row['on_demand']}, warm-up {pool.demand.warm_s:.1f} s, target {row['target']}",
                    flush=True,
                )
                await settle(svc)
            parallel = settings.sandbox.pool_refill_parallel
            res["engine_warm_rate_per_s"] = parallel / pool.demand.warm_s
            ok = [float(r) for r, row in res["rates"].items() if row["acquire_p95_ms"] < 300 and not row["failed"]]
            res["sustained_warm_rate_per_s"] = max(ok) if ok else 0.0
    finally:
        proc = await asyncio.create_subprocess_shell(
            f"docker ps -aq --filter label=sandtrap.sensor={sensor} | xargs -r docker rm -f",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def report(res: dict[str, Any]) -> str:
    one, b2b = res["single_warm_login_ms"], res["back_to_back_login_ms"]
    lines = [
        "| measure | value |",
        "|---|---|",
        f"| single warm login -> prompt, p50 | {statistics.median(one):.0f} ms |",
        f"| 20 back-to-back logins -> prompt, p50 | {statistics.median(b2b):.0f} ms "
        f"({res['back_to_back_ratio']:.2f}x; {res['back_to_back_on_demand']} made on demand) |",
        f"| the same from one address (affinity source_ip, the default), p50 | "
        f"{statistics.median(res['back_to_back_one_ip_login_ms']):.0f} ms ({res['back_to_back_one_ip_ratio']:.2f}x) |",
    ]
    for rate, row in res["rates"].items():
        lines.append(
            f"| {float(rate):g} logins/s ({row['logins']}): acquire p50 / p95 | {row['acquire_p50_ms']:.0f} / "
            f"{row['acquire_p95_ms']:.0f} ms (on demand {row['on_demand']}, warm-up {row['warm_up_s']:.1f} s, "
            f"target {row['target']}) |"
        )
    lines.append(f"| sustained rate served warm (p95 acquire < 300 ms) | {res['sustained_warm_rate_per_s']:g}/s |")
    lines.append(f"| the engine's warm-up rate (parallel / warm-up time) | {res['engine_warm_rate_per_s']:.2f}/s |")
    return "\n".join(lines) + "\n"


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--image", default="sandtrap-target:latest")
    args = parser.parse_args()
    res = asyncio.run(main(args.quick, args.image))
    out = ROOT / ("bench/.work/quick" if args.quick else "bench/results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "capacity.json").write_text(json.dumps(res, indent=1))
    (out / "capacity.md").write_text(report(res))
    print(report(res))


if __name__ == "__main__":
    cli()
