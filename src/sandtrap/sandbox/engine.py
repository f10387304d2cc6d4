"""The one place that talks to the Docker engine's client library and translates its errors."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
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
        raise SandboxError(f"{what}: engine said {exc.status}: {exc.message}") from exc
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


def is_not_found(exc: BaseException) -> bool:
    cause = exc.__cause__ if isinstance(exc, SandboxError) else exc
    return isinstance(cause, aiodocker.DockerError) and cause.status == 404
