"""How sandtrap reaches the Docker engine (the first keys of ``sandbox.docker``): its address and, for a
``tcp://`` engine on another host, mutual TLS (the client's certificate and key, the CA that signed the engine's).

The files are checked when the configuration is loaded: each one readable and what it says it is, the key the
certificate's, the CA's certificates parseable. A ``tcp://`` engine off loopback without TLS is refused: whoever
reaches that port is root on the engine's host.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from pydantic import Field, ValidationInfo, field_validator, model_validator

from sandtrap.config.values import Section

_TCP = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})")
MAX_PEM_BYTES = 1024 * 1024

# sandbox.docker.disk_quota measures each box's overlay upper dir on this host (sandbox/docker/disk.py).
REMOTE_DISK_QUOTA = (
    "sandbox.docker.disk_quota: the boxes' writable layers are on the engine's host ({host}), which this host cannot "
    "measure; set sandbox.docker.disk_quota: 0 and bound the disk on the engine's host (its own file system for "
    "the data root), or use a local engine"
)


def tcp_host(docker_host: str) -> str | None:
    """The host of a ``tcp://HOST:PORT`` address (IPv6 without brackets), or None for any other."""
    m = _TCP.fullmatch(docker_host)
    return m.group(1).strip("[]") if m else None


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_pem(path: str, what: str) -> bytes:
    """The file's bytes, or ValueError naming what is wrong and the fix."""
    if not os.path.isabs(path):
        raise ValueError(f"{path!r} is not an absolute path; give the {what}'s full path")
    p = Path(path)
    try:
        if not p.is_file():
            raise ValueError(f"{path} is not a file on this host; give the {what}'s path")
        if p.stat().st_size > MAX_PEM_BYTES:
            raise ValueError(f"{path} is larger than 1 MiB: not a PEM {what}")
        return p.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path} cannot be read ({exc.strerror}); make the {what} readable by sandtrap") from None


def _certificates(path: str, what: str) -> list[x509.Certificate]:
    data = _read_pem(path, what)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise ValueError(f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----); give the {what}")
    return certs


class EngineSettings(Section):
    """The engine's address and the client's TLS material: every client of the engine (the backend, the image
    build and check, ``sandtrap doctor``) is built from this one section (``sandtrap.sandbox.docker.engine.connect``)."""

    docker_host: str = Field(
        "",
        description="engine address: unix:///path or tcp://HOST:PORT (then with tls_ca, tls_cert and tls_key); "
        "default: DOCKER_HOST or the local socket",
    )
    tls_ca: str = Field("", description="tcp:// engine: the CA (PEM) that signed the engine's certificate")
    tls_cert: str = Field("", description="tcp:// engine: sandtrap's client certificate (PEM), signed by the CA the "
                          "engine trusts (its --tlscacert)")  # fmt: skip
    tls_key: str = Field("", description="tcp:// engine: the client certificate's private key (PEM, unencrypted)")
    tls_verify: bool = Field(
        True,
        description="check the engine's certificate against tls_ca and its address (false: any engine answering "
        "there is believed; not advised)",
    )

    @field_validator("docker_host")
    @classmethod
    def _docker_host(cls, v: str) -> str:
        if v == "" or (v.startswith("unix:///") and "\0" not in v):
            return v
        m = _TCP.fullmatch(v)
        if m is None or not 0 < int(m.group(2)) < 65536:
            raise ValueError(
                "must be unix:///PATH (a local socket) or tcp://HOST:PORT (a remote engine, with TLS), "
                "e.g. tcp://10.0.0.5:2376"
            )
        return v

    @field_validator("tls_ca")
    @classmethod
    def _ca(cls, v: str) -> str:
        if v:
            _certificates(v, "CA certificate")
        return v

    @field_validator("tls_cert")
    @classmethod
    def _cert(cls, v: str) -> str:
        if v:
            _certificates(v, "client certificate")
        return v

    @field_validator("tls_key")
    @classmethod
    def _key(cls, v: str, info: ValidationInfo) -> str:
        if not v:
            return v
        data = _read_pem(v, "client key")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError:
            raise ValueError(f"{v} is an encrypted key; give it unencrypted (readable only by sandtrap)") from None
        except (ValueError, UnsupportedAlgorithm):
            raise ValueError(f"{v} holds no PEM private key (-----BEGIN ... PRIVATE KEY-----)") from None
        cert_path = info.data.get("tls_cert") or ""
        if cert_path:
            cert = _certificates(cert_path, "client certificate")[0]
            public = serialization.PublicFormat.SubjectPublicKeyInfo
            if cert.public_key().public_bytes(serialization.Encoding.DER, public) != key.public_key().public_bytes(
                serialization.Encoding.DER, public
            ):
                raise ValueError(
                    f"{v} is not the key of sandbox.docker.tls_cert ({cert_path}); give the key that certificate "
                    "was made for"
                )
        return v

    @model_validator(mode="after")
    def _tls(self) -> EngineSettings:
        """Checks across the keys: TLS only for tcp://, all three files or none, TLS off loopback."""
        given = [k for k in ("tls_ca", "tls_cert", "tls_key") if getattr(self, k)]
        host = tcp_host(self.docker_host)
        if given and host is None:
            raise ValueError(
                f"sandbox.docker.{given[0]}: TLS is for a tcp:// engine, and sandbox.docker.docker_host is "
                f"{self.docker_host or 'the local socket'!r}; remove the tls_* keys or set docker_host: tcp://HOST:PORT"
            )
        if given:
            need = ["tls_cert", "tls_key"] + (["tls_ca"] if self.tls_verify else [])
            missing = [k for k in need if not getattr(self, k)]
            if missing:
                raise ValueError(
                    f"sandbox.docker.{missing[0]}: missing; a TLS engine needs "
                    + ", ".join(f"sandbox.docker.{k}" for k in need)
                    + " (the files `dockerd --tlsverify` was set up with: ca.pem, cert.pem, key.pem)"
                )
        elif host is not None and not is_loopback_host(host):
            raise ValueError(
                f"sandbox.docker.docker_host: {self.docker_host} without TLS would give whoever reaches that port "
                "root on the engine's host; set sandbox.docker.tls_ca, tls_cert and tls_key (the engine run with "
                "--tlsverify), or use a local engine"
            )
        return self

    @property
    def uses_tls(self) -> bool:
        return bool(self.tls_cert)
