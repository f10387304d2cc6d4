"""Docker and nspawn boxes measured the same way in one run (issue 18): create+start, warm acquire, memory per
idle box. ``python -m bench.backends_side_by_side [N | --quick]`` as root (``make bench`` runs it), with the Docker
image built (``SANDTRAP_TEST_IMAGE`` names the image tag); the nspawn tree is built from it if missing. Writes
bench/results/backends.md. Boxes are made one after the other, alternating backends, so both
see the same load; every box made is removed.

- create+start: ``backend.create()`` and then until a command has run in the box (Docker's create returns when the
  engine has started the container; nspawn's when the box's listener has run one).
- warm acquire: ``Pool.acquire`` with a warm box ready (claim and hand-over).
- memory per idle box: the box's per-box parent cgroup ``memory.usage_in_bytes`` after 5 s idle (everything the
  box's processes are charged, page cache and tmpfs included; for nspawn the systemd-nspawn process too, which
  sits in that cgroup, while Docker's containerd-shim does not).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sandtrap.config import DockerSettings, ImageSettings, NspawnSettings, SandboxSettings
from sandtrap.sandbox.base import SandboxBackend, run
from sandtrap.sandbox.docker.backend import DockerBackend
from sandtrap.sandbox.docker.seccomp import find
from sandtrap.sandbox.nspawn.backend import NspawnBackend
from sandtrap.sandbox.nspawn.image import build_tree
from sandtrap.sandbox.pool import Pool

CACHE = Path(__file__).resolve().parents[1] / "data" / "cache"
RESULTS = Path(__file__).resolve().parent / "results" / "backends.md"


def _memory(backend: Any, box: Any) -> int:
    parents = backend.parents
    cgroup = box.cgroup if isinstance(backend, DockerBackend) else box.record.cgroup
    if parents is None or not cgroup:
        return 0
    return int((parents.root / "memory" / parents.prefix / cgroup / "memory.usage_in_bytes").read_text())


async def measure(name: str, make: Any, n: int, out: dict[str, dict[str, list[float]]]) -> None:
    backend: SandboxBackend = make()
    fig = out.setdefault(name, {"create_s": [], "acquire_s": [], "idle_mib": []})
    for _ in range(n):
        t0 = time.monotonic()
        box = await backend.create()
        for _ in range(3000):  # Docker's create returns at the engine's start: until a command has run
            if (await run(box, ["true"], timeout_s=30)).ok:
                break
            await asyncio.sleep(0.01)
        fig["create_s"].append(time.monotonic() - t0)
        await asyncio.sleep(5)
        fig["idle_mib"].append(_memory(backend, box) / 2**20)
        await box.remove()
    with tempfile.TemporaryDirectory() as tmp:
        pool: Pool[Any] = Pool(backend, SandboxSettings(pool_size=1, max_sandboxes=4), Path(tmp) / "ledger")
        await pool.start()
        for i in range(n):
            await pool.wait_refilled()
            t0 = time.monotonic()
            box = await pool.acquire(f"bench-{i}", "192.0.2.7")
            fig["acquire_s"].append(time.monotonic() - t0)
            await pool.release(box)
            await box.remove()
        await pool.close()
    await backend.close()


async def main(n: int) -> None:
    sensor = f"bench-{secrets.token_hex(3)}"
    tag = os.environ.get("SANDTRAP_TEST_IMAGE", DockerSettings().image)
    box = SandboxSettings(docker=DockerSettings(image=tag))
    profile = find(None).read_text()
    await build_tree(ImageSettings(), tag, CACHE)  # a no-op when it is current
    out: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as root:
        makers = {
            "docker": lambda: DockerBackend(box.docker, box, sensor, profile),
            "nspawn": lambda: NspawnBackend(NspawnSettings(), box, ImageSettings(), CACHE, Path(root), sensor),
        }
        for _ in range(2):  # alternating: each backend measured twice, n boxes each
            for name, make in makers.items():
                await measure(name, make, n, out)
    lines = [
        f"Docker and nspawn side by side, alternating, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "| backend | create+start, median (max) | warm acquire, median | idle box memory, median | n |",
        "|---|---|---|---|---|",
    ]
    for name, fig in out.items():
        c, a, m = fig["create_s"], fig["acquire_s"], fig["idle_mib"]
        lines.append(f"| {name} | {statistics.median(c):.2f} s ({max(c):.2f} s) | {statistics.median(a) * 1000:.1f} ms "
                     f"| {statistics.median(m):.1f} MiB | {len(c)} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    arg = sys.argv[1] if len(sys.argv) > 1 else "3"
    asyncio.run(main(2 if arg == "--quick" else int(arg)))
