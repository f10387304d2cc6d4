"""The API application: routes, the token gate, security headers, errors as short JSON, the web UI if present.

``create_app(deps)`` is all a server needs; :mod:`sandtrap.api.server` runs it inside sandtrap's own loop.
The OpenAPI document is at ``/api/v1/openapi.json`` (no interactive docs page: it would need scripts
from elsewhere, which the Content-Security-Policy forbids).
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sandtrap import __version__
from sandtrap.api.auth import COOKIE, PUBLIC_PATHS, TokenGate, login_router
from sandtrap.api.deps import ApiDeps
from sandtrap.api.health import health_router
from sandtrap.api.live import live_router
from sandtrap.api.routes import api_router
from sandtrap.storage.engine import StorageError

log = logging.getLogger(__name__)

WEB_MODULE = "sandtrap.api.web"
OPENAPI_URL = "/api/v1/openapi.json"
# For everything this module serves (JSON, downloads, the login form); pages set their own policy.
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
DESCRIPTION = """Read what the honeypot recorded: sessions, events, casts, artifacts, statistics; watch live.

Authentication: when `api.token` is set, every endpoint but `/healthz` needs `Authorization: Bearer <token>`,
or the `sandtrap_token` cookie that `/login` sets for browsers.
Attacker text is returned as JSON strings, as sent (NUL and invalid UTF-8 as U+FFFD): escape it to show it.
"""


class SecurityHeaders:
    """ASGI middleware: nosniff, no framing, no referrer, a strict CSP unless the response set its own."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        private = path.startswith("/api/") or path in ("/metrics", "/login")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("Content-Security-Policy", API_CSP)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("X-Frame-Options", "DENY")
                headers.setdefault("Referrer-Policy", "no-referrer")
                headers.setdefault("Cross-Origin-Resource-Policy", "same-origin")
                if private:
                    headers.setdefault("Cache-Control", "no-store")
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _storage_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("API %s: %s", request.url.path, exc)
    return JSONResponse({"detail": "the database is unavailable; see the sandtrap log"}, status_code=503)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("API %s failed", request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal error; see the sandtrap log"}, status_code=500)


def create_app(deps: ApiDeps) -> FastAPI:
    token = deps.settings.api.token
    has_web = importlib.util.find_spec(WEB_MODULE) is not None
    app = FastAPI(
        title="sandtrap",
        version=__version__,
        description=DESCRIPTION,
        openapi_url=OPENAPI_URL,
        docs_url=None,
        redoc_url=None,
    )
    stopping = asyncio.Event()
    app.state.deps = deps
    app.state.stopping = stopping  # set by ApiServer.close(): live streams end
    app.include_router(health_router(deps))
    app.include_router(api_router(deps))
    app.include_router(live_router(deps, stopping))
    app.include_router(login_router(token, home="/" if has_web else "/api/v1/status"))
    app.add_exception_handler(StorageError, _storage_unavailable)
    app.add_exception_handler(Exception, _internal_error)
    if has_web:
        mount: Callable[[FastAPI, ApiDeps], None] | None = getattr(importlib.import_module(WEB_MODULE), "mount", None)
        if mount is not None:
            mount(app, deps)
    app.add_middleware(TokenGate, token=token)
    app.add_middleware(SecurityHeaders)  # outermost: a 401 gets the headers too
    if token:
        app.openapi = _with_security(app.openapi)  # type: ignore[method-assign]
    return app


def _with_security(build: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """The OpenAPI document, saying that every operation but the public ones needs the token."""

    def openapi() -> dict[str, Any]:
        schema = build()
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes["bearer"] = {"type": "http", "scheme": "bearer", "description": "api.token"}
        schemes["cookie"] = {"type": "apiKey", "in": "cookie", "name": COOKIE, "description": "set by /login"}
        for path, operations in schema.get("paths", {}).items():
            if path in PUBLIC_PATHS:
                continue
            for operation in operations.values():
                operation["security"] = [{"bearer": []}, {"cookie": []}]
                operation.setdefault("responses", {})["401"] = {
                    "description": "api.token is set and the request does not carry it",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
                }
        return schema

    return openapi
