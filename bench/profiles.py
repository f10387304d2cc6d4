"""Profiles of the honeypot while it is being measured (``python -m bench --profile``).

py-spy samples the running sandtrap process from outside (no code change, non-blocking, only the
thread holding the GIL, so waiting is not counted), one collapsed-stack file per phase; :func:`top` turns one into the functions where the time went.
pyinstrument instead wraps the whole sandtrap run (``--profile pyinstrument``) and writes an HTML
report when it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY_SPY = ROOT / ".venv" / "bin" / "py-spy"
# Frames every stack has (interpreter start-up, the CLI, the loop, threads): left out of "inclusive".
_GENERIC = re.compile(r"\((threading|typer/|click/|asyncio/|<frozen|runpy|concurrent/)|^<module> \(sandtrap\)")
_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


class PySpy:
    def __init__(self, pid: int, directory: Path, rate: int = 200) -> None:
        self.pid = pid
        self.directory = directory
        self.rate = rate
        directory.mkdir(parents=True, exist_ok=True)

    @contextlib.asynccontextmanager
    async def phase(self, name: str) -> AsyncIterator[Path]:
        out = self.directory / f"{name}.txt"
        proc = await asyncio.create_subprocess_exec(
            str(PY_SPY), "record", "--pid", str(self.pid), "--rate", str(self.rate), "--format", "raw",
            "--nonblocking", "--gil", "--threads", "--output", str(out),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await asyncio.sleep(0.5)  # attached
        try:
            yield out
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            try:
                async with asyncio.timeout(60):
                    _, err = await proc.communicate()
            except TimeoutError:
                proc.kill()
                err = b""
            if proc.returncode not in (0, -signal.SIGINT) and not out.exists():
                print(f"py-spy failed for {name}: {err.decode(errors='replace')[-400:]}", file=sys.stderr)


def _short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", "src/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m.group('func')} ({path})"


def top(path: Path, n: int = 25) -> dict[str, list[tuple[str, float]]]:
    """Share of samples per function: where it was running (self) and on the stack (inclusive)."""
    self_counts: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        # py-spy raw: process, thread, then outermost ... innermost frame.
        thread = next((f for f in frames if f.startswith("thread ")), "")
        funcs = [_short(f) for f in frames if not f.startswith(("process ", "thread "))]
        if not funcs:
            continue
        total += count
        threads[thread] += count
        self_counts[funcs[-1]] += count
        for f in set(funcs):
            if not _GENERIC.search(f):
                incl[f] += count
    if not total:
        return {"self": [], "inclusive": [], "threads": []}

    def share(c: Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in c.most_common(n)]

    return {"self": share(self_counts), "inclusive": share(incl), "threads": share(threads), "samples": total}  # type: ignore[dict-item]


def pyinstrument_wrap(session: Path) -> list[str]:
    """Run sandtrap under pyinstrument, keeping the raw session (rendered by :func:`pyinstrument_render`)."""
    return [str(ROOT / ".venv" / "bin" / "python"), "-m", "pyinstrument", "-r", "session", "-o", str(session)]


def pyinstrument_render(session: Path) -> list[Path]:
    """The session as an HTML report and as a text call tree (beside it)."""
    import subprocess

    out = []
    for renderer, suffix in (("html", ".html"), ("text", ".txt")):
        dest = session.with_suffix(suffix)
        subprocess.run(
            [str(ROOT / ".venv" / "bin" / "python"), "-m", "pyinstrument", "--load", str(session), "-r", renderer,
             "-o", str(dest)],
            check=False, capture_output=True, timeout=300,
        )  # fmt: skip
        if dest.exists():
            out.append(dest)
    return out


if __name__ == "__main__":  # python -m bench.profiles FILE: print a summary of one py-spy phase
    for kind, rows in top(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 25).items():
        if isinstance(rows, int):
            print(f"samples: {rows}")
            continue
        print(f"== {kind}")
        for name, pct in rows:
            print(f"{pct:6.1f}%  {name}")
