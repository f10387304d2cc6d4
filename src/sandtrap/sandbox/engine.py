"""The one place that talks to the Docker engine's client library and translates its errors."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import TypeVar

import aiodocker

from sandtrap.errors import SandboxError, SandboxUnavailable

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 60.0


def connect(docker_host: str = "") -> aiodocker.Docker:
    """A client for ``docker_host``, else ``DOCKER_HOST``, else the local socket."""
    url = docker_host or os.environ.get("DOCKER_HOST") or None
    return aiodocker.Docker(url=url)


@asynccontextmanager
async def engine(docker_host: str = "") -> AsyncIterator[aiodocker.Docker]:
    client = connect(docker_host)
    try:
        yield client
    finally:
        await client.close()


async def call(what: str, aw: Awaitable[T], timeout_s: float = DEFAULT_TIMEOUT_S) -> T:
    """Await an engine call with a bound, turning engine failures into :class:`SandboxError`.

    A refused connection (engine down or restarting) becomes :class:`SandboxUnavailable` so callers
    can give the attacker a plausible refusal instead of a crash.
    """
    try:
        async with asyncio.timeout(timeout_s):
            return await aw
    except aiodocker.DockerError as exc:
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
