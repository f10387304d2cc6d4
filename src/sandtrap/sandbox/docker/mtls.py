"""Mutual TLS with a ``tcp://`` engine (``sandbox.docker.tls_*``): the client's SSL context; what went wrong when
the handshake fails, worded to name the key to fix (a wrong certificate is a clear error at start, not a
traceback); and the half-close an exec's stdin needs for its EOF, which asyncio's TLS transport lacks."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Any

from sandtrap.config import EngineSettings
from sandtrap.config.engine import tcp_host
from sandtrap.errors import ConfigError, SandboxUnavailable

log = logging.getLogger(__name__)


def tls_context(settings: EngineSettings) -> ssl.SSLContext:
    """The client side of the engine's mutual TLS: sandtrap's certificate and key; the engine's certificate checked
    against ``tls_ca`` only (and its address), unless ``tls_verify`` is false."""
    try:
        if settings.tls_verify:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.tls_ca)
        else:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"sandbox.docker.tls_cert/tls_key/tls_ca: cannot be used for TLS ({exc}); give PEM files made for "
            "`dockerd --tlsverify` (ca.pem, cert.pem, key.pem)"
        ) from None
    return ctx


# What the TLS library says (the alert a peer sent, or why its certificate was not believed) -> which key to fix.
_SERVER_REFUSED = ("ALERT_BAD_CERTIFICATE", "ALERT_UNKNOWN_CA", "CERTIFICATE_REQUIRED", "ALERT_CERTIFICATE_UNKNOWN",
                   "ALERT_HANDSHAKE_FAILURE", "ALERT_CERTIFICATE_EXPIRED", "ALERT_ACCESS_DENIED")  # fmt: skip


class EngineTLSFailed(SandboxUnavailable):
    """The TLS handshake with a ``tcp://`` engine failed: the message names the ``sandbox.docker`` key to fix."""


def tls_failure(exc: BaseException) -> str:
    """What went wrong in TLS with the engine, naming the key to fix; '' when ``exc`` is no TLS failure."""
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen and len(seen) < 8:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    for err in seen:
        if isinstance(err, ssl.SSLCertVerificationError):
            return (
                f"the engine's certificate is not trusted ({_verify_message(err)}): it is not signed by "
                "sandbox.docker.tls_ca, or not made for the address in sandbox.docker.docker_host. Fix: set "
                "sandbox.docker.tls_ca to the CA that signed the engine's --tlscert"
            )
    text = " ".join(f"{type(e).__name__}: {e}" for e in seen)
    if any(alert in text.upper() for alert in _SERVER_REFUSED):
        return (
            f"the engine refused sandtrap's client certificate ({_short(text)}). Fix: set sandbox.docker.tls_cert "
            "(and tls_key) to a certificate signed by the CA the engine trusts (its --tlscacert)"
        )
    if "WRONG_VERSION_NUMBER" in text.upper() or "record layer failure" in text:
        return "the engine does not speak TLS there; check sandbox.docker.docker_host (its TLS port, e.g. 2376)"
    if any(isinstance(e, ssl.SSLError) for e in seen) or "SSL" in text:
        return f"TLS with the engine failed ({_short(text)}); check sandbox.docker.tls_ca, tls_cert and tls_key"
    return ""


def _verify_message(err: ssl.SSLCertVerificationError) -> str:
    """OpenSSL's reason (aiohttp's subclass keeps the ssl error in ``certificate_error``)."""
    inner = getattr(err, "certificate_error", err)
    return str(getattr(inner, "verify_message", "") or inner)


def _short(text: str) -> str:
    return text if len(text) <= 200 else text[:197] + "..."


PROBE_TIMEOUT_S = 10.0


def diagnose_tls(settings: EngineSettings) -> str:
    """Why mutual TLS with the engine fails, naming the key to fix; '' when it works (or the engine is not there).

    One connection of its own, a ``GET /_ping`` over it. Needed because in TLS 1.3 the client's handshake ends
    before the engine has looked at the client's certificate: an engine that refuses it just closes the connection
    (the client sees a reset or EOF, no alert), which the HTTP client reports as an unreachable engine."""
    host = tcp_host(settings.docker_host)
    if host is None or not settings.uses_tls:
        return ""
    port = int(settings.docker_host.rsplit(":", 1)[1])
    ctx = tls_context(settings)
    try:
        raw = socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S)
    except OSError:
        return ""  # not there at all: not a TLS matter
    with raw:
        try:
            tls = ctx.wrap_socket(raw, server_hostname=host)
        except (ssl.SSLError, OSError) as exc:
            return tls_failure(exc)
        with tls:
            try:
                tls.sendall(b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n")
                answer = tls.recv(16)
            except (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError):
                answer = b""  # closed without a word: below
            except (ssl.SSLError, OSError) as exc:
                return tls_failure(exc) or f"TLS with the engine failed ({exc}); check sandbox.docker.tls_cert"
            if answer.startswith(b"HTTP/"):
                return ""
            return (
                "the engine closed the connection after the TLS handshake: it did not accept sandtrap's client "
                "certificate. Fix: set sandbox.docker.tls_cert (and tls_key) to a certificate signed by the CA the "
                "engine trusts (its --tlscacert)"
            )


class _ReadsAfterClose:
    """An SSL object that has sent its close_notify and still reads: the peer's close_notify reads as the end of
    the stream (b'' or 0, as asyncio's SSL protocol expects), not as an error (CPython's ``_ssl`` raises
    SSLZeroReturnError once both sides have shut down)."""

    def __init__(self, obj: ssl.SSLObject) -> None:
        self._obj = obj

    def read(self, len: int = 1024, buffer: Any = None) -> Any:
        try:
            return self._obj.read(len, buffer) if buffer is not None else self._obj.read(len)
        except ssl.SSLZeroReturnError:
            return 0 if buffer is not None else b""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._obj, name)


async def write_eof(transport: asyncio.BaseTransport, wait_s: float = 30.0) -> bool:
    """Half-close a TLS connection: send close_notify and keep reading. A ``docker exec`` stream's stdin ends
    only when the client half-closes; over TCP that is a FIN, over TLS a close_notify (what Go's
    ``tls.Conn.CloseWrite`` sends, and the engine reads as EOF). asyncio's SSL transport has no ``write_eof``, so
    this reaches into it (CPython 3.11+'s ``sslproto``); False when it cannot (then stdin stays open).

    OpenSSL's shutdown reads what is waiting in the incoming buffer: records the reader has not taken yet (its
    queue full) would be lost, so the half-close waits until they are read (``wait_s`` at most)."""
    proto = getattr(transport, "_ssl_protocol", None)
    obj = getattr(proto, "_sslobj", None)
    incoming = getattr(proto, "_incoming", None)
    if proto is None or not isinstance(obj, ssl.SSLObject) or not isinstance(incoming, ssl.MemoryBIO):
        return False
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while incoming.pending or getattr(proto, "_write_backlog", None):
        if loop.time() > deadline or transport.is_closing():
            return False
        await asyncio.sleep(0.02)
    try:
        obj.unwrap()  # writes close_notify, then looks for the peer's: not there yet
    except ssl.SSLWantReadError:
        pass
    except (ssl.SSLError, OSError) as exc:
        log.warning("the engine's TLS connection could not be half-closed: %s", exc)
        return False
    proto._sslobj = _ReadsAfterClose(obj)
    proto._process_outgoing()
    return True
