"""The one place that talks to the Docker engine's client library and translates its errors."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import TypeVar

import aiodocker
import aiohttp

from sandtrap.config import EngineSettings
from sandtrap.config.engine import is_loopback_host, tcp_host
from sandtrap.errors import ConfigError, SandboxError, SandboxUnavailable, SandtrapError
from sandtrap.sandbox.docker.mtls import PROBE_TIMEOUT_S, EngineTLSFailed, diagnose_tls, tls_context, tls_failure

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
