"""What a run leaves in bench/results/: results.json, results.md (the table) and latency.png (the plot)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bench.stats import clean, ratio

SYSTEMS = ("sandtrap", "openssh", "cowrie")
NAMES = {"sandtrap": "sandtrap", "openssh": "OpenSSH", "cowrie": "Cowrie", "floor": "docker exec -it"}
COLORS = {"sandtrap": "#d62728", "openssh": "#1f77b4", "cowrie": "#2ca02c", "floor": "#7f7f7f"}
KIB, MIB = 1024, 1024 * 1024


def _num(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    r = ratio(a, b)
    return "–" if r is None else f"{r:.2f}"


def targets(m: dict[str, Any], plan: dict[str, Any], results_kex: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    p50 = {k: v["p50"] for k, v in m["first_output_ms"].items()}
    echo = {k: v["p50"] for k, v in m["echo_ms"].items()}
    flood = {k: v["per_cpu_s"] for k, v in m["flood"].items()}
    out = []

    def add(name: str, measured: str, met: bool | None) -> None:
        out.append({"target": name, "measured": measured, "met": met})

    r = ratio(p50.get("sandtrap"), p50.get("openssh"))
    add(
        "connect-to-prompt p50 no worse than OpenSSH's",
        f"sandtrap/OpenSSH = {_ratio(p50.get('sandtrap'), p50.get('openssh'))}",
        None if r is None else r <= 1.0,
    )
    r = ratio(p50.get("sandtrap"), p50.get("cowrie"))
    add(
        "connect-to-prompt p50 better than Cowrie's",
        f"sandtrap/Cowrie = {_ratio(p50.get('sandtrap'), p50.get('cowrie'))}",
        None if r is None else r < 1.0,
    )
    if echo.get("sandtrap") is not None and echo.get("floor") is not None:
        d = echo["sandtrap"] - echo["floor"]
        add(
            "keystroke echo p50 within 1 ms of `docker exec -it`",
            f"{echo['sandtrap']:.2f} ms vs {echo['floor']:.2f} ms (+{d:.2f} ms)",
            d <= 1.0,
        )
    kx = (results_kex or {}).get("sandtrap")
    if kx and kx.get("default_over_curve25519") is not None:
        add(
            "OpenSSH's default kex (sntrup761) costs at most 15% of the auth attempts per CPU-second",
            f"sntrup761/curve25519 = {kx['default_over_curve25519']:.2f}",
            kx["default_over_curve25519"] >= 0.85,
        )
    r = ratio(flood.get("sandtrap"), flood.get("cowrie"))
    add(
        "auth-flood attempts per CPU-second at least Cowrie's",
        f"sandtrap/Cowrie = {_ratio(flood.get('sandtrap'), flood.get('cowrie'))}",
        None if r is None else r >= 1.0,
    )
    for mode, label in (("bulk_pty", "PTY"), ("bulk_exec", "exec"), ("bulk_exec_binary", "exec (binary data)")):
        a = (m[mode].get("sandtrap") or {}).get("median")
        b = (m[mode].get("openssh") or {}).get("median")
        r = ratio(a, b)
        add(
            f"{label} throughput at least half of OpenSSH's",
            f"sandtrap/OpenSSH = {_ratio(a, b)}",
            None if r is None else r >= 0.5,
        )
    s = m["sessions"].get("sandtrap", {})
    per = (s.get("rss") or {}).get("slope")
    want = plan["sessions_sandtrap"]
    held_ok = s.get("held", 0) >= want
    add(
        f"{want} concurrent sandboxed sessions, under 1 MB honeypot RSS per idle session",
        f"{s.get('held', 0)}/{want} held, {_num(per / KIB if per is not None else None)} KiB per session",
        None if per is None else (held_ok and per < 1_000_000),
    )
    return out


def table(results: dict[str, Any]) -> str:
    m, plan, mach = results["metrics"], results["plan"], results["machine"]
    cols = [*SYSTEMS, "floor"]
    tl = results.get("timeline") or []
    loads = [x for row in tl for x in (row["load_1m_start"], row["load_1m_end"])]
    load = f" Load average (1 min) during the run: {min(loads):.1f}–{max(loads):.1f}." if loads else ""
    lines = [
        f"Run {mach['date']} on {mach['nproc']} cores ({mach['cpu']}), {mach['memory_gib']} GiB, {mach['os']}, "
        f"kernel {mach['kernel']}, Python {mach['python']}, Docker {mach['docker']}, cgroup {mach['cgroup']}; "
        f"{mach.get('containers_running_at_start', '?')} other container(s) running at the start.{load} "
        f"Whole run {results.get('duration_s', 0) / 60:.0f} min.",
        "",
        "| metric | sandtrap | OpenSSH | Cowrie | docker exec -it | sandtrap / OpenSSH | sandtrap / Cowrie |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def row(label: str, cells: dict[str, str], values: dict[str, float | None]) -> None:
        body = " | ".join(cells.get(c, "–") for c in cols)
        r1 = _ratio(values.get("sandtrap"), values.get("openssh"))
        r2 = _ratio(values.get("sandtrap"), values.get("cowrie"))
        lines.append(f"| {label} | {body} | {r1} | {r2} |")

    fl = m["flood"]
    row(
        f"auth flood: attempts/s (C={plan['concurrency']}, {plan['per_connection']} per connection; per-round range)",
        {k: f"{_num(v['per_s'])} ({_spread(v['rounds_per_s'])})" for k, v in fl.items()},
        {k: v["per_s"] for k, v in fl.items()},
    )
    row(
        "auth flood: attempts per server CPU-second",
        {k: f"{_num(v['per_cpu_s'])} ({_spread(v['rounds_per_cpu_s'])})" for k, v in fl.items()},
        {k: v["per_cpu_s"] for k, v in fl.items()},
    )
    kx = results["raw"].get("kex") or {}  # OpenSSH's client, its default kex next to curve25519
    if kx:
        default, classic = "sntrup761x25519-sha512", "curve25519-sha256"
        row(
            "auth flood with OpenSSH's client: attempts per server CPU-second, sntrup761 (its default) / curve25519",
            {
                k: f"{_num(v[default]['per_cpu_s'])} / {_num(v[classic]['per_cpu_s'])} "
                f"({_num(v['default_over_curve25519'], 2)})"
                for k, v in kx.items()
            },
            {k: v[default]["per_cpu_s"] for k, v in kx.items()},
        )
        row(
            "connect → logged in with OpenSSH's client, ms p50: sntrup761 / curve25519",
            {k: f"{_num(v[default]['auth_ms_p50'])} / {_num(v[classic]['auth_ms_p50'])}" for k, v in kx.items()},
            {k: v[default]["auth_ms_p50"] for k, v in kx.items()},
        )
    for key, label in (
        ("auth_ms", "connect → logged in (kex + password), ms: p50 (IQR)"),
        ("first_output_ms", "connect → first shell output, ms: p50 (IQR)"),
        ("prompt_ms", "connect → prompt on screen, ms: p50 (IQR)"),
        ("exec_ms", "exec `uname -a`, connect → exit, ms: p50 (IQR)"),
        ("echo_ms", "keystroke echo in a PTY, ms: p50 (IQR)"),
    ):
        d = m[key]
        row(
            label,
            {k: f"{_num(v['p50'], 2)} ({_num(v['p25'], 2)}–{_num(v['p75'], 2)})" for k, v in d.items()},
            {k: v["p50"] for k, v in d.items()},
        )
        tails = {"auth_ms": (), "prompt_ms": ("p95",), "exec_ms": ("p95",)}.get(key, ("p95", "p99"))
        for q in tails:
            row(f"… {q}", {k: _num(v[q], 2) for k, v in d.items()}, {k: v[q] for k, v in d.items()})
    for mode, label in (("bulk_pty", "a PTY"), ("bulk_exec", "exec"), ("bulk_exec_binary", "exec, binary (NULs)")):
        d = m[mode]
        cells = {k: f"{_num(v['median'])} ({_spread(v['runs'])})" for k, v in d.items()}
        for name in results["raw"]["bulk"].get("skipped", {}):
            cells[name] = "n/a¹"
        row(
            f"{plan['bulk_bytes'] / 1e6:.0f} MB through {label}, MB/s: median of {plan['bulk_repeats']} (range)",
            cells,
            {k: v["median"] for k, v in d.items()},
        )
    ss = m["sessions"]
    row("idle interactive sessions held", {k: f"{v['held']}/{v['requested']}" for k, v in ss.items()}, {})
    row(
        "server RSS per idle session, KiB (slope over the ramp)",
        {k: _num(_div(v["rss"]["slope"], KIB)) for k, v in ss.items()},
        {k: v["rss"]["slope"] for k, v in ss.items()},
    )
    row(
        "server PSS per idle session, KiB",
        {k: _num(_div(v["pss"]["slope"], KIB)) for k, v in ss.items()},
        {k: v["pss"]["slope"] for k, v in ss.items()},
    )
    row(
        "the session's own processes per idle session, MiB (sandtrap: its box's cgroup; OpenSSH: the user's shell, RSS)",
        {k: _num(_div((v.get("session") or v.get("sandbox") or {}).get("slope"), MIB), 2) for k, v in ss.items()},
        {k: (v.get("session") or v.get("sandbox") or {}).get("slope") for k, v in ss.items()},
    )
    lines += ["", "sandtrap's sandboxes:", "", "| | p50 ms | p95 ms | n |", "|---|---:|---:|---:|"]
    for key, label in (
        ("acquire_warm_ms", "acquire from the warm pool (during the latency rounds)"),
        (
            "acquire_sessions_ms",
            f"acquire during the {plan['sessions_sandtrap']}-session ramp (pool of {plan['pool_size']} exhausted: on demand)",
        ),
        ("cold_create_ms", "cold creation: create + start a hardened container"),
        ("cold_ready_ms", "cold creation until a first `docker exec` has run"),
    ):
        v = m[key]
        lines.append(f"| {label} | {_num(v['p50'])} | {_num(v['p95'])} | {v['n']} |")
    lines += [
        "",
        "Targets (ratios from this one run, same machine):",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for t in results["targets"]:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {t['measured']} | {met} |")
    lines += ["", *notes(results)]
    return "\n".join(lines) + "\n"


def notes(results: dict[str, Any]) -> list[str]:
    m, sysinfo = results["metrics"], results["systems"]
    out = ["Notes:", ""]
    for name, reason in results["raw"]["bulk"].get("skipped", {}).items():
        out.append(f"* ¹ {NAMES[name]}: {reason} (its emulated shell cannot produce bulk output).")
    for name in SYSTEMS:
        info = sysinfo.get(name, {})
        alg = sysinfo.get("algorithms", {}).get(name, {})
        out.append(
            f"* {NAMES[name]}: {info.get('version')}; host key {alg.get('host_key')}, cipher {alg.get('cipher')}, "
            f"MAC {alg.get('mac')}; " + "; ".join(info.get("notes", []))
        )
    shares = []
    for mode in ("bulk_pty", "bulk_exec", "bulk_exec_binary"):
        for name, v in m[mode].items():
            if v.get("client_cpu_share") is not None:
                shares.append(f"{NAMES[name]} {mode[5:]} {v['client_cpu_share']:.0%}")
    engine = [
        f"{mode[5:]} {v['engine_cpu_share']:.0%}"
        for mode in ("bulk_pty", "bulk_exec", "bulk_exec_binary")
        for name, v in m[mode].items()
        if name == "sandtrap" and v.get("engine_cpu_share") is not None
    ]
    if engine:
        out.append(
            "* Docker engine CPU (dockerd, containerd, shims) during sandtrap's transfers, in cores: "
            + ", ".join(engine)
            + "."
        )
    if shares:
        out.append(
            "* The client is Python (asyncssh); its CPU share during the transfers: "
            + ", ".join(shares)
            + " (near 100% means the client set the pace)."
        )
    fl = m["flood"]
    out.append(
        "* Flood client CPU share: "
        + ", ".join(
            f"{NAMES[k]} {v['client_cpu_share']:.0%}" for k, v in fl.items() if v.get("client_cpu_share") is not None
        )
        + ". Outcomes: "
        + "; ".join(f"{NAMES[k]} {v['outcomes']}" for k, v in fl.items())
    )
    health = results["raw"].get("latency_health", {})
    for name, h in health.items():
        if h.get("errors") or h.get("settle_timeouts"):
            out.append(
                f"* {NAMES[name]} latency rounds: {len(h['errors'])} errors, {h['settle_timeouts']} settle time-outs; first: {h['errors'][:1]}"
            )
    for name, s in m["sessions"].items():
        if s.get("errors") or s.get("stopped_early"):
            top = sorted(s["errors"].items(), key=lambda kv: -kv[1])[:2]
            stop = f"; ramp stopped: {s['stopped_early']}" if s.get("stopped_early") else ""
            out.append(f"* {NAMES[name]} sessions: {sum(s['errors'].values())} opens failed{stop}; most common: {top}")
    h = sysinfo.get("sandtrap", {}).get("health")
    if h and (h["connections"] != h["closing_records"] or h["error_lines"]):
        out.append(
            f"* sandtrap health when the measuring ended: {h['connections']} connections, {h['closing_records']} "
            "closing records written (the others were still collecting their box's changes, up to 60 s after the "
            f"last sessions closed), {h['error_lines']} error lines in its log (first: {h['first_errors'][:1]})"
        )
    wrong = results["raw"]["echo"].get("wrong_echo", {})
    if any(wrong.values()):
        out.append(f"* Keystrokes whose first answer did not contain the key: {wrong}")
    return out


def _div(x: float | None, d: float) -> float | None:
    return None if x is None else x / d


def _spread(values: list[float | None]) -> str:
    xs = [v for v in values if v is not None]
    if not xs:
        return "n/a"
    return f"{_num(min(xs))}–{_num(max(xs))}" if len(xs) > 1 else "1 run"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = results["metrics"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    panels = [
        (axes[0][0], "first_output_ms", "connect → first shell output"),
        (axes[0][1], "exec_ms", "exec `uname -a`: connect → exit"),
        (axes[1][0], "echo_ms", "keystroke echo in a PTY"),
    ]
    for ax, key, title in panels:
        for name, s in m[key].items():
            xs = sorted(s["samples"])
            if not xs:
                continue
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step(xs, ys, where="post", color=COLORS[name], label=f"{NAMES[name]} (p50 {s['p50']:.2f} ms)")
        ax.set_xscale("log")
        ax.set_title(title)
        ax.set_xlabel("ms (log scale)")
        ax.set_ylabel("fraction of samples ≤ x")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    ax = axes[1][1]
    for key, label, color in (
        ("acquire_warm_ms", "acquire, warm pool", "#d62728"),
        ("acquire_sessions_ms", "acquire during session ramp", "#ff9896"),
        ("cold_create_ms", "cold create + start", "#9467bd"),
        ("cold_ready_ms", "cold, until first exec ran", "#c5b0d5"),
    ):
        xs = sorted(m[key]["samples"])
        if xs:
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step(xs, ys, where="post", color=color, label=f"{label} (p50 {m[key]['p50']:.0f} ms)")
    ax.set_xscale("log")
    ax.set_title("sandtrap sandboxes")
    ax.set_xlabel("ms (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    mach = results["machine"]
    fig.suptitle(
        f"Latency distributions (ECDF), one run side by side: {mach['nproc']} cores, {mach['memory_gib']} GiB, "
        f"kernel {mach['kernel']}, {mach['date']}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "md": out_dir / "results.md", "png": out_dir / "latency.png"}
    results["targets"] = targets(results["metrics"], results["plan"], results["raw"].get("kex"))
    paths["json"].write_text(json.dumps(clean(results), indent=1) + "\n", encoding="utf-8")
    paths["md"].write_text(table(results), encoding="utf-8")
    plot(results, paths["png"])
    return paths
