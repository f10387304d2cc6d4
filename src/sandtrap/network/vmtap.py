"""The capture gateway on a micro-VM's tap: the gateway's rules and listeners inside that VM's own namespace.

A micro-VM's QEMU runs in a network namespace of its own (``unshare --net``, sandbox/microvm/qemu.py) that holds
``lo`` and the tap, whose host side (the subnet's first address) is the guest's default route. Every VM's guest
has the same address, and nothing may be forwarded or NATed out of that namespace, so the gateway comes to the
VM instead of the VM to the gateway's namespace: right after QEMU starts, :func:`prepare` gives the VM's
namespace the same settings and rules the gateway's own has (:func:`.namespace.rules` on the tap):

* ``local 0.0.0.0/0 dev lo`` in the main table: every address the guest sends to is local (the tap's subnet
  route is longer and still reaches the guest), so the kernel answers ICMP echo for any address;
* ``nat PREROUTING -i tap0``: UDP to port 53 REDIRECTed to the gateway's DNS socket, every TCP connection to
  the gateway's one listener, both made in that namespace by the gateway and served on its event loop;
* ``FORWARD DROP``, ``ip_forward=0``, IPv6 off, ``rp_filter=1``, INPUT from the tap only from its subnet.

The namespace still has no interface but ``lo`` and the tap: there is nowhere to route to. The relay's connection
to the guest's sshd (made in the same namespace, from the attacker's address) is the namespace's own outgoing
connection: the REDIRECT (PREROUTING, new connections from the tap) never sees it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from dataclasses import dataclass

from sandtrap.network.namespace import NetworkError, rules
from sandtrap.sandbox.host.commands import run_command

log = logging.getLogger(__name__)

SYSCTLS = (
    ("net.ipv4.ip_forward", "0"),
    ("net.ipv6.conf.all.disable_ipv6", "1"),
    ("net.ipv6.conf.default.disable_ipv6", "1"),
    ("net.ipv4.conf.all.rp_filter", "1"),
    ("net.ipv4.conf.default.rp_filter", "1"),
    ("net.ipv4.conf.all.send_redirects", "0"),
    ("net.ipv4.icmp_echo_ignore_all", "0"),
)


@dataclass(frozen=True)
class VMNet:
    """What the gateway needs to know of a VM's namespace (the same for every VM of a sensor)."""

    tap: str  # the tap's name, e.g. tap0
    guest: str  # the guest's address, e.g. 10.20.1.13
    subnet: str  # the tap's subnet, e.g. 10.20.1.0/24


NS_WAIT_S = 10.0


async def pin_namespace(pid: int, tap: str, vm: str) -> int:
    """An open fd on QEMU ``pid``'s network namespace, once it is not ours and holds ``tap``.

    QEMU is started by ``unshare --net`` and a script that makes the tap: right after the start the process may
    not have left sandtrap's own namespace yet, and no rule may ever be applied there. The fd keeps that very
    namespace for every command and socket after (``/proc/self/fd/N``), whatever becomes of the pid."""
    own = os.stat("/proc/self/ns/net").st_ino
    deadline = time.monotonic() + NS_WAIT_S
    while (fd := _ready(pid, tap, own, vm)) is None:
        if time.monotonic() > deadline:
            raise NetworkError(f"VM {vm}: QEMU {pid} has no namespace of its own with {tap} after {NS_WAIT_S:.0f}s")
        await asyncio.sleep(0.05)
    return fd


def _ready(pid: int, tap: str, own: int, vm: str) -> int | None:
    """An fd on ``pid``'s namespace if it is not ``own`` and holds ``tap`` (procfs only: no waiting)."""
    try:
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NetworkError(f"VM {vm}: QEMU {pid} is gone before its network was set up ({exc})") from exc
    try:
        with open(f"/proc/{pid}/net/dev", encoding="ascii", errors="replace") as f:
            has_tap = any(line.strip().startswith(f"{tap}:") for line in f)
    except OSError:
        has_tap = False
    if os.fstat(fd).st_ino != own and has_tap:
        return fd
    os.close(fd)
    return None


def fd_path(fd: int) -> str:
    return f"/proc/{os.getpid()}/fd/{fd}"


async def _run(argv: list[str], what: str, vm: str) -> None:
    code, out = await run_command(argv)
    if code != 0:
        raise NetworkError(
            f"network.mode capture: {what} in VM {vm}'s namespace failed ({' '.join(argv)}: {out}). Fix: run "
            "sandtrap as root, or set network.mode: none"
        )


async def prepare(netns: str, net: VMNet, vm: str) -> None:
    """The gateway's settings, catch-all route and rules in the VM's network namespace (``netns``: the path of
    the fd :func:`pin_namespace` opened)."""
    tools = {}
    for tool in ("nsenter", "ip", "sysctl", "iptables"):
        path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin")
        if path is None:
            raise NetworkError(f"network.mode: capture needs {tool}. Fix: apt-get install iproute2 iptables util-linux")
        tools[tool] = path
    inside = [tools["nsenter"], f"--net={netns}"]
    for key, value in (*SYSCTLS, (f"net.ipv4.conf.{net.tap}.rp_filter", "1")):
        await _run([*inside, tools["sysctl"], "-q", "-w", f"{key}={value}"], f"sysctl {key}", vm)
    await _run(
        [*inside, tools["ip"], "route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", "main"],
        "the local route",
        vm,
    )
    iptables = [*inside, tools["iptables"], "-w"]
    await _run([*iptables, "-F"], "flushing filter", vm)
    await _run([*iptables, "-t", "nat", "-F"], "flushing nat", vm)
    for rule in rules(net.subnet, net.tap):
        await _run([*iptables, *rule], "a gateway rule", vm)
