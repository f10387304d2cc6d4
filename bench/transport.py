"""sandtrap with ``session_transport: exec`` and ``init`` side by side (the latency and transfer parts of the
benchmark only, sampled in rotation as ``make bench`` does), with ``docker exec -it`` as the echo floor:

    python -m bench.transport [--samples 30] [--keystrokes 200] [--image TAG]

Results: a table on stdout and ``bench/.work/transport/results.json``. Not the published benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.client import Terminal
from bench.measures.latency import keystroke_echo, rotated, sampled, warm_up
from bench.measures.load import bulk_exec, bulk_pty
from bench.systems import floor
from bench.systems import sandtrap as sandtrap_system

ROOT = Path(__file__).resolve().parents[1]


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def main(args: argparse.Namespace) -> dict[str, Any]:
    work = ROOT / "bench" / ".work" / "transport"
    work.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(12)
    servers = {}
    for transport in ("exec", "init"):
        (work / transport).mkdir(exist_ok=True)
        server = await sandtrap_system.start(
            work / transport,
            password,
            pool_size=4,
            max_sandboxes=20,
            wrap=[sys.executable],
            extra={"sandbox": {"session_transport": transport, "docker": {"image": args.image}}},
        )
        server.name = server.label = f"sandtrap-{transport}"
        servers[transport] = server
    out: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        both = list(servers.values())
        if args.samples:
            await warm_up(both, 2)
            values, health = await sampled(both, args.samples, log)
            out["latency"], out["health"] = values, health
        terms = {s.name: await Terminal.open(s) for s in both}
        box = await floor.create_floor(f"bench-{secrets.token_hex(4)}")
        floor_term = await floor.PtyTerminal.open(box.sandbox.id)
        typable: dict[str, Any] = {**terms, "docker exec -it": floor_term}
        if args.keystrokes:
            out["echo"] = await keystroke_echo(typable, args.keystrokes, log)
        out["bulk"] = {s.name: {"exec": [], "exec_binary": [], "pty": []} for s in both}
        for i in range(3):  # in rotation, like the latencies: the machine's noise falls on both alike
            for kind in ("exec", "exec_binary", "pty"):
                for s in rotated(both, i):
                    if kind == "pty":
                        row = await bulk_pty(terms[s.name], s, 20_000_000)
                    else:
                        row = await bulk_exec(s, 20_000_000, binary=kind == "exec_binary")
                    out["bulk"][s.name][kind].append(row)
                    await s.settle()
        for t in terms.values():
            await t.close()
        await floor_term.close()
        await box.sandbox.remove()
        await box.backend.close()
    finally:
        for s in servers.values():
            await s.stop()
            await sandtrap_system.remove_sensor_containers(s.sensor)
    (work / "results.json").write_text(json.dumps(out, indent=1, default=str))
    return out


def report(out: dict[str, Any]) -> str:
    names = ["sandtrap-exec", "sandtrap-init"]
    rows = ["| metric | exec | init | init / exec |", "|---|---:|---:|---:|"]

    def row(label: str, a: float, b: float, fmt: str = "{:.1f}") -> None:
        rows.append(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {b / a:.2f} |")

    for key, label in (
        ()
        if "latency" not in out
        else (
            ("auth_ms", "connect → logged in, ms p50"),
            ("first_output_ms", "connect → first shell output, ms p50"),
            ("prompt_ms", "connect → prompt, ms p50"),
            ("exec_ms", "exec `uname -a`, connect → exit, ms p50"),
        )
    ):
        a, b = (out["latency"][n].get(key, []) for n in names)
        row(label, statistics.median(a), statistics.median(b))
        if key != "auth_ms":
            row(label.replace("p50", "p95"), p(a, 0.95), p(b, 0.95))
    echo = out["echo"]["samples"] if "echo" in out else {n: [float("nan")] for n in names}
    row("keystroke echo, ms p50", statistics.median(echo[names[0]]), statistics.median(echo[names[1]]), "{:.2f}")
    row("keystroke echo, ms p95", p(echo[names[0]], 0.95), p(echo[names[1]], 0.95), "{:.2f}")
    if "docker exec -it" in echo:
        rows.append(
            f"| keystroke echo, `docker exec -it` floor, ms p50 | {statistics.median(echo['docker exec -it']):.2f} | | |"
        )
    for kind in ("exec", "exec_binary", "pty"):
        vals = []
        for n in names:
            rates = [r["mb_per_s"] for r in out["bulk"][n][kind] if r["mb_per_s"]]
            vals.append(statistics.median(rates) if rates else float("nan"))
        row(f"20 MB through {kind}, MB/s median of 3", vals[0], vals[1])
    for kind in ("exec", "exec_binary", "pty"):
        eng = [statistics.median(r["engine_cpu_s"] / r["seconds"] for r in out["bulk"][n][kind]) for n in names]
        row(f"engine CPU during {kind} transfer, cores", eng[0], eng[1], "{:.2f}")
    return "\n".join(rows)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m bench.transport", description=__doc__)
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--keystrokes", type=int, default=200)
    ap.add_argument("--image", default="sandtrap-target:latest")
    ns = ap.parse_args()
    result = asyncio.run(main(ns))
    print(report(result))
