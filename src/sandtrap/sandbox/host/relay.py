"""The login's own TCP connection in the box (``sandbox.connection_in_box``).

On a real server ``ss -tnp`` shows the attacker's connection: server end :22, held by ``sshd: USER [priv]``,
peer the attacker's address and source port (what SSH_CONNECTION says). The attacker's SSH ends at the
honeypot, so for each login started by the box's listener the honeypot makes a TCP connection of its own to
the box's :22, from the attacker's address and port, and the login's worker holds the server end while the
session lasts (``box/relay.c``: how the listener tells it from genuine connections to its sshd). Nothing is ever
sent on it; the honeypot closes its end when the session ends, the worker when its process exits.

Where the client end lives:

* a client on 127.0.0.0/8 (or ::1): inside the box's network namespace (the broker's thread enters it),
  bound to the client's address and port, connected to the server address SSH_CONNECTION names (when on
  loopback, else 127.0.0.1). All of 127/8 is local on the box's ``lo``, so both ends show, as on a server
  a local client reached.
* any other IPv4 client, with ``network.mode: capture``: inside the capture gateway's namespace (the box's only
  peer), bound to the client's address (every address is the gateway's own there, ``ip_nonlocal_bind``),
  connected to the box's ``eth0`` address; the box's replies go to its default route, the gateway, whose
  local delivery hands them to that socket (a reply of a connection the gateway opened is not redirected).
* any other IPv4 client, with ``network.mode: internal``: on the host, an ``IP_TRANSPARENT`` socket
  bound to the client's address and port, connected to the box's ``eth0`` address. The box answers its
  default gateway, the host's bridge; :func:`open_reply_path` delivers those replies to that socket and to
  nothing else: mangle PREROUTING marks a packet from the bridge only when it belongs to a transparent
  socket of the host (``-m socket --transparent``, from port 22), a policy route sends marked packets to
  ``lo`` (local delivery), and INPUT accepts them, before the bridge's DROP, only as replies of a connection
  the host opened (conntrack ESTABLISHED). Everything else the box sends the host is still dropped: no
  listening socket is matched, and no packet the box starts is accepted.

Anything unavailable (not root, no ``xt_socket``, ``network: none`` with a non-loopback client, IPv6) is
logged once and the session goes on without the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import shutil
import socket
from dataclasses import dataclass

from sandtrap.sandbox.base import ClientAddress
from sandtrap.sandbox.host.commands import run_command

log = logging.getLogger(__name__)

SSH_PORT = 22
MARK = 0x5354  # "ST": the box's replies to a relay socket
TABLE = 21332  # the policy route's table (0x5354)
CONNECT_TIMEOUT_S = 2.0
IP_TRANSPARENT = 19  # linux/in.h (socket.IP_TRANSPARENT is missing before Python 3.12 on some builds)
_noted: set[str] = set()


@dataclass(frozen=True, slots=True)
class RelayPlan:
    """The connection to make: from ``src_ip``:``src_port`` to ``server_ip``:22, in the box's network namespace
    (``in_box``) or from the host by a transparent socket."""

    src_ip: str
    src_port: int
    server_ip: str
    in_box: bool
    netns: str = ""  # not in_box: the named namespace the client end is made in ('' = the host's, transparent)
    server_port: int = SSH_PORT  # the box's port: 22 for a login's, a raw service's target port
    transport: str = "tcp"  # "udp" for a raw UDP service's peer

    @property
    def peer(self) -> str:
        """What the listener is told to expect ("ADDR PORT", see listener.c)."""
        return f"{self.src_ip} {self.src_port}"


def note(reason: str) -> None:
    """Why a login has no connection in its box: logged once per reason (the next logins say nothing)."""
    if reason not in _noted:
        _noted.add(reason)
        log.warning("logins show no TCP connection in the box: %s", reason)


def plan(
    client: ClientAddress,
    box_address: str,
    transparent_refused: str,
    netns: str = "",
    server_port: int = SSH_PORT,
    transport: str = "tcp",
) -> RelayPlan | str:
    """Where the login's connection (or a raw service's, to ``server_port`` over ``transport``) comes from, or why
    it cannot be made.

    ``box_address``: the box's eth0 address ('' = none); ``transparent_refused``: why the host cannot hold a
    transparent socket for it ('' = it can)."""
    try:
        ip = ipaddress.ip_address(client.ip)
    except ValueError:
        return f"{client.ip!r} is not an IP address"
    if not 0 < client.port < 65536:
        return f"port {client.port} is not a TCP port"
    if ip.is_loopback:
        try:
            server = ipaddress.ip_address(client.server_ip)
        except ValueError:
            server = None
        if server is None or not server.is_loopback or server.version != ip.version:
            server = ipaddress.ip_address("127.0.0.1" if ip.version == 4 else "::1")
        return RelayPlan(str(ip), client.port, str(server), True, "", server_port, transport)
    if ip.version != 4:
        return "an IPv6 client (the box's network is IPv4 only)"
    if not box_address:
        return "a client off loopback and a box without eth0 (sandbox.network: none)"
    if transparent_refused:
        return transparent_refused
    return RelayPlan(str(ip), client.port, box_address, False, netns, server_port, transport)


def _family(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def connect_in_box(p: RelayPlan) -> socket.socket:
    """The client end, made on a thread that has entered the box's network namespace, or the capture gateway's
    (blocking, bounded)."""
    sock = socket.socket(_family(p.src_ip), _kind(p.transport) | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _bind_client(sock, p)
        sock.settimeout(CONNECT_TIMEOUT_S)
        sock.connect((p.server_ip, p.server_port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def connect_transparent(p: RelayPlan) -> socket.socket:
    """The client end on the host: a transparent socket with the client's address (needs CAP_NET_ADMIN)."""
    sock = socket.socket(socket.AF_INET, _kind(p.transport) | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _bind_client(sock, p)
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            await asyncio.get_running_loop().sock_connect(sock, (p.server_ip, p.server_port))
    except BaseException:
        sock.close()
        raise
    return sock


def _kind(transport: str) -> socket.SocketKind:
    return socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM


def _bind_client(sock: socket.socket, p: RelayPlan) -> None:
    """The client's address and port; a raw service's connection takes the address alone when the port is
    taken (a login's must be exact: the box's listener matches it)."""
    try:
        sock.bind((p.src_ip, p.src_port))
    except OSError:
        if p.server_port == SSH_PORT and p.transport == "tcp":
            raise
        sock.bind((p.src_ip, 0))


def connect_port(port: int, transport: str, client: ClientAddress | None) -> socket.socket:
    """A socket to the box's 127.0.0.1:``port`` (a raw service's), made on a thread that has entered the box's
    network namespace. A loopback client's address (and port, when free in the box) is its source, so the service
    in the box sees the attacker's own address, as sshd's logins do; any other client shows as 127.0.0.1."""
    kind = socket.SOCK_STREAM if transport == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(socket.AF_INET, kind | socket.SOCK_CLOEXEC)
    try:
        src = client.ip if client is not None and _is_loopback_v4(client.ip) else ""
        if src:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((src, client.port if client is not None else 0))
            except OSError:  # the port is taken in the box: the address alone
                sock.bind((src, 0))
        sock.settimeout(CONNECT_TIMEOUT_S)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8 or ::1 (what is not an address is not loopback)."""
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def _is_loopback_v4(ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return addr.version == 4 and addr.is_loopback


# --- the host's rules for the transparent path -------------------------------------------------------


# Any port and TCP or UDP: a login's :22 and the raw services' ports. Only a packet that belongs to a transparent
# socket of the host (the relay's, nothing else is transparent) is marked, and only as a reply it is accepted.
def mangle_rule(bridge: str) -> list[str]:
    return [
        "PREROUTING", "-i", bridge, "-m", "socket", "--transparent",
        "-j", "MARK", "--set-xmark", f"{MARK:#x}/0xffffffff",
    ]  # fmt: skip


def input_rule(bridge: str) -> list[str]:
    return [
        "INPUT", "-i", bridge, "-m", "mark", "--mark", f"{MARK:#x}",
        "-m", "conntrack", "--ctstate", "ESTABLISHED", "-j", "ACCEPT",
    ]  # fmt: skip


def older_rules(bridge: str) -> list[tuple[list[str], list[str]]]:
    """An older version's rules for :22 only (``-p tcp --sport 22``), as (table args, rule): replaced by the rules
    above, so the host keeps one set."""
    mangle = ["PREROUTING", "-i", bridge, "-p", "tcp", "--sport", str(SSH_PORT), *mangle_rule(bridge)[3:]]
    accept = ["INPUT", "-i", bridge, "-p", "tcp", "--sport", str(SSH_PORT), *input_rule(bridge)[3:]]
    return [(["-t", "mangle"], mangle), ([], accept)]


def accept_first(listing: str, bridge: str) -> bool:
    """Whether ``iptables -S INPUT`` has the relay's ACCEPT before the bridge's DROP (and both there)."""
    lines = listing.splitlines()
    rule = " ".join(["-A", *input_rule(bridge)])  # as `iptables -S` prints it (an older --sport 22 one is not it)
    accept = next((i for i, x in enumerate(lines) if x == rule), -1)
    drop = next((i for i, x in enumerate(lines) if x == f"-A INPUT -i {bridge} -j DROP"), -1)
    return 0 <= accept < drop


async def open_reply_path(bridge: str) -> str:
    """The rules that deliver the box's replies to the host's relay sockets (idempotent); '' when they are in
    place, else why not (the caller logs it; logins then go on without the connection). Run after
    :func:`sandtrap.sandbox.docker.network.close_host_path` (the ACCEPT goes before its DROP)."""
    fix = "or set sandbox.connection_in_box: false"
    iptables = shutil.which("iptables") or shutil.which("iptables", path="/usr/sbin:/sbin")
    ip = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin")
    if iptables is None or ip is None:
        return f"sandbox.connection_in_box: iptables and ip are needed. Fix: apt-get install iptables iproute2, {fix}"
    mangle = ["-t", "mangle"]
    for table, rule in older_rules(bridge):
        while (await run_command([iptables, "-w", *table, "-D", *rule]))[0] == 0:
            pass
    if (await run_command([iptables, "-w", *mangle, "-C", *mangle_rule(bridge)]))[0] != 0:
        code, out = await run_command([iptables, "-w", *mangle, "-I", "PREROUTING", "1", *mangle_rule(bridge)[1:]])
        if code != 0:
            return (
                f"sandbox.connection_in_box: adding 'iptables -t mangle ... -m socket --transparent' failed ({out}). "
                f"Fix: run sandtrap as root with the xt_socket module (modprobe xt_socket), {fix}"
            )
    code, listing = await run_command([iptables, "-w", "-S", "INPUT"])
    if code != 0 or not accept_first(listing, bridge):
        while (await run_command([iptables, "-w", "-D", *input_rule(bridge)]))[0] == 0:
            pass
        code, out = await run_command([iptables, "-w", "-I", "INPUT", "1", *input_rule(bridge)[1:]])
        if code != 0:
            return f"sandbox.connection_in_box: adding the INPUT rule for the relay failed ({out}). Fix: run as root, {fix}"
    code, rules = await run_command([ip, "-4", "rule", "show"])
    if f"fwmark {MARK:#x} lookup {TABLE}" not in rules:
        code, out = await run_command([ip, "-4", "rule", "add", "fwmark", f"{MARK:#x}", "lookup", str(TABLE)])
        if code != 0:
            return f"sandbox.connection_in_box: 'ip rule add fwmark' failed ({out}). Fix: run as root, {fix}"
    code, out = await run_command(
        [ip, "-4", "route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", str(TABLE)]
    )
    if code != 0:
        return f"sandbox.connection_in_box: the local route of table {TABLE} failed ({out}). Fix: run as root, {fix}"
    log.info("the boxes' replies to the honeypot's transparent sockets are delivered (mark %#x, table %d)", MARK, TABLE)
    return ""


def close_quietly(sock: socket.socket | None) -> None:
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()
