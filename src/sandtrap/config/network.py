"""``network``: the box's network, whatever the backend (README "Network").

``mode`` picks what a box gets: ``none`` (only ``lo``), ``internal`` (the Docker backend's engine network whose
gateway drops everything) or ``capture`` (an ``eth0`` whose only peer is sandtrap's capture gateway, in a network
namespace sandtrap owns: DNS, HTTP, other TCP and ICMP answered there, recorded, nothing routed or NATed out).
``egress`` decides whether the sensor fetches what a box asks for, from where, and how much.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

from pydantic import Field, field_validator

from sandtrap.config.values import ByteSize, Section, box_subnet, parse_size

# Where the gateway's names point by default: ranges of large cloud, hosting and CDN providers (AWS, Google Cloud,
# Azure, DigitalOcean, OVH, Hetzner, Linode, Cloudflare, Fastly), each as likely as the next, so a box's answers
# look like the internet's mix rather than one provider's block (a single range was a tell).
ANSWER_RANGES = (
    "3.208.0.0/12",
    "52.0.0.0/11",
    "54.144.0.0/12",
    "34.64.0.0/10",
    "35.184.0.0/13",
    "20.64.0.0/10",
    "159.89.0.0/16",
    "167.99.0.0/16",
    "134.209.0.0/16",
    "51.75.0.0/16",
    "51.178.0.0/16",
    "95.216.0.0/15",
    "65.108.0.0/15",
    "172.104.0.0/15",
    "139.162.0.0/16",
    "104.16.0.0/13",
    "151.101.0.0/16",
)

# Keys of earlier versions' ``sandbox`` section that now sit here.
MOVED_NETWORK_KEYS = {"sandbox.network": "network.mode", "sandbox.network_subnet": "network.subnet"}


def _cidr(v: str) -> str:
    try:
        return str(ipaddress.ip_network(v, strict=False))
    except ValueError as exc:
        raise ValueError(f"{v!r} is not an address range such as 127.0.0.1/32 ({exc})") from None


class EgressSettings(Section):
    """``network.egress``: what leaves the sensor on a box's behalf (only ever the sensor's own requests)."""

    fetch: bool = Field(
        False,
        description="true: a box's HTTP GET/HEAD is fetched by the sensor from the real internet (its own "
        "address) and the bytes served to the box and stored; false: a sinkhole (a plausible 404, the URL "
        "recorded as a failed download). Off by default: a fetch is a request from the sensor's address that "
        "the attacker wrote (many exploits are a single GET); turn it on knowingly (README Network)",
    )
    allow: list[str] = Field(
        default_factory=list,
        description="CIDRs the fetcher may reach although they are private, loopback or link-local (never "
        "otherwise); empty by default",
    )
    hosts: dict[str, str] = Field(
        default_factory=dict,
        description="name -> address the fetcher uses before DNS (tests point names at their servers)",
    )
    max_file_bytes: ByteSize = Field(parse_size("32m"), description="a larger download is cut and recorded failed")
    max_session_bytes: ByteSize = Field(parse_size("128m"), description="all downloads of one session")
    max_fetches: int = Field(20, ge=0, description="downloads fetched per session; more are sinkholed")
    timeout_s: float = Field(60.0, gt=0, le=3600, description="one download, redirects included")
    max_redirects: int = Field(5, ge=0, le=20, description="redirects followed (each checked and recorded)")

    @field_validator("allow")
    @classmethod
    def _allow(cls, v: list[str]) -> list[str]:
        return [_cidr(x) for x in v]

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: dict[str, str]) -> dict[str, str]:
        out = {}
        for name, addr in v.items():
            try:
                out[name.lower().rstrip(".")] = str(ipaddress.ip_address(addr))
            except ValueError:
                raise ValueError(f"{name}: {addr!r} is not an IP address") from None
        return out


class DnsSettings(Section):
    """``network.dns``: the gateway's resolver, which answers every name that could exist."""

    answer_subnet: list[str] = Field(
        default_factory=lambda: list(ANSWER_RANGES),
        description="the address ranges names resolve to (one range or a list; a name keeps one address for a "
        "box's life; never routed anywhere: every packet ends in the gateway). The default spreads names over "
        "ranges of large hosting and CDN providers, as real names are; tests use 198.18.0.0/15",
    )
    queries_per_s: float = Field(20.0, gt=0, description="per box; a flood above it is dropped (and counted)")
    burst: int = Field(100, ge=1, description="queries a box may send at once before the rate applies")
    max_logged: int = Field(500, ge=0, description="queries recorded per session; the rest are counted")

    @field_validator("answer_subnet", mode="before")
    @classmethod
    def _one_or_more(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    @field_validator("answer_subnet")
    @classmethod
    def _answers(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("needs at least one range, e.g. 198.18.0.0/15")
        out = []
        for item in v:
            net = ipaddress.ip_network(_cidr(item))
            if net.version != 4 or net.prefixlen > 24:
                raise ValueError(f"{item!r}: use IPv4 ranges of /24 or larger, e.g. 198.18.0.0/15")
            out.append(str(net))
        return out


class PcapSettings(Section):
    """``network.pcap``: one capture file per session of what its box sent and received."""

    enabled: bool = True
    max_bytes: ByteSize = Field(parse_size("16m"), description="per session; packets past it are counted, not written")
    snaplen: int = Field(2048, ge=64, le=65535, description="bytes kept of each packet")


class NetworkSettings(Section):
    """``network``: what a box's network is and what its traffic may reach."""

    mode: Literal["none", "internal", "capture"] = Field(
        "capture",
        description="none: only lo; capture: eth0 whose only peer is sandtrap's capture gateway (DNS, HTTP, any "
        "TCP, ping answered and recorded, nothing routed out; needs root on the engine's host); internal: the "
        "Docker backend's engine network that drops everything (README Network)",
    )
    subnet: str = Field("10.20.1.0/24", description="the boxes' subnet (the gateway: its first address)")
    namespace: str = Field("", description="capture: the gateway's network namespace; '' = sandtrap-<sensor hash>")
    http_server: str = Field("nginx", description="capture: the Server header of the gateway's own HTTP answers")
    tls_intercept: bool = Field(
        True,
        description="capture: boxes trust a per-sensor CA (planted as a local CA and in the bundle) and the "
        "gateway speaks HTTPS with a certificate for each name; false: TLS is held as any other TCP",
    )
    max_connections: int = Field(64, ge=1, le=4096, description="capture: TCP connections one box holds at once")
    max_record_bytes: ByteSize = Field(parse_size("64k"), description="capture: bytes of a non-HTTP stream recorded")
    max_logged: int = Field(
        2000, ge=0, description="capture: TCP and HTTP records per session (a port scan is counted past it)"
    )
    direct_tcpip: Literal["refuse", "capture"] = Field(
        "refuse",
        description="refuse: an SSH client's port-forwarding request (direct-tcpip) is refused as sshd with "
        "AllowTcpForwarding no; capture: answered by the capture gateway as the box's own connection to that "
        "address would be (HTTP, TLS, FTP, held TCP; recorded), nothing connected anywhere (Cowrie's forward "
        "redirect, always to the gateway); loopback destinations stay refused. Recorded either way",
    )
    egress: EgressSettings = EgressSettings()
    dns: DnsSettings = DnsSettings()
    pcap: PcapSettings = PcapSettings()

    @field_validator("subnet")
    @classmethod
    def _subnet(cls, v: str) -> str:
        return box_subnet(v)

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        if v and not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,30}", v):
            raise ValueError("must be a network namespace name (letters, digits, '_', '.', '-')")
        return v
