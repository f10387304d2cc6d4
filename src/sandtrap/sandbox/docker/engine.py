"""The one place that talks to the Docker engine's client library and translates its errors."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import TypeVar

import aiodocker
import aiohttp

from sandtrap.config import EngineSettings
from sandtrap.config.engine import is_loopback_host, tcp_host
from sandtrap.errors import ConfigError, SandboxError, SandboxUnavailable, SandtrapError

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 60.0


def address(settings: EngineSettings | None = None) -> str:
    """The engine's address: ``sandbox.docker.docker_host``, else ``DOCKER_HOST``, else the local socket."""
    host = settings.docker_host if settings is not None else ""
    return host or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def is_local(settings: EngineSettings | None = None) -> bool:
    """The engine runs on this host (a unix socket): its containers' pids, files and cgroups are this host's.
    A ``tcp://`` engine is never taken for local, even on loopback."""
    return address(settings).startswith("unix://")


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


def connect(settings: EngineSettings | None = None) -> aiodocker.Docker:
    """A client for the engine ``settings`` name (:func:`address`), over mutual TLS for a ``tcp://`` engine
    with ``tls_cert``.

    aiohttp's default connector allows 100 connections, and every live exec stream holds one: past
    ~100 sessions every engine call would queue. The honeypot's own limits bound the streams, so the
    connector is unlimited (``limit=0``).
    """
    url = address(settings)
    if url.startswith("unix://"):
        connector = aiohttp.UnixConnector(url[len("unix://") :], limit=0)
        return aiodocker.Docker(url="unix://localhost", connector=connector)
    host = tcp_host(url)
    if host is None:
        raise ConfigError(f"DOCKER_HOST={url!r}: not unix:///PATH or tcp://HOST:PORT; set sandbox.docker.docker_host")
    if settings is not None and settings.docker_host and settings.uses_tls:
        tls = tls_context(settings)
        return aiodocker.Docker(url="https://" + url[len("tcp://") :], connector=aiohttp.TCPConnector(limit=0, ssl=tls))
    if not is_loopback_host(host):  # only DOCKER_HOST can get here: the config refuses docker_host without TLS
        raise ConfigError(
            f"DOCKER_HOST={url} without TLS would give whoever reaches it root on the engine's host; set "
            "sandbox.docker.docker_host with tls_ca, tls_cert and tls_key instead"
        )
    return aiodocker.Docker(url="http://" + url[len("tcp://") :], connector=aiohttp.TCPConnector(limit=0))


@asynccontextmanager
async def engine(settings: EngineSettings | None = None) -> AsyncIterator[aiodocker.Docker]:
    """A client for one piece of work; a TLS engine that cannot be reached says why (:func:`explained`)."""
    client = connect(settings)
    try:
        yield client
    except SandtrapError as exc:  # also an error made from the engine's (an ImageError from a SandboxUnavailable)
        cause = exc if isinstance(exc, SandboxUnavailable) else exc.__cause__
        if not isinstance(cause, SandboxUnavailable):
            raise
        better = await explained(settings, cause)
        if better is cause:
            raise
        raise better from exc
    finally:
        await close(client)


PROBE_TIMEOUT_S = 10.0


def diagnose_tls(settings: EngineSettings) -> str:
    """Why mutual TLS with the engine fails, naming the key to fix; '' when it works (or the engine is not there).

    One connection of its own, a ``GET /_ping`` over it. Needed because in TLS 1.3 the client's handshake ends
    before the engine has looked at the client's certificate: an engine that refuses it just closes the connection
    (the client sees a reset or EOF, no alert), which the HTTP client reports as an unreachable engine."""
    url = address(settings)
    host = tcp_host(url)
    if host is None or not settings.uses_tls:
        return ""
    port = int(url.rsplit(":", 1)[1])
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


async def explained(settings: EngineSettings | None, exc: SandboxUnavailable) -> SandboxUnavailable:
    """``exc``, or for a TLS engine whose trouble is TLS, an :class:`EngineTLSFailed` that names the key to fix."""
    if settings is None or not settings.uses_tls or isinstance(exc, EngineTLSFailed):
        return exc
    try:
        failed = await asyncio.wait_for(asyncio.to_thread(diagnose_tls, settings), PROBE_TIMEOUT_S + 5)
    except (TimeoutError, ConfigError):
        return exc
    what = str(exc).split(": engine ", 1)[0]
    return EngineTLSFailed(f"{what}: {failed}") if failed else exc


async def close(client: aiodocker.Docker) -> None:
    """Close the client and its connector (aiodocker leaves a connector it was given open)."""
    connector = client.connector
    await client.close()
    if connector is not None and not connector.closed:
        await connector.close()


async def call(what: str, aw: Awaitable[T], timeout_s: float = DEFAULT_TIMEOUT_S) -> T:
    """Await an engine call with a bound, turning engine failures into :class:`SandboxError`.

    A refused connection (engine down or restarting) becomes :class:`SandboxUnavailable` so callers
    can give the attacker a plausible refusal instead of a crash.
    """
    try:
        async with asyncio.timeout(timeout_s):
            return await aw
    except aiodocker.DockerError as exc:
        if exc.status == 900:  # aiodocker's "cannot connect to the engine" (the client's error its context)
            failed = tls_failure(exc)
            if failed:
                raise EngineTLSFailed(f"{what}: {failed}") from exc
            raise SandboxUnavailable(f"{what}: engine unreachable: {exc.message}") from exc
        if exc.status == 400 and "HTTPS server" in str(exc.message):  # Go's answer to plain HTTP on a TLS port
            raise EngineTLSFailed(
                f"{what}: the engine wants TLS; set sandbox.docker.tls_ca, tls_cert and tls_key (the files its "
                "--tlscacert trusts)"
            ) from exc
        raise refusal(what, exc.status, str(exc.message)) from exc
    except TimeoutError as exc:
        raise SandboxUnavailable(f"{what}: engine did not answer within {timeout_s:.0f}s") from exc
    except Exception as exc:
        failed = tls_failure(exc)
        if failed:
            raise EngineTLSFailed(f"{what}: {failed}") from exc
        if isinstance(exc, OSError | ConnectionError):
            raise SandboxUnavailable(f"{what}: engine unreachable: {exc}") from exc
        if isinstance(exc, ValueError):  # an error answer the client could not parse (e.g. to a HEAD request)
            raise SandboxError(f"{what}: unreadable engine answer: {exc}") from exc
        if type(exc).__module__.startswith("aiohttp"):  # aiohttp client errors and friends
            raise SandboxUnavailable(f"{what}: engine connection failed: {exc}") from exc
        raise


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


class EngineRefused(SandboxError):
    """The engine answered with an error status (``status``, its HTTP code)."""

    def __init__(self, what: str, status: int, message: str) -> None:
        super().__init__(f"{what}: engine said {status}: {message}")
        self.status = status


class NotFound(EngineRefused):
    """404: no such container, image, network or path."""


class NotModified(EngineRefused):
    """304: already in the state asked for (a stop of a stopped container)."""


class Conflict(EngineRefused):
    """409: the object is busy or exists (a removal already in progress, a name taken)."""


class Forbidden(EngineRefused):
    """403: sandtrap's engine proxy (:mod:`sandtrap.sandbox.docker.proxy_policy`) refused the request."""


class LimitRefused(EngineRefused):
    """500 from the runtime: a resource limit the engine cannot grant (its own is lower)."""


class CgroupParentRefused(EngineRefused):
    """The engine refused the container's cgroup parent (e.g. its systemd cgroup driver takes only slices)."""


_BY_STATUS: dict[int, type[EngineRefused]] = {404: NotFound, 304: NotModified, 409: Conflict, 403: Forbidden}

# The engine gives a runtime's failure no code of its own (a 500 or 400 with the runtime's words): these two are
# told apart here, where engine errors enter, and nowhere else.
_RUNTIME_REFUSALS: tuple[tuple[str, type[EngineRefused]], ...] = (
    ("error setting rlimit", LimitRefused),
    ("cgroup", CgroupParentRefused),
)


def refusal(what: str, status: int, message: str) -> EngineRefused:
    """The typed error for an engine's error answer."""
    kind = _BY_STATUS.get(status)
    if kind is None and status in (400, 500):
        lowered = message.lower()
        kind = next((k for text, k in _RUNTIME_REFUSALS if text in lowered), None)
    return (kind or EngineRefused)(what, status, message)


def is_not_found(exc: BaseException) -> bool:
    return isinstance(exc, NotFound) or isinstance(exc.__cause__, NotFound)


def parse_docker_time(text: str) -> datetime | None:
    """Docker's RFC 3339 times carry nanoseconds; Python takes microseconds."""
    if not text or text.startswith("0001"):
        return None
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", text)
    if not m:
        return None
    frac = (m.group(2) or ".0")[:7]
    tz = "+00:00" if m.group(3) == "Z" else m.group(3)
    return datetime.fromisoformat(m.group(1) + frac + tz)
