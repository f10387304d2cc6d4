"""Docker and nspawn boxes measured the same way in one run (issue 18): create+start, warm acquire, memory per
idle box. ``python -m bench.backends_side_by_side [N]`` as root, with the Docker image and the nspawn tree built
(``SANDTRAP_TEST_IMAGE`` names the image tag). Boxes are made one after the other, alternating backends, so both
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
from sandtrap.sandbox.pool import Pool

CACHE = Path(__file__).resolve().parents[1] / "data" / "cache"


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
        pool = Pool(backend, SandboxSettings(pool_size=1, max_sandboxes=4), Path(tmp) / "ledger")
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
    out: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as root:
        makers = {
            "docker": lambda: DockerBackend(box.docker, box, sensor, profile),
            "nspawn": lambda: NspawnBackend(NspawnSettings(), box, ImageSettings(), CACHE, Path(root), sensor),
        }
        for _ in range(2):  # alternating: each backend measured twice, n boxes each
            for name, make in makers.items():
                await measure(name, make, n, out)
    print(f"{'backend':8} {'create+start s (median, max)':30} {'warm acquire ms (median)':26} idle MiB (median)")
    for name, fig in out.items():
        c, a, m = fig["create_s"], fig["acquire_s"], fig["idle_mib"]
        print(f"{name:8} {statistics.median(c):6.2f} {max(c):6.2f}{'':17} {statistics.median(a) * 1000:8.1f}{'':18}"
              f" {statistics.median(m):6.1f}   (n={len(c)})")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3))
