"""Whether a box's service answers from outside the box: read from the box's ``/proc/net/{tcp,udp}[6]``.

A raw service's connection from a client off loopback is made to the box's eth0 address from the client's own
address (:mod:`sandtrap.sandbox.host.relay`), so the service in the box sees the attacker as a server would. That
reaches only a service bound to the wildcard or to that address; one bound to 127.0.0.1 alone is reached as
before, from the box's own loopback. The tables are the kernel's (``/proc/<box pid>/net/...`` shows the box's
network namespace), parsed here without trusting anything in them: a line that does not parse is skipped.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sandtrap.sandbox.base import ClientAddress
from sandtrap.sandbox.host import netns, relay
from sandtrap.sandbox.host.boxwire import BrokerError

log = logging.getLogger(__name__)
_noted: set[str] = set()


def _note(reason: str) -> None:
    """Why a raw service's client off loopback shows as 127.0.0.1 in the box: logged once per reason."""
    if reason not in _noted:
        _noted.add(reason)
        log.warning("raw services: clients off loopback show as 127.0.0.1 in the box: %s", reason)


TCP_LISTEN = "0A"
UDP_UNCONNECTED = "07"


def _address(hex_addr: str) -> str | None:
    """A /proc/net address (the kernel's 32-bit words in host order) as text; None if it does not parse."""
    try:
        raw = bytes.fromhex(hex_addr)
        if len(raw) == 4:
            return socket.inet_ntop(socket.AF_INET, struct.pack("=I", struct.unpack(">I", raw)[0]))
        if len(raw) == 16:
            words = struct.unpack(">4I", raw)
            return socket.inet_ntop(socket.AF_INET6, struct.pack("=4I", *words))
    except (ValueError, struct.error, OSError):
        return None
    return None


def bound(table: str, port: int, transport: str) -> list[str]:
    """The local addresses of the sockets that listen (TCP) or are bound and unconnected (UDP) on ``port``, from
    the text of one ``/proc/net`` table."""
    state = TCP_LISTEN if transport == "tcp" else UDP_UNCONNECTED
    out = []
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or fields[3] != state:
            continue
        addr, _, port_hex = fields[1].partition(":")
        try:
            if int(port_hex, 16) != port:
                continue
        except ValueError:
            continue
        text = _address(addr)
        if text is not None:
            out.append(text)
    return out


def answers_outside(addresses: list[str], box_address: str) -> bool:
    """Whether a socket bound to one of ``addresses`` gets a connection to ``box_address`` (IPv4): the wildcard,
    the address itself, or IPv6's wildcard (dual-stack unless the socket says v6only, which /proc does not show)."""
    for text in addresses:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            continue
        if ip.is_unspecified or text == box_address:
            return True
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None and str(ip.ipv4_mapped) == box_address:
            return True
    return False


def read_tables(pid: int, transport: str) -> str:
    """The box's table for ``transport``, IPv4 and IPv6 together (a missing one reads as empty)."""
    parts = []
    for name in (transport, f"{transport}6"):
        try:
            parts.append(Path(f"/proc/{pid}/net/{name}").read_text(errors="replace"))
        except OSError:
            continue
    # Each table has its header line: keep the second's lines after the first's.
    lines: list[str] = []
    for part in parts:
        lines += part.splitlines()[1:]
    return "\n".join(["header", *lines])


def reachable_outside(pid: int, port: int, transport: str, box_address: str) -> bool:
    """Whether the box's service on ``port`` answers a connection to its eth0 ``box_address`` (blocking: reads
    two small files of /proc)."""
    return answers_outside(bound(read_tables(pid, transport), port, transport), box_address)


@dataclass(frozen=True, slots=True)
class Route:
    """How the client end of a box's connection is made: the box's PID 1 (and the check it is still that box's),
    its eth0 address, why the host cannot hold a transparent socket ('' = it can), and the capture gateway's
    namespace ('' = none: the host's transparent socket)."""

    pid: int
    is_same_box: Callable[[], bool]
    box_address: str
    transparent_refused: str
    gateway_netns: str = ""


async def open_as_client(
    route: Route, port: int, transport: str, client: ClientAddress, box: str
) -> socket.socket | None:
    """The connection a server would get: from the client's address and port to the box's eth0 ``port`` (made as a
    login's connection in the box is, see relay.py); None (logged once per reason) when that cannot be, or when the
    service listens on the box's loopback only: the caller then connects from the box's 127.0.0.1."""
    planned = relay.plan(client, route.box_address, route.transparent_refused, route.gateway_netns, port, transport)
    if isinstance(planned, str):
        _note(planned)
        return None
    if not await asyncio.to_thread(reachable_outside, route.pid, port, transport, route.box_address):
        log.debug("%s: the box's %s port %d answers on its loopback only", box, transport, port)
        return None
    try:
        if planned.netns:
            return await netns.in_box_netns(
                route.pid,
                route.is_same_box,
                lambda: relay.connect_in_box(planned),
                f"the box's {transport} port {port} from the gateway",
                relay.CONNECT_TIMEOUT_S + 1,
                planned.netns,
            )
        return await relay.connect_transparent(planned)
    except (OSError, TimeoutError, BrokerError) as exc:
        _note(f"connecting to a box's service from the client's address failed ({type(exc).__name__})")
        log.debug("%s: %s %s -> %s:%d: %r", box, transport, planned.peer, route.box_address, port, exc)
        return None
