"""Fetching a URL on a box's behalf (``network.egress.fetch: true``), bounded everywhere.

Every hop (the URL and each redirect) is checked before any socket is opened:

* the scheme is http or https, the method GET or HEAD;
* the name is resolved through ``network.egress.hosts`` first, then the sensor's resolver;
* every address is checked against the policy: private, loopback, link-local, multicast, reserved and
  unspecified addresses, and the sensor's own addresses (a box asking for the sensor's public address would
  reach the sensor's services), are refused unless inside a ``network.egress.allow`` range; a name with any
  refused address is refused as a whole;
* the connection then goes to the checked addresses only (a pinned resolver: no second lookup, so a name
  cannot resolve to a public address for the check and a private one for the connect).

FTP (aioftp, passive: the data connection goes to the checked address whatever a 227 reply names) and TFTP
(:mod:`.tftp`) are fetched the same way, for a box's ``ftpget``/``tftp -g``: the same policy, bounds and time.

Bounds: ``max_file_bytes`` (the body is read in chunks and cut there), ``timeout_s`` for the whole fetch,
``max_redirects`` (each recorded). TLS is verified against the sensor's trust store; a bad certificate fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import aioftp
import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from sandtrap.config import EgressSettings
from sandtrap.network import tftp

CHUNK = 64 * 1024
PASSED_HEADERS = ("user-agent", "accept", "range")


class Refused(Exception):
    """The policy refuses this hop (nothing was connected)."""


class Failed(Exception):
    """The fetch was tried and did not give a file (too large, too slow, a TLS or HTTP error)."""


@dataclass
class Fetched:
    url: str  # the first URL
    final_url: str
    status: int
    body: bytes
    content_type: str
    redirects: list[str] = field(default_factory=list)


def is_own(address: str) -> bool:
    """Whether ``address`` is one of this host's (the kernel lets a socket bind it; nothing is sent)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            return False
    return True


class Policy:
    """Where the fetcher may connect: public addresses, and private ones only inside ``allow``."""

    def __init__(self, egress: EgressSettings) -> None:
        self.allow = [ipaddress.ip_network(x) for x in egress.allow]
        self.hosts = dict(egress.hosts)

    def permits(self, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        if any(ip in net for net in self.allow if net.version == ip.version):
            return True
        if not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_unspecified:
            return False
        return not is_own(str(ip))  # the sensor's own public address: its services are not the internet

    async def resolve(self, host: str) -> list[str]:
        """The addresses the fetcher may connect to for ``host``; :class:`Refused` if any is not allowed."""
        name = host.lower().rstrip(".").strip("[]")
        if not name:
            raise Refused("no host")
        if name in self.hosts:
            addresses = [self.hosts[name]]
        else:
            try:
                addresses = [str(ipaddress.ip_address(name))]
            except ValueError:
                try:
                    infos = await asyncio.get_running_loop().getaddrinfo(name, None, type=socket.SOCK_STREAM)
                except OSError as exc:
                    raise Failed(f"cannot resolve {name}: {exc}") from None
                addresses = sorted({str(info[4][0]) for info in infos})
        refused = [a for a in addresses if not self.permits(a)]
        if refused or not addresses:
            raise Refused(f"{name} resolves to {', '.join(refused) or 'nothing'}: not an allowed destination")
        return addresses


class PinnedResolver(AbstractResolver):
    """Hands aiohttp only the addresses the policy checked for this one host."""

    def __init__(self, host: str, addresses: list[str]) -> None:
        self._host = host
        self._addresses = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host.lower().rstrip(".").strip("[]") != self._host:
            raise OSError(f"{host} was not checked by the policy")
        return [
            ResolveResult(
                hostname=host,
                host=a,
                port=port,
                family=socket.AF_INET6 if ":" in a else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for a in self._addresses
        ]

    async def close(self) -> None:
        return None


class _FtpClient(aioftp.Client):
    """aioftp's client, keeping every connection it opens: a data connection opened before a refused RETR is
    not closed by aioftp; the fetch closes them all."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.opened: list[asyncio.StreamWriter] = []

    async def _open_connection(self, host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await super()._open_connection(host, port)
        self.opened.append(writer)
        return reader, writer

    async def close_all(self) -> None:
        for writer in self.opened:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class Fetcher:
    def __init__(self, egress: EgressSettings) -> None:
        self.egress = egress
        self.policy = Policy(egress)

    async def fetch(self, method: str, url: str, headers: dict[str, str], max_bytes: int) -> Fetched:
        """GET or HEAD ``url`` (redirects followed and checked); :class:`Refused` or :class:`Failed` otherwise."""
        if method not in ("GET", "HEAD"):
            raise Refused(f"method {method} is not fetched (GET and HEAD only)")
        sent = {k: v for k, v in headers.items() if k.lower() in PASSED_HEADERS}
        redirects: list[str] = []
        current = url
        try:
            async with asyncio.timeout(self.egress.timeout_s):
                while True:
                    status, location, body, ctype = await self._hop(method, current, sent, max_bytes)
                    if location is None:
                        return Fetched(url, current, status, body, ctype, redirects)
                    if len(redirects) >= self.egress.max_redirects:
                        raise Failed(f"more than {self.egress.max_redirects} redirects")
                    current = urljoin(current, location)
                    redirects.append(current)
        except TimeoutError:
            raise Failed(f"timed out after {self.egress.timeout_s:g} s") from None

    async def _hop(
        self, method: str, url: str, headers: dict[str, str], max_bytes: int
    ) -> tuple[int, str | None, bytes, str]:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise Refused(f"scheme {parts.scheme!r} is not fetched")
        host = (parts.hostname or "").lower()
        addresses = await self.policy.resolve(host)  # Refused here: nothing connected
        connector = aiohttp.TCPConnector(resolver=PinnedResolver(host, addresses), limit=1, force_close=True)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(15.0, self.egress.timeout_s))
        try:
            async with (
                aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session,
                session.request(
                    method, url, headers=headers, allow_redirects=False, max_line_size=8190, max_field_size=8190
                ) as response,
            ):
                if response.status in (301, 302, 303, 307, 308) and "Location" in response.headers:
                    return response.status, response.headers["Location"], b"", ""
                body = bytearray()
                async for chunk in response.content.iter_chunked(CHUNK):
                    body += chunk
                    if len(body) > max_bytes:
                        raise Failed(f"larger than {max_bytes} bytes")
                return response.status, None, bytes(body), response.headers.get("Content-Type", "")
        except aiohttp.ClientError as exc:
            raise Failed(f"{type(exc).__name__}: {exc}") from None
        except (OSError, ValueError) as exc:
            raise Failed(f"{type(exc).__name__}: {exc}") from None

    async def fetch_ftp(self, host: str, path: str, user: str, password: str, max_bytes: int) -> bytes:
        """RETR ``path`` from ``host``'s FTP server (port 21), logged in as the box's client was."""
        if any(ord(c) < 32 or ord(c) == 127 for c in path + user + password):
            raise Refused("ftp: a control character in the path or login (never sent on)")
        address = (await self.policy.resolve(host))[0]  # Refused here: nothing connected
        client = _FtpClient(
            socket_timeout=min(15.0, self.egress.timeout_s),
            connection_timeout=min(15.0, self.egress.timeout_s),
            passive_commands=("epsv", "pasv"),
            trust_server_pasv_ipv4_address=False,  # the data connection: to the checked address only
            encoding="latin-1",
        )
        body = bytearray()
        try:
            async with asyncio.timeout(self.egress.timeout_s):
                await client.connect(address, 21)
                try:
                    await client.login(user or "anonymous", password or "anonymous@")
                    async with client.download_stream(path) as stream:
                        async for block in stream.iter_by_block(CHUNK):
                            body += block
                            if len(body) > max_bytes:
                                raise Failed(f"larger than {max_bytes} bytes")
                finally:
                    await client.close_all()
        except TimeoutError:
            raise Failed(f"timed out after {self.egress.timeout_s:g} s") from None
        except (aioftp.AIOFTPException, OSError, ValueError, IndexError) as exc:
            raise Failed(f"ftp: {type(exc).__name__}: {str(exc)[:200]}") from None
        return bytes(body)

    async def fetch_tftp(self, host: str, filename: str, max_bytes: int) -> bytes:
        """Read ``filename`` from ``host``'s TFTP server (port 69)."""
        address = (await self.policy.resolve(host))[0]
        try:
            async with asyncio.timeout(self.egress.timeout_s):
                return await tftp.fetch(address, 69, filename, max_bytes, self.policy.permits)
        except TimeoutError:
            raise Failed(f"timed out after {self.egress.timeout_s:g} s") from None
        except (tftp.TftpFailed, OSError) as exc:
            raise Failed(str(exc)[:300]) from None


def describe(exc: Any) -> str:
    return str(exc)[:300]
