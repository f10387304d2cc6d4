"""What the gateway keeps per box and per session, shared by its parts (:mod:`.gateway`, :mod:`.streams`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from sandtrap.network import dns
from sandtrap.network.pcap import PcapWriter


class Writer(Protocol):
    """Where the gateway writes a connection's answers: the stream, or TLS over it."""

    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...
    def close(self) -> None: ...


Emit = Callable[..., object]
Store = Callable[[bytes], Awaitable[tuple[str, str, bool, bool]]]  # data -> (sha256, outfile, stored, duplicate)


@dataclass
class Tap:
    """A session's hold on its box's traffic: where its events and files go, and its counters."""

    session: str
    emit: Emit
    store: Store
    fetches: int = 0
    fetched_bytes: int = 0
    dns_logged: int = 0
    dns_limit_noted: bool = False
    # The session's DNS in sum (a tunnel shows as many long, distinct names; recorded when the session ends)
    dns_queries: int = 0
    dns_dropped: int = 0
    dns_name_bytes: int = 0
    dns_longest: int = 0
    dns_names: set[str] = field(default_factory=set)  # up to DNS_NAMES_KEPT, then counted by name_bytes only
    logged: int = 0  # TCP and HTTP records
    pcap: PcapWriter | None = None
    held: set[Writer] = field(default_factory=set)
    # One fetch at a time per session: the session's byte cap holds, and its memory is one file's.
    fetching: asyncio.Lock = field(default_factory=asyncio.Lock)
    destfile: Callable[[str], str] = lambda url: ""  # url -> the path the box's client wrote it to ('' unknown)


@dataclass
class Box:
    address: str
    link: str
    names: dns.Names
    bucket: dns.Bucket
    connections: int = 0
    tap: Tap | None = None
    # FTP passive data connections the box was told to open: (address, port) -> where to hand the connection.
    passive: dict[tuple[str, int], asyncio.Future[DataChannel]] = field(default_factory=dict)
    tftp: set[tuple[int, str]] = field(default_factory=set)  # transfers under way: (client port, file)
    netns: str = ""  # the namespace ``link`` is in: '' the gateway's own, else a micro-VM's (/proc/<pid>/ns/net)


@dataclass
class DataChannel:
    """A box's FTP data connection, held by the control connection that expected it until ``done``."""

    reader: asyncio.StreamReader
    writer: Writer
    done: asyncio.Event = field(default_factory=asyncio.Event)
