"""Run the API with uvicorn inside sandtrap's own event loop, on ``api.listen``.

We bind the socket ourselves, so a port in use is a :class:`~sandtrap.errors.SandtrapError` naming
``api.listen`` (uvicorn would log and ``sys.exit``). uvicorn's signal handling is left out: sandtrap's
own handlers stop the process and close this server first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

from sandtrap.config import Settings, split_listen
from sandtrap.errors import ConfigError, SandtrapError

log = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0
GRACEFUL_S = 3  # open downloads and live streams get this long at shutdown


class ApiError(SandtrapError):
    """The API server could not start."""


def check_exposure(settings: Settings) -> None:
    """Refuse an API that listens beyond loopback without a token: anyone could read every session."""
    if settings.api_is_loopback() or settings.api.token:
        return
    raise ConfigError(
        f"api.listen is {settings.api.listen}, which other machines can reach, and api.token is empty"
        + (f" ({settings.api.token_env}, which api.token_env names, is not set)" if settings.api.token_env else "")
        + ": "
        "anyone reaching that port could read every recorded session and download what attackers left. "
        "Set api.token to a long random secret (e.g. the output of "
        "`python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`), "
        "or listen on loopback only (api.listen: 127.0.0.1:8080)."
    )


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # sandtrap's own signal handlers stop the process (and close us first)


class ApiServer:
    def __init__(self, app: FastAPI, listen: str) -> None:
        self.app = app
        self.listen = listen
        self.port = 0
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    def _bind(self) -> socket.socket:
        host, port = split_listen(self.listen)
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            raise ApiError(f"api.listen {self.listen}: cannot resolve or open a socket: {exc}") from exc
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
        except OSError as exc:
            sock.close()
            raise ApiError(
                f"api.listen {self.listen}: cannot listen there ({exc.strerror or exc}); "
                "pick a free port or address for api.listen"
            ) from exc
        return sock

    async def start(self) -> None:
        sock = self._bind()
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            lifespan="off",
            proxy_headers=False,
            server_header=False,
            ws="none",
            timeout_graceful_shutdown=GRACEFUL_S,
        )
        server = _Server(config)
        self._server = server
        self._task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]), name="api-server")
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                while not server.started:
                    if self._task.done():
                        break
                    await asyncio.sleep(0.02)
        except TimeoutError:
            await self.close()
            raise ApiError(
                f"api.listen {self.listen}: the API server did not start within {START_TIMEOUT_S:g}s"
            ) from None
        if not server.started:
            error = self._task.exception() if not self._task.cancelled() else None
            self._task = None
            sock.close()
            raise ApiError(f"api.listen {self.listen}: the API server failed to start: {error}")
        log.info("API listening on %s (port %d)", self.listen, self.port)

    async def close(self) -> None:
        """Stop accepting, end live streams, give open requests a moment, then stop."""
        stopping = getattr(self.app.state, "stopping", None)
        if isinstance(stopping, asyncio.Event):
            stopping.set()
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        task, self._task = self._task, None
        try:
            async with asyncio.timeout(GRACEFUL_S + 5.0):
                await asyncio.shield(task)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        except Exception as exc:
            log.warning("API server stopped with an error: %s", exc)
