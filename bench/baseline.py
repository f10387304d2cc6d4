"""What a session's baseline costs on Docker (issue 19, item 1): ``Sandbox.snapshot()`` on a fresh box.

    python -m bench.baseline [--rounds N]

One box made by sandtrap's own DockerBackend (defaults and the default image, honeytokens planted as the pool does), then, in rotation
so the machine's noise falls on all alike: the snapshot as the honeypot takes it (the overlay's upper directory
read on this host, when the engine is local), the same through the engine (its diff plus one in-box ``find``
for the metadata: a remote engine, or the host's view refused), a full listing of the root file system (what
the micro-VM backend takes, ``find / -xdev``), and ``true`` by exec (the floor of any in-box work). Medians and
p95 in ms, and the paths each snapshot holds. The box is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench.systems.floor import default_backend
from sandtrap.bridge import honeytokens
from sandtrap.sandbox.base import run
from sandtrap.sandbox.docker.sandbox import DockerSandbox
from sandtrap.sandbox.microvm.sandbox import LISTING


def _p95(xs: list[float]) -> float:
    return sorted(xs)[max(0, round(0.95 * len(xs)) - 1)]


async def measure(rounds: int) -> dict[str, Any]:
    backend = default_backend(f"bench-baseline-{secrets.token_hex(3)}")
    box = await backend.create()
    assert isinstance(box, DockerSandbox)
    try:
        await honeytokens.plant(box, honeytokens.generate())
        sizes: dict[str, int] = {}

        async def host() -> None:
            sizes["host"] = len((await box.snapshot()).files)

        async def by_engine() -> None:
            sizes["engine"] = len(await box._states_by_engine())

        async def listing() -> None:
            result = await run(box, LISTING, max_output=256 << 20)
            sizes["listing"] = result.stdout.count(b"\0") // 2

        async def floor() -> None:
            await run(box, ["true"])

        probes: dict[str, Callable[[], Awaitable[None]]] = {
            "snapshot (host view)": host,
            "snapshot (engine)": by_engine,
            "full listing (find / -xdev)": listing,
            "exec true (floor)": floor,
        }
        samples: dict[str, list[float]] = {name: [] for name in probes}
        for _ in range(rounds):
            for name, probe in probes.items():
                started = time.perf_counter()
                await probe()
                samples[name].append((time.perf_counter() - started) * 1000)
        return {
            "rounds": rounds,
            "paths": sizes,
            "ms": {k: {"median": round(statistics.median(v), 1), "p95": round(_p95(v), 1)} for k, v in samples.items()},
        }
    finally:
        await box.remove()
        await backend.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    result = asyncio.run(measure(args.rounds))
    print(f"{result['rounds']} rounds; paths held: {result['paths']}")
    for name, ms in result["ms"].items():
        print(f"  {name:30} median {ms['median']:8.1f} ms   p95 {ms['p95']:8.1f} ms")


if __name__ == "__main__":
    main()
