"""The gateway's network namespace: the only peer every box's ``eth0`` has, and a dead end.

sandtrap creates one named namespace (``ip netns add``) with nothing in it but ``lo`` and one veth end per box.
There is no interface towards the host or anywhere else, so nothing can be routed out of it, whatever the rules
say; the rules say so too:

* ``net.ipv4.ip_forward=0`` and ``iptables -P FORWARD DROP``: a box's packet for another box is dropped;
* IPv6 off on every interface;
* ``local 0.0.0.0/0 dev lo`` in the main table ("AnyIP"): every IPv4 address a box sends to is the gateway's
  own (the boxes' /32 routes are longer and win), so the kernel answers ICMP echo for any address and the
  gateway's sockets bound to 0.0.0.0 (DNS on :53) receive what boxes send to any address;
* ``nat PREROUTING -p tcp -j REDIRECT --to-ports 1``: every TCP connection, to any address and port, lands on
  the gateway's one TCP listener, which reads the original destination (``SO_ORIGINAL_DST``);
* ``rp_filter=1``: a box cannot send from an address that is not its own.

Each box gets a veth pair: ``eth0`` in the box's namespace (an address in ``network.subnet``, a default route
via the gateway's address, the first of the subnet) and ``sg<N>`` here (the gateway's address as /32, a /32
route to the box). Boxes on the same subnet reach nothing but the gateway: no bridge, no proxy ARP, no
forwarding. When the box's namespace goes (the box stops), the pair goes with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import ipaddress
import logging
import os
import secrets
import shutil
import socket
from collections.abc import Callable
from typing import TypeVar

from sandtrap.errors import SandboxError
from sandtrap.sandbox.host.commands import run_command

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
CATCH_PORT = 1  # every TCP connection a box makes is redirected here
LINK_PREFIX = "sg"
T = TypeVar("T")


class NetworkError(SandboxError):
    """The capture gateway's namespace, rules or a box's link could not be set up."""


def namespace_name(sensor: str) -> str:
    return "sandtrap-" + hashlib.sha256(sensor.encode()).hexdigest()[:10]


def gateway_address(subnet: str) -> str:
    return str(next(ipaddress.IPv4Network(subnet).hosts()))


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")
    if path is None:
        raise NetworkError(f"network.mode: capture needs {name}. Fix: apt-get install iproute2 iptables util-linux")
    return path


async def _run(argv: list[str], what: str) -> str:
    code, out = await run_command(argv)
    if code != 0:
        raise NetworkError(
            f"network.mode capture: {what} failed ({' '.join(argv)}: {out}). Fix: run sandtrap as root on the "
            "engine's host, or set network.mode: none"
        )
    return out


def rules(subnet: str, links: str = f"{LINK_PREFIX}+") -> list[list[str]]:
    """The gateway namespace's iptables rules (appended after a flush), in order; ``links``: the boxes' side
    (a micro-VM's namespace: its tap, :mod:`.vmtap`)."""
    lines = [
        "-P FORWARD DROP",
        "-P OUTPUT ACCEPT",
        "-P INPUT ACCEPT",
        # Only the boxes' own addresses may send (rp_filter too).
        f"-A INPUT -i {links} ! -s {subnet} -j DROP",
        # A box's SYN flood: a bounded rate of new connections per box (the listener bounds open ones).
        f"-A INPUT -i {links} -p tcp --syn -m hashlimit --hashlimit-above 200/sec --hashlimit-burst 400 "
        "--hashlimit-mode srcip --hashlimit-name sandtrap-syn -j DROP",
        # Queries to any resolver (the box's resolv.conf names a corporate one) reach the gateway's :53; the
        # replies come back from the address asked (conntrack undoes the REDIRECT).
        f"-t nat -A PREROUTING -i {links} -p udp --dport 53 -j REDIRECT --to-ports 53",
        # Every TCP connection, to any address and port, reaches the one listener.
        f"-t nat -A PREROUTING -i {links} -p tcp -j REDIRECT --to-ports {CATCH_PORT}",
    ]
    return [line.split() for line in lines]


class Namespace:
    """The named namespace and how to run commands and make sockets inside it."""

    def __init__(self, name: str, subnet: str) -> None:
        self.name = name
        self.subnet = subnet
        self.gateway = gateway_address(subnet)
        self.path = f"/run/netns/{name}"

    def exists(self) -> bool:
        return os.path.exists(self.path)

    async def create(self) -> None:
        """Create (or take over) the namespace and (re)apply its settings and rules: idempotent."""
        ip = _tool("ip")
        if not await asyncio.to_thread(os.path.exists, self.path):
            await _run([ip, "netns", "add", self.name], "creating the gateway's namespace")
        ns = [ip, "netns", "exec", self.name]
        await _run([ip, "-n", self.name, "link", "set", "lo", "up"], "lo up")
        for key, value in (
            ("net.ipv4.ip_forward", "0"),
            ("net.ipv6.conf.all.disable_ipv6", "1"),
            ("net.ipv6.conf.default.disable_ipv6", "1"),
            ("net.ipv4.conf.all.rp_filter", "1"),
            ("net.ipv4.conf.default.rp_filter", "1"),
            ("net.ipv4.conf.all.send_redirects", "0"),
            ("net.ipv4.conf.default.send_redirects", "0"),
            ("net.ipv4.icmp_echo_ignore_all", "0"),
            ("net.ipv4.ip_nonlocal_bind", "1"),  # a login's relay binds the client's address here (relay.py)
        ):
            await _run([*ns, _tool("sysctl"), "-q", "-w", f"{key}={value}"], f"sysctl {key}")
        await _run(
            [ip, "-n", self.name, "route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", "main"],
            "the local route",
        )
        iptables = _tool("iptables")
        await _run([*ns, iptables, "-w", "-F"], "flushing filter")
        await _run([*ns, iptables, "-w", "-t", "nat", "-F"], "flushing nat")
        for rule in rules(self.subnet):
            await _run([*ns, iptables, "-w", *rule], "a gateway rule")
        log.info("capture gateway namespace %s ready (%s, gateway %s)", self.name, self.subnet, self.gateway)

    async def delete(self) -> None:
        code, out = await run_command([_tool("ip"), "netns", "delete", self.name])
        if code != 0:
            log.info("removing namespace %s: %s", self.name, out)

    def run_inside(self, work: Callable[[], T]) -> T:
        """``work()`` on this thread after entering the namespace (blocking; call on a thread of its own, which
        is left in the namespace only while ``work`` runs). Sockets made keep the namespace."""
        return run_in(self.path, work)

    async def inspect(self) -> dict[str, str]:
        """What the namespace holds, as the tools print it (tests and `sandtrap` diagnostics)."""
        ip, iptables = _tool("ip"), _tool("iptables")
        ns = [ip, "netns", "exec", self.name]
        out: dict[str, str] = {}
        for key, argv in (
            ("links", [ip, "-n", self.name, "-o", "link"]),
            ("addresses", [ip, "-n", self.name, "-o", "addr"]),
            ("routes", [ip, "-n", self.name, "route", "show", "table", "all"]),
            ("filter", [*ns, iptables, "-w", "-S"]),
            ("nat", [*ns, iptables, "-w", "-t", "nat", "-S"]),
            ("ip_forward", [*ns, "cat", "/proc/sys/net/ipv4/ip_forward"]),
        ):
            out[key] = await _run(argv, f"reading {key}")
        return out

    # -- one box's link ---------------------------------------------------------------------------------

    async def attach(self, pid: int, index: int, address: str) -> str:
        """A veth pair: ``eth0`` in the network namespace of process ``pid`` with ``address`` and a default route
        via the gateway, ``sg<index>`` here. Returns the gateway side's name."""
        ip, nsenter = _tool("ip"), _tool("nsenter")
        link = f"{LINK_PREFIX}{index}"
        temp = f"sb{secrets.token_hex(5)}"
        prefix = ipaddress.IPv4Network(self.subnet).prefixlen
        mac = "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))  # a KVM guest's NIC, as clouds have
        here = [ip, "-n", self.name]
        await _run([*here, "link", "add", link, "type", "veth", "peer", "name", temp, "netns", str(pid)], "the veth")
        try:
            box = [nsenter, "-t", str(pid), "-n", ip]
            await _run([*box, "link", "set", temp, "name", "eth0", "address", mac], "naming eth0")
            await _run([*box, "addr", "add", f"{address}/{prefix}", "dev", "eth0"], "eth0's address")
            await _run([*box, "link", "set", "eth0", "up"], "eth0 up")
            await _run([*box, "route", "add", "default", "via", self.gateway, "dev", "eth0"], "the default route")
            # ICMP datagram sockets for every group, as the engine sets for its own networks: a user's ping
            # (without CAP_NET_RAW) reaches the gateway, which answers for any address.
            sysctl = [nsenter, "-t", str(pid), "-n", _tool("sysctl"), "-q", "-w"]
            await _run([*sysctl, "net.ipv4.ping_group_range=0 2147483647"], "ping_group_range")
            await _run([*here, "addr", "add", f"{self.gateway}/32", "dev", link], "the gateway's address")
            await _run([*here, "link", "set", link, "up"], "the gateway's link up")
            await _run([*here, "route", "replace", f"{address}/32", "dev", link, "src", self.gateway], "the box route")
        except BaseException:
            with contextlib.suppress(Exception):
                await run_command([*here, "link", "del", link])
            raise
        return link

    async def links(self) -> set[str]:
        out = await _run([_tool("ip"), "-n", self.name, "-o", "link"], "listing links")
        names = set()
        for line in out.splitlines():
            parts = line.split(":", 2)
            if len(parts) > 1:
                names.add(parts[1].strip().split("@", 1)[0])
        return names


def packet_socket(link: str) -> socket.socket:
    """An AF_PACKET socket on ``link`` seeing both directions (made inside the namespace)."""
    eth_p_all = 0x0003
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.htons(eth_p_all))
    try:
        sock.bind((link, eth_p_all))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def run_in(path: str, work: Callable[[], T]) -> T:
    """``work()`` on this thread inside the network namespace at ``path`` (a bind mount or /proc/<pid>/ns/net),
    then back in this thread's own (blocking: call on a thread of its own)."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
        finally:
            os.close(target)
        try:
            return work()
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:  # pragma: no cover - the thread then must not be reused
                raise SystemExit("could not leave the gateway's namespace")
    finally:
        os.close(own)
