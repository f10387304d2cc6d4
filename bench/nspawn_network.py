"""nspawn boxes with ``network.mode`` none and capture, measured the same way in one run (issue 16 on nspawn):
``python -m bench.nspawn_network [N]`` as root, with the nspawn tree built (``sandtrap image build`` with
``sandbox.backend: nspawn``, or the tests' tree). A capture gateway is started in a namespace of its own (removed
after); boxes are made one after the other, the two modes alternating, so both see the same load.

- create+start: ``backend.create()`` (it returns when the box's listener has run a command; with capture, the
  box's ``eth0`` on the gateway was made before that), then until ``ip route`` in the box shows the default route
  (capture) or runs (none).
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sandtrap.config import ImageSettings, NetworkSettings, NspawnSettings, SandboxSettings
from sandtrap.network.gateway import Gateway
from sandtrap.sandbox.base import run
from sandtrap.sandbox.nspawn.backend import NspawnBackend

CACHE = Path(__file__).resolve().parents[1] / "data" / "cache"
SUBNET = "10.20.8.0/24"


async def main(n: int) -> None:
    sensor = f"bench-{secrets.token_hex(3)}"
    with tempfile.TemporaryDirectory() as root:
        net = NetworkSettings(mode="capture", subnet=SUBNET, namespace=f"sandtrap-b-{secrets.token_hex(4)}")
        gateway = Gateway(net, sensor, Path(root) / "gw")
        await gateway.start()
        backends: dict[str, NspawnBackend] = {}
        try:
            for mode in ("none", "capture"):
                box = SandboxSettings(backend="nspawn", network=mode, network_subnet=SUBNET)
                attach = gateway.attach if mode == "capture" else None
                backends[mode] = NspawnBackend(
                    NspawnSettings(), box, ImageSettings(), CACHE, Path(root) / mode, sensor, None, attach
                )
            times: dict[str, list[float]] = {mode: [] for mode in backends}
            for i in range(n):
                for mode, backend in backends.items():
                    t0 = time.monotonic()
                    sandbox = await backend.create()
                    routes = (await run(sandbox, ["ip", "route"], timeout_s=30)).stdout.decode()
                    times[mode].append(time.monotonic() - t0)
                    if (mode == "capture") != ("default via" in routes):
                        raise SystemExit(f"box {i} ({mode}): unexpected routes {routes!r}")
                    await sandbox.remove()
            print(f"{'network.mode':12} create+start s (median, max)")
            for mode, values in times.items():
                print(f"{mode:12} {statistics.median(values):6.3f} {max(values):6.3f}   (n={len(values)})")
            ratio = statistics.median(times["capture"]) / statistics.median(times["none"])
            print(f"capture / none (medians): {ratio:.2f}")
        finally:
            for backend in backends.values():
                for info in await backend.list_managed():
                    await backend.sandbox(info.id, info.name).remove()
                await backend.close()
            await gateway.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 5))
