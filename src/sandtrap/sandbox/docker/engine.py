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

from sandtrap.errors import SandboxError, SandboxUnavailable

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 60.0


def connect(docker_host: str = "") -> aiodocker.Docker:
    """A client for ``docker_host``, else ``DOCKER_HOST``, else the local socket.

    aiohttp's default connector allows 100 connections, and every live exec stream holds one: past
    ~100 sessions every engine call would queue. The honeypot's own limits bound the streams, so the
    connector is unlimited (``limit=0``).
    """
    url = docker_host or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if url.startswith("unix://"):
        connector = aiohttp.UnixConnector(url[len("unix://") :], limit=0)
        return aiodocker.Docker(url="unix://localhost", connector=connector)
    return aiodocker.Docker(url=url, connector=aiohttp.TCPConnector(limit=0))


@asynccontextmanager
async def engine(docker_host: str = "") -> AsyncIterator[aiodocker.Docker]:
    client = connect(docker_host)
    try:
        yield client
    finally:
        await close(client)


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
        if exc.status == 900:  # aiodocker's "cannot connect to the engine"
            raise SandboxUnavailable(f"{what}: engine unreachable: {exc.message}") from exc
        raise refusal(what, exc.status, str(exc.message)) from exc
    except TimeoutError as exc:
        raise SandboxUnavailable(f"{what}: engine did not answer within {timeout_s:.0f}s") from exc
    except (OSError, ConnectionError) as exc:
        raise SandboxUnavailable(f"{what}: engine unreachable: {exc}") from exc
    except ValueError as exc:  # an error answer the client could not parse (e.g. to a HEAD request)
        raise SandboxError(f"{what}: unreadable engine answer: {exc}") from exc
    except Exception as exc:  # aiohttp client errors and friends
        if type(exc).__module__.startswith("aiohttp"):
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
