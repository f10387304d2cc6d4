"""``sandbox.network: internal``: an eth0, an address and a default route, and no way out.

"No way out" is proven by inspecting the engine's network, the box's settings and the host's packet
filter: no packet is sent anywhere to find out (the project's network rules).
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from sandtrap.config import DockerSettings, SandboxSettings
from sandtrap.errors import SandboxError
from sandtrap.sandbox.docker import engine
from sandtrap.sandbox.docker.backend import DockerBackend
from sandtrap.sandbox.docker.network import bridge_name, check_network, gateway
from sandtrap.sandbox.docker.spec import create_config

from helpers import run

SUBNET = "10.20.1.0/24"


def rules(tool: str, *args: str) -> list[str]:
    return subprocess.run([tool, "-w", *args], check=True, capture_output=True, text=True).stdout.splitlines()


def ip(*args: str) -> list[str]:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout.splitlines()


async def test_internal_network_gives_an_interface_and_a_route_but_no_way_out(
    backend_factory: Callable[[SandboxSettings], DockerBackend], sandbox_settings: Callable[..., SandboxSettings]
) -> None:
    settings = sandbox_settings(network="internal")
    backend = backend_factory(settings)
    box = await backend.create()
    bridge = bridge_name(settings.docker.network_name)
    gw = gateway(SUBNET)

    # In the box: what a server on a LAN shows.
    code, out, _ = await run(box, "ls /sys/class/net; ip -4 -o addr show dev eth0; ip route; cat /etc/resolv.conf")
    assert code == 0, out
    assert "eth0" in out.split() and "lo" in out.split()
    [addr] = re.findall(r"inet (\S+)", out)
    assert ipaddress.IPv4Interface(addr) in ipaddress.IPv4Network(SUBNET) and not addr.startswith(gw + "/")
    assert f"default via {gw} dev eth0" in out
    assert "127.0.0.11" not in out  # the engine's DNS server is not the box's resolver

    async with engine.engine() as client:
        info = await client.containers.container(box.id).show()
        net = await client.networks.get(settings.docker.network_name)
        net_info = await net.show()
    host = info["HostConfig"]
    # The box is on that network only, its embedded DNS server's only upstream is the gateway (dropped).
    assert host["NetworkMode"] == settings.docker.network_name
    assert set(info["NetworkSettings"]["Networks"]) == {settings.docker.network_name}
    assert host["Dns"] == [gw]
    assert not host.get("PortBindings") and not host.get("Privileged") and host["CapDrop"] == ["ALL"]
    assert "NET_ADMIN" not in host["CapAdd"] and "NET_RAW" not in host["CapAdd"]  # it cannot change its routes
    # The network: internal (no NAT, forwarding out dropped), boxes isolated from each other, no IPv6.
    assert net_info["Internal"] is True and net_info["EnableIPv6"] is False
    assert net_info["Options"]["com.docker.network.bridge.enable_icc"] == "false"
    assert net_info["Options"]["com.docker.network.bridge.enable_ip_masquerade"] == "false"
    check_network(
        net_info, settings.docker.network_name, settings.network_subnet
    )  # the same check the honeypot makes before using it

    # The host's packet filter: from the bridge, nothing reaches the host itself (first INPUT rule,
    # IPv4 and IPv6) but, before it in IPv4, replies to the honeypot's own transparent relay sockets
    # (connection_in_box and raw services: marked only for a transparent socket, ESTABLISHED only); nothing is
    # forwarded off the subnet, nothing between boxes, no NAT.
    relay_accept = f"-A INPUT -i {bridge} -m mark --mark 0x5354 -m conntrack --ctstate ESTABLISHED -j ACCEPT"
    for tool in ("iptables", "ip6tables"):
        listing = rules(tool, "-S", "INPUT")[1:]
        drop = listing.index(f"-A INPUT -i {bridge} -j DROP")
        assert listing[:drop] == ([relay_accept] if tool == "iptables" else []), (tool, listing)
    marks = [r for r in rules("iptables", "-t", "mangle", "-S") if "0x5354" in r]
    assert marks == [f"-A PREROUTING -i {bridge} -m socket --transparent -j MARK --set-xmark 0x5354/0xffffffff"], marks
    assert any(r.endswith("from all fwmark 0x5354 lookup 21332") for r in ip("-4", "rule", "show"))
    assert [r.split() for r in ip("-4", "route", "show", "table", "21332")] == [
        ["local", "default", "dev", "lo", "scope", "host"]
    ]
    filter_rules = rules("iptables", "-S")
    assert f"-A DOCKER-ISOLATION-STAGE-1 ! -d {SUBNET} -i {bridge} -j DROP" in filter_rules
    assert f"-A DOCKER-ISOLATION-STAGE-1 ! -s {SUBNET} -o {bridge} -j DROP" in filter_rules
    assert f"-A FORWARD -i {bridge} -o {bridge} -j DROP" in filter_rules
    forward = [r for r in filter_rules if r.startswith("-A FORWARD")]
    assert forward.index("-A FORWARD -j DOCKER-ISOLATION-STAGE-1") < min(
        i for i, r in enumerate(forward) if "ACCEPT" in r
    ), "the isolation chain must come before any ACCEPT in FORWARD"
    assert not [r for r in rules("iptables", "-t", "nat", "-S") if "10.20.1." in r or bridge in r]
    bridge_nf = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
    assert bridge_nf.read_text().strip() == "1"  # traffic between boxes on the bridge meets the FORWARD drop


async def test_boxes_on_the_network_get_their_own_addresses(
    backend_factory: Callable[[SandboxSettings], DockerBackend], sandbox_settings: Callable[..., SandboxSettings]
) -> None:
    backend = backend_factory(sandbox_settings(network="internal"))
    a, b = [await backend.create() for _ in range(2)]
    addrs = [(await run(box, "hostname -I"))[1].split() for box in (a, b)]
    assert addrs[0] != addrs[1] and all(len(x) == 1 for x in addrs)


def test_the_default_is_no_network() -> None:
    config = create_config(DockerSettings(), SandboxSettings(), {}, None)
    assert config["NetworkDisabled"] is True and config["HostConfig"]["NetworkMode"] == "none"
    assert "Dns" not in config["HostConfig"]


async def test_a_look_alike_network_that_routes_out_is_refused(
    sandbox_settings: Callable[..., SandboxSettings],
) -> None:
    settings = sandbox_settings(network="internal")
    fake = {
        "Internal": False,
        "Options": {"com.docker.network.bridge.enable_icc": "true"},
        "IPAM": {"Config": [{"Subnet": SUBNET}]},
    }
    with pytest.raises(SandboxError, match=r"sandbox.docker.network_name: .*not internal.*Fix: remove it"):
        check_network(fake, settings.docker.network_name, settings.network_subnet)
