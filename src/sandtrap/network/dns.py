"""The gateway's resolver: every name that could exist resolves, the same way for a box's whole life.

A name gets an address in one of ``network.dns.answer_subnet``'s ranges drawn from a keyed hash (the key is the box's, so two
boxes see different addresses for a name, one box always the same); a name that could not exist (a label
over 63 bytes, characters DNS names never have, a top-level domain no registry has) gets NXDOMAIN, as a real
resolver would answer. Each box's queries pass a token bucket: a flood, or a tunnel pushing data out through
query names, is dropped past the rate and counted, and every query is recorded (up to ``max_logged``).

Wire format by dnslib; every datagram is hostile: a malformed one is counted and dropped.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import time
from dataclasses import dataclass, field

from dnslib import QTYPE, RCODE, RR, A, DNSError, DNSRecord

# Top-level domains that exist (the common generic ones; every two-letter code is taken as a country's).
TLDS = frozenset(
    """com net org info biz io co me tv cc xyz top site online club shop app dev cloud tech store live pro
    name mobi asia tel travel jobs museum aero coop edu gov mil int arpa ru cn de uk br fr jp in it nl pl
    su eu onion""".split()
)
LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
TTL = 300


def could_exist(name: str) -> bool:
    name = name.lower().rstrip(".")
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    if len(labels) < 2 or not all(LABEL.fullmatch(x) for x in labels):
        return False
    tld = labels[-1]
    return tld in TLDS or (len(tld) == 2 and tld.isalpha()) or tld.startswith("xn--")


@dataclass
class Names:
    """One box's view of the internet's names: name -> address, and back (for a Host-less request).

    A name's range is drawn first (each range as likely as the next, so a box's names spread over several
    providers as real ones do), then its address in it; both from the box's keyed hash."""

    subnets: tuple[ipaddress.IPv4Network, ...]
    key: bytes
    forward: dict[str, str] = field(default_factory=dict)
    reverse: dict[str, str] = field(default_factory=dict)

    def address(self, name: str) -> str:
        name = name.lower().rstrip(".")
        if name in self.forward:
            return self.forward[name]
        digest = int.from_bytes(hashlib.blake2b(name.encode(), key=self.key[:64], digest_size=16).digest(), "big")
        subnet = self.subnets[(digest >> 64) % len(self.subnets)]
        size = subnet.num_addresses
        for step in range(64):  # avoid the network and broadcast ends and addresses another name has
            offset = (digest + step * 7919) % size
            if offset in (0, size - 1) or (offset & 0xFF) in (0, 255):
                continue
            addr = str(subnet.network_address + offset)
            if addr not in self.reverse:
                break
        if len(self.forward) < 50_000:  # a box cannot grow this without bound
            self.forward[name] = addr
            self.reverse[addr] = name
        return addr


@dataclass
class Bucket:
    rate: float
    burst: float
    tokens: float = -1.0
    stamp: float = 0.0
    dropped: int = 0

    def take(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if self.tokens < 0:
            self.tokens, self.stamp = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.dropped += 1
        return False


@dataclass(frozen=True, slots=True)
class Answer:
    reply: bytes
    name: str
    qtype: str
    rcode: str
    address: str


def answer(query: bytes, names: Names) -> Answer | None:
    """The reply to one query datagram (None: not a query we answer: dropped)."""
    if len(query) > 512 + 1024:
        return None
    try:
        record = DNSRecord.parse(query)
    except (DNSError, ValueError, IndexError, UnicodeError):
        return None
    if record.header.qr or len(record.questions) != 1:
        return None
    q = record.questions[0]
    name = str(q.qname).rstrip(".")
    qtype = QTYPE.get(q.qtype, str(q.qtype))
    reply = record.reply()
    address = ""
    if not could_exist(name):
        reply.header.rcode = RCODE.NXDOMAIN
    elif q.qtype == QTYPE.A or q.qtype == QTYPE.ANY:
        address = names.address(name)
        reply.add_answer(RR(q.qname, QTYPE.A, rdata=A(address), ttl=TTL))
    # Other types (AAAA, MX, TXT...): NOERROR with no answer, as for a name with only an A record.
    return Answer(reply.pack(), name[:255], str(qtype), RCODE.get(reply.header.rcode, "?"), address)
