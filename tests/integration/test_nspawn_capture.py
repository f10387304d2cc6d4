"""``network.mode: capture`` on nspawn boxes: the box's eth0 whose only peer is the capture gateway, with the same
gateway code as Docker's boxes (test_capture.py's "internet": an HTTP server on 127.0.0.1, reached by the fetcher
through ``network.egress.hosts`` and ``network.egress.allow``). Isolation is shown by inspecting interfaces,
routes, rules and namespaces; no packet is sent anywhere but loopback and the gateway's namespace."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_capture import ANSWERS, NAME, PAYLOAD, SUBNET, Internet, capture_config, gateway_of, internet, shell  # noqa: F401  (fixture)

from nspawn_fixtures import CACHE, needs_nspawn, nspawn_cleanup, nspawn_factory, nspawn_tree  # noqa: F401  (fixtures)
from sandtrap.config import ImageSettings, NetworkSettings, NspawnSettings, SandboxSettings, Settings
from sandtrap.errors import ConfigError
from sandtrap.events import NETWORK_HTTP, NETWORK_PCAP, SESSION_FILE_DOWNLOAD
from sandtrap.network.gateway import Gateway
from sandtrap.sandbox.base import run
from sandtrap.sandbox.host.commands import run_command
from sandtrap.sandbox.nspawn.backend import NspawnBackend
from sandtrap.sandbox.nspawn.sandbox import NspawnSandbox

from sshclient import asyncssh_connected as connect

pytestmark = [*needs_nspawn, pytest.mark.timeout(300)]

Honeypot = Callable[..., Any]


async def in_box(sandbox: NspawnSandbox, command: str) -> str:
    result = await run(sandbox, ["sh", "-c", command], timeout_s=30)
    return (result.stdout + result.stderr).decode(errors="replace")


async def test_wget_through_the_gateway_with_its_event_and_the_box_a_dead_end_by_inspection(
    nspawn_tree: Path, nspawn_cleanup: None, honeypot: Honeypot, tmp_path: Path, internet: Internet
) -> None:
    network = capture_config(internet.port)
    hp = await honeypot(
        image={"cache_dir": str(CACHE)},
        sandbox={"backend": "nspawn", "pool_size": 1},
        storage={"data_dir": str(tmp_path / "hp")},
        network=network,
    )
    gw = gateway_of(hp)
    try:
        url = f"http://{NAME}:{internet.port}/bins.sh"
        out, session = await shell(
            hp,
            f"wget -q -O /tmp/w.sh {url}; sha256sum /tmp/w.sh; curl -s -o /tmp/c.sh {url}; sha256sum /tmp/c.sh; "
            f"getent hosts {NAME}; echo links:; ip -o link | awk -F': ' '{{print $2}}'; echo addr:; ip -o -4 addr show dev eth0; "
            "echo routes:; ip route; hostname -I",
        )
        digest = hashlib.sha256(PAYLOAD).hexdigest()
        assert out.count(digest) == 2, out
        gateway = str(ipaddress.IPv4Network(SUBNET)[1])
        # The box's view: lo and eth0 only, an address in the subnet, a default route via the gateway.
        links = out.split("links:\n", 1)[1].split("addr:\n", 1)[0].split()
        assert [name.split("@")[0] for name in links] == ["lo", "eth0"], out
        routes = [line.strip() for line in out.split("routes:\n", 1)[1].strip().splitlines()]
        address = routes[-1].strip()
        assert ipaddress.ip_address(address) in ipaddress.IPv4Network(SUBNET) and address != gateway, out
        assert routes[:-1] == [
            f"default via {gateway} dev eth0",
            f"{SUBNET} dev eth0 proto kernel scope link src {address}",
        ], out
        resolved = [line.split()[0] for line in out.splitlines() if line.endswith(NAME)]
        assert len(resolved) == 1 and ipaddress.ip_address(resolved[0]) in ANSWERS, out
        # The download: events with the sha256, the file stored by it, the HTTP records, the pcap.
        downloads = hp.events(SESSION_FILE_DOWNLOAD, session=session)
        assert len(downloads) == 2 and all(e.get("shasum") == digest for e in downloads), downloads
        assert downloads[0].get("url") == url and downloads[0].get("destfile") == "/tmp/w.sh"
        stored = hp.settings.data_dir / str(downloads[0].get("outfile"))
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == digest
        assert internet.requests.count("/bins.sh") == 2
        assert [e.get("user_agent", "")[:4] for e in hp.events(NETWORK_HTTP, session=session)] == ["Wget", "curl"]
        [pcap] = hp.events(NETWORK_PCAP, session=session)
        assert int(pcap.get("packets") or 0) > 10 and (hp.settings.data_dir / str(pcap.get("pcap"))).stat().st_size

        # The gateway's namespace: lo and the boxes' links only, no route out, no NAT out, forwarding off.
        seen = await gw.ns.inspect()
        names = [line.split(":")[1].strip().split("@")[0] for line in seen["links"].splitlines()]
        assert names[0] == "lo" and names[1:] and all(n.startswith("sg") for n in names[1:]), names
        assert seen["ip_forward"].strip() == "0" and "-P FORWARD DROP" in seen["filter"].splitlines()
        for line in seen["routes"].splitlines():
            assert line.startswith(("local ", "broadcast ")) or (" dev sg" in line and "/" not in line.split()[0])
        assert not any(word in seen["nat"] for word in ("MASQUERADE", "SNAT", "DNAT"))
        # A box in use has eth0's peer in the gateway's namespace (its /32 route there), not in the host's.
        async with connect(hp) as conn:
            result = await conn.run("cat /sys/class/net/eth0/iflink; hostname -I")
            peer, address = str(result.stdout).split()[:2]
            code, gw_links = await run_command(["ip", "-n", gw.ns.name, "-o", "link"])
            routes_now = (await gw.ns.inspect())["routes"]
        assert code == 0 and any(line.startswith(f"{peer}: sg") for line in gw_links.splitlines()), gw_links
        assert f"{address} dev sg" in routes_now, routes_now
        # The host's own namespace: no route to the boxes' subnet, no link of the box's.
        _, host_routes = await run_command(["ip", "route", "show", "table", "all"])
        assert str(ipaddress.IPv4Network(SUBNET).network_address)[:-1] not in host_routes, host_routes
        _, host_links = await run_command(["ip", "-o", "link"])
        assert not any(line.split(":")[1].strip().startswith("sg") for line in host_links.splitlines())
    finally:
        await gw.ns.delete()


async def test_network_internal_is_refused_with_the_key_and_the_fix(tmp_path: Path) -> None:
    settings = Settings(
        sandbox={"backend": "nspawn"}, network={"mode": "internal"}, storage={"data_dir": str(tmp_path)}
    )
    with pytest.raises(ConfigError, match=r"network\.mode: internal.*Fix: set network\.mode: capture"):
        NspawnBackend(settings.sandbox.nspawn, settings.sandbox, ImageSettings(), CACHE, tmp_path / "n", "x")


async def test_box_create_time_with_capture_next_to_none(nspawn_tree: Path, tmp_path: Path, sensor: str) -> None:
    """Boxes made one after another, capture and none alternating (the same load on both); the figures are
    printed (-s), not asserted."""
    net = NetworkSettings(mode="capture", subnet=SUBNET, namespace=f"sandtrap-t-{secrets.token_hex(4)}")
    gateway = Gateway(net, sensor, tmp_path / "gw")
    await gateway.start()
    made: list[NspawnBackend] = []
    try:
        for mode in ("none", "capture"):
            box = SandboxSettings(backend="nspawn", network=mode, network_subnet=SUBNET)
            attach = gateway.attach if mode == "capture" else None
            root = tmp_path / mode
            made.append(NspawnBackend(NspawnSettings(), box, ImageSettings(), CACHE, root, sensor, None, attach))
        times: dict[str, list[float]] = {"none": [], "capture": []}
        for _ in range(3):
            for backend, mode in zip(made, ("none", "capture"), strict=True):
                started = time.perf_counter()
                sandbox = await backend.create()
                times[mode].append(time.perf_counter() - started)
                eth0 = await in_box(sandbox, "ip -o -4 addr show dev eth0 2>&1; ip route")
                if mode == "capture":
                    assert await sandbox.network_address() in eth0 and "default via" in eth0, eth0
                else:
                    assert await sandbox.network_address() == "" and "default" not in eth0, eth0
                await sandbox.remove()
        med = {mode: sorted(values)[1] for mode, values in times.items()}
        print(
            f"\nnspawn box create (median of 3): none {med['none']:.2f} s, capture {med['capture']:.2f} s "
            f"(ratio {med['capture'] / med['none']:.2f})"
        )
    finally:
        for backend in made:
            for info in await backend.list_managed():
                await backend.sandbox(info.id, info.name).remove()
            await backend.close()
        await gateway.close()
        await asyncio.sleep(0)
