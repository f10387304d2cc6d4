"""``python -m bench``: sandtrap, OpenSSH and Cowrie side by side on 127.0.0.1 (run ``bench/setup.sh`` first).

python -m bench                      # the full run: bench/results/{results.json,results.md,latency.png}
python -m bench --quick              # a smoke run with small counts (results in bench/.work/quick)
python -m bench --profile py-spy     # also sample sandtrap per phase (bench/.work/run/profiles)
python -m bench --report-only        # redo the table and plot from bench/results/results.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def use_revision(rev: str) -> str:
    """Benchmark sandtrap as committed at ``rev`` (its ``src`` exported under bench/.work), not the work tree."""
    sha = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True, text=True, check=True
    ).stdout.strip()
    dest = ROOT / "bench" / ".work" / f"rev-{sha}"
    if not (dest / "src" / "sandtrap").exists():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", sha, "src"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    src = str(dest / "src")
    os.environ["PYTHONPATH"] = src  # the sandtrap subprocess
    sys.path.insert(0, src)  # and what the harness itself imports (the floor box, the config walk)
    os.environ["BENCH_SANDTRAP_REV"] = sha
    return sha


def main() -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small counts, for a smoke test")
    ap.add_argument("--profile", choices=["py-spy", "pyinstrument"], help="profile sandtrap while measuring")
    ap.add_argument(
        "--out", type=Path, help="where the results go (default bench/results; --quick/--profile: bench/.work)"
    )
    ap.add_argument("--report-only", action="store_true", help="rebuild the table and plot from the JSON")
    ap.add_argument("--sandtrap-rev", help="benchmark this git revision of sandtrap instead of the work tree")
    ap.add_argument("--max-wait-quiet", type=float, default=120.0, help="seconds to wait for load < cores first")
    args = ap.parse_args()
    if args.sandtrap_rev:
        print(f"sandtrap at revision {use_revision(args.sandtrap_rev)} (exported, work tree untouched)")
    from bench import report
    from bench.profiles import top
    from bench.run import QUICK, Plan, log, metrics, run

    work = ROOT / "bench" / ".work" / "run"
    if args.out:
        out = args.out
    elif args.quick or args.profile:  # such numbers never replace the published ones
        out = ROOT / "bench" / ".work" / ("quick" if args.quick else "profile-results")
    else:
        out = ROOT / "bench" / "results"
    if args.report_only:
        results = json.loads((out / "results.json").read_text())
        paths = report.write(results, out)
        print(f"wrote {', '.join(str(p) for p in paths.values())}")
        return 0

    plan = QUICK if args.quick else Plan()
    started = time.monotonic()
    results = asyncio.run(run(plan, work, args.profile, args.max_wait_quiet))
    results["duration_s"] = round(time.monotonic() - started, 1)
    results["metrics"] = metrics(results)
    paths = report.write(results, out)
    log(f"done in {results['duration_s']:.0f}s: {', '.join(str(p) for p in paths.values())}")
    print()
    print(paths["md"].read_text())
    for phase, path in (results.get("profiles") or {}).items():
        summary = top(Path(path), 12)
        print(f"== py-spy, phase {phase}: {summary.get('samples', 0)} samples; top self time")
        for name, pct in summary["self"]:
            print(f"  {pct:5.1f}%  {name}")
    failed = [t for t in results["targets"] if t["met"] is False]
    if failed:
        print(f"{len(failed)} performance target(s) not met (see the table); the run itself succeeded.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
