"""``sandbox.network: internal``: an ``eth0`` with an address and a default route, and no way out.

A server without a network interface is a tell; a box with a way out is a launch pad. The box joins
one engine network shared by all boxes, built so that nothing leaves it:

* ``Internal: true``: the engine adds no NAT and drops, in its isolation chains, every packet
  forwarded from the bridge to anywhere but the bridge's own subnet, and back;
* ``enable_icc: false``: boxes cannot talk to each other (the engine's FORWARD drop, with the
  bridge's traffic passed through iptables);
* no masquerading, no IPv6;
* the host itself is the gateway, reachable on its bridge address: the engine leaves that path
  (INPUT) open, so :func:`close_host_path` puts a DROP for the bridge first in INPUT, for IPv4 and
  IPv6 (link-local addresses exist even without IPv6 on the network);
* the engine's embedded DNS server (127.0.0.11 in every box on a user-defined network) forwards
  queries to the host's resolvers, from the host's own namespace when those are on loopback
  (CVE-2024-29018, unfixed in Docker 20.10). Each box is given the gateway as its only upstream
  (``Dns``): forwarded queries then leave from the box's namespace to the host, which drops them.

The box's /etc/resolv.conf is written by its init (a corporate resolver that never answers). No
test here or elsewhere sends a packet to find out: the settings and rules are inspected instead.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import shutil
from typing import Any

import aiodocker

from sandtrap.errors import SandboxError
from sandtrap.sandbox.docker import engine
from sandtrap.sandbox.host.commands import run_command

log = logging.getLogger(__name__)

LABEL = "io.sandtrap.network"


def bridge_name(network_name: str) -> str:
    """The host-side bridge's name: stable per network, at most 15 characters (IFNAMSIZ)."""
    return "st-" + hashlib.sha256(network_name.encode()).hexdigest()[:10]


def gateway(subnet: str) -> str:
    return str(next(ipaddress.IPv4Network(subnet).hosts()))


def network_config(name: str, subnet: str) -> dict[str, Any]:
    """The create body of the internal network ``name`` (``sandbox.docker.network_name``) on ``subnet``
    (``sandbox.network_subnet``)."""
    return {
        "Name": name,
        "Driver": "bridge",
        "Internal": True,
        "EnableIPv6": False,
        "Attachable": False,
        "CheckDuplicate": True,
        "IPAM": {"Driver": "default", "Config": [{"Subnet": subnet, "Gateway": gateway(subnet)}]},
        "Options": {
            "com.docker.network.bridge.name": bridge_name(name),
            "com.docker.network.bridge.enable_icc": "false",
            "com.docker.network.bridge.enable_ip_masquerade": "false",
        },
        "Labels": {LABEL: "internal"},
    }


def check_network(info: dict[str, Any], name: str, subnet: str) -> None:
    """Refuse an existing network of that name unless it is the one sandtrap would create."""
    options = info.get("Options") or {}
    subnets = [c.get("Subnet") for c in (info.get("IPAM") or {}).get("Config") or []]
    problems = []
    if not info.get("Internal"):
        problems.append("it is not internal (it may route out)")
    if options.get("com.docker.network.bridge.enable_icc") != "false":
        problems.append("boxes on it can reach each other (enable_icc)")
    if subnets != [subnet]:
        problems.append(f"its subnet is {subnets}, not {subnet}")
    if options.get("com.docker.network.bridge.name") != bridge_name(name):
        problems.append("its bridge is not sandtrap's")
    if problems:
        raise SandboxError(
            f"sandbox.docker.network_name: the engine network {name!r} exists but {'; '.join(problems)}. "
            f"Fix: remove it (`docker network rm {name}`) so sandtrap creates it, or set "
            "sandbox.docker.network_name to another name"
        )


async def ensure_network(client: aiodocker.Docker, name: str, subnet: str) -> str:
    """Create the internal network if missing (or check the one there), close the host path; its bridge."""
    try:
        info = await engine.call("inspect network", client._query_json(f"networks/{name}"), 30)
    except SandboxError as exc:
        if not engine.is_not_found(exc):
            raise
        log.info("creating the internal network %s (%s, no way out)", name, subnet)
        try:
            await engine.call("create network", client.networks.create(network_config(name, subnet)), 30)
        except SandboxError as create_exc:
            if "409" not in str(create_exc) and "already exists" not in str(create_exc):
                raise SandboxError(
                    f"sandbox.network_subnet: creating the network failed ({create_exc}). Fix: pick a subnet no "
                    "other network or host route uses, or set sandbox.network: none"
                ) from create_exc
        info = await engine.call("inspect network", client._query_json(f"networks/{name}"), 30)
    check_network(info, name, subnet)
    bridge = bridge_name(name)
    await close_host_path(bridge)
    return bridge


async def close_host_path(bridge: str) -> None:
    """Drop everything the boxes send to the host itself (INPUT from the bridge), IPv4 and IPv6."""
    for tool in ("iptables", "ip6tables"):
        path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
        if path is None:
            raise SandboxError(
                f"sandbox.network: internal needs {tool} to stop boxes reaching the host. Fix: install iptables "
                "(apt-get install iptables) or set sandbox.network: none"
            )
        rule = ["INPUT", "-i", bridge, "-j", "DROP"]
        code, _ = await run_command([path, "-w", "-C", *rule])
        if code == 0:
            continue
        code, out = await run_command([path, "-w", "-I", *rule[:1], "1", *rule[1:]])
        if code != 0:
            raise SandboxError(
                f"sandbox.network: internal: adding the {tool} rule 'INPUT -i {bridge} -j DROP' failed ({out}). "
                "Fix: run sandtrap as root on the engine's host, or set sandbox.network: none"
            )
        log.info("%s: INPUT from %s dropped (boxes cannot reach the host)", tool, bridge)
