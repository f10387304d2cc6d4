"""HTTPS at the gateway: a per-sensor CA that the boxes trust, a certificate per name made on the fly, and TLS
spoken over a connection whose first bytes were already read (``ssl.MemoryBIO``).

The CA (EC P-256, ten years) is made once in ``<data_dir>/network/`` (key 0600). Boxes get it as a corporate
TLS-inspection root would be installed: ``/usr/local/share/ca-certificates/<name>.crt`` and appended to
``/etc/ssl/certs/ca-certificates.crt`` (:func:`box_files`), so ``curl`` and ``wget`` verify without ``-k``.
A leaf certificate for the name the box asked (SNI; else the address it connected to) is signed on demand,
kept for the gateway's life (at most ``CACHE`` names).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import ssl
import time
from collections import OrderedDict
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_NAME = "Internal Root CA G2"
CA_FILE = "internal-root-ca.crt"  # no product name in the box: a corporate inspection root
HOST_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
CACHE = 256


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "IT Security"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common)])  # fmt: skip


class SensorCA:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        key_path, cert_path = directory / "ca.key", directory / "ca.pem"
        if key_path.exists() and cert_path.exists():
            self.key = serialization.load_pem_private_key(key_path.read_bytes(), None)
            self.cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        else:
            directory.mkdir(parents=True, exist_ok=True)
            key = ec.generate_private_key(ec.SECP256R1())
            now = datetime.now(UTC)
            self.key = key
            self.cert = (
                x509.CertificateBuilder()
                .subject_name(_name(CA_NAME))
                .issuer_name(_name(CA_NAME))
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - timedelta(days=400))
                .not_valid_after(now + timedelta(days=3650))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(
                    x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
                )
                .sign(key, hashes.SHA256())
            )
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(self._key_pem(key))
            cert_path.write_bytes(self.pem)
        self._leaves: OrderedDict[str, ssl.SSLContext] = OrderedDict()
        self._leaf_dir = directory / "leaf"  # a leaf's key is there only while its context loads it
        self._leaf_dir.mkdir(mode=0o700, exist_ok=True)

    @staticmethod
    def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def context_for(self, name: str) -> ssl.SSLContext:
        """A server context presenting a certificate for ``name`` (a DNS name or an address)."""
        name = name.lower().rstrip(".")[:253] or "localhost"
        if name in self._leaves:
            self._leaves.move_to_end(name)
            return self._leaves[name]
        key = ec.generate_private_key(ec.SECP256R1())
        try:
            alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            alt = x509.DNSName(name)
        now = datetime.now(UTC)
        assert isinstance(self.key, ec.EllipticCurvePrivateKey)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=30))
            .not_valid_after(now + timedelta(days=90))
            .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        path = self._leaf_dir / f"{time.monotonic_ns()}.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self._key_pem(key) + cert.public_bytes(serialization.Encoding.PEM))
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(path)
        finally:
            path.unlink(missing_ok=True)
        self._leaves[name] = ctx
        while len(self._leaves) > CACHE:
            self._leaves.popitem(last=False)
        return ctx

    def server_context(self, fallback: str) -> tuple[ssl.SSLContext, list[str]]:
        """A context that picks the leaf by SNI (``fallback``: the address, without one); the name seen."""
        seen: list[str] = []
        base = self.context_for(fallback)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # the leaf comes from the SNI callback

        def pick(sslobj: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
            if name:
                seen.append(name)
                sslobj.context = self.context_for(name)
            else:
                sslobj.context = base

        ctx.sni_callback = pick
        return ctx, seen

    def box_files(self) -> dict[str, tuple[bytes, int, float]]:
        """The CA as a box gets it: installed as a local CA and in the bundle curl and wget read."""
        try:
            bundle = HOST_BUNDLE.read_bytes()
        except OSError:
            bundle = b""
        mtime = self.cert.not_valid_before_utc.timestamp()
        return {
            f"usr/local/share/ca-certificates/{CA_FILE}": (self.pem, 0o644, mtime),
            "etc/ssl/certs/ca-certificates.crt": (bundle + self.pem, 0o644, time.time() - 86400 * 30),
        }


class TlsStream:
    """TLS (server side) over a stream of which ``first`` was already read."""

    def __init__(
        self, ctx: ssl.SSLContext, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bytes
    ) -> None:
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out, server_side=True)
        self._reader, self.raw = reader, writer
        self._in.write(first)

    def _flush(self) -> None:
        data = self._out.read()
        if data:
            self.raw.write(data)

    async def _more(self) -> bool:
        self._flush()
        await self.raw.drain()
        data = await self._reader.read(65536)
        if not data:
            return False
        self._in.write(data)
        return True

    async def handshake(self) -> None:
        while True:
            try:
                self._obj.do_handshake()
                self._flush()
                return
            except ssl.SSLWantReadError:
                if not await self._more():
                    raise ConnectionError("closed during the TLS handshake") from None

    async def read(self, n: int = 65536) -> bytes:
        while True:
            try:
                return self._obj.read(n)
            except ssl.SSLWantReadError:
                if not await self._more():
                    return b""
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    def write(self, data: bytes) -> None:
        self._obj.write(data)
        self._flush()

    async def drain(self) -> None:
        await self.raw.drain()

    def close(self) -> None:
        try:
            self._obj.unwrap()
        except ssl.SSLError:
            pass
        self._flush()
        self.raw.close()
