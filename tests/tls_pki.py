"""Certificates for a Docker engine over mutual TLS, made with ``cryptography`` as ``dockerd --tlsverify`` wants them:
a CA, a server certificate for 127.0.0.1 (and localhost) and a client certificate, both signed by the CA; and a
second CA with a client certificate of its own (one the engine does not trust) and a server certificate (one the
client does not trust)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Key = ec.EllipticCurvePrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: Key) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.write_bytes(pem)
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _cert(
    subject: str, key: Key, issuer: x509.Name, issuer_key: Key, *, ca: bool = False, server: bool = False
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if ca:
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
        builder = builder.add_extension(usage, critical=True)
    else:
        usage = x509.KeyUsage(True, False, True, False, False, False, False, False, False)
        purpose = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(usage, critical=True).add_extension(
            x509.ExtendedKeyUsage([purpose]), critical=False
        )
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class EnginePKI:
    ca: Path  # the CA the engine and sandtrap trust
    server: Pair  # the engine's (127.0.0.1), signed by ca
    client: Pair  # sandtrap's, signed by ca
    other_ca: Path  # a CA nobody here trusts
    other_client: Pair  # a client certificate of the other CA
    other_server: Pair  # a server certificate (127.0.0.1) of the other CA


def make_pki(directory: Path) -> EnginePKI:
    """Every file in ``directory`` (made if missing); keys mode 0600."""
    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}

    def ca(name: str) -> tuple[x509.Name, Key]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(f"sandtrap test {name}", key, _name(f"sandtrap test {name}"), key, ca=True)
        out[name] = directory / f"{name}.pem"
        _write_cert(out[name], cert)
        return cert.subject, key

    def leaf(name: str, issuer: tuple[x509.Name, Key], server: bool) -> Pair:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(name, key, issuer[0], issuer[1], server=server)
        pair = Pair(directory / f"{name}-cert.pem", directory / f"{name}-key.pem")
        _write_cert(pair.cert, cert)
        _write_key(pair.key, key)
        return pair

    main, other = ca("ca"), ca("other-ca")
    return EnginePKI(
        ca=out["ca"],
        server=leaf("server", main, True),
        client=leaf("client", main, False),
        other_ca=out["other-ca"],
        other_client=leaf("other-client", other, False),
        other_server=leaf("other-server", other, True),
    )
