"""The optional bearer token (``api.token``): one gate in front of everything but ``/healthz`` and the login.

With a token set, a request must carry either ``Authorization: Bearer <token>`` (scripts, Prometheus)
or the ``sandtrap_token`` cookie that ``/login`` sets (browsers). The cookie holds an HMAC of the token,
never the token itself. Tokens are compared with :func:`hmac.compare_digest`. Without a token (allowed
only on a loopback address, see :func:`sandtrap.api.server.check_exposure`) the gate lets all through.

Unauthenticated API calls get ``401`` with ``WWW-Authenticate: Bearer``; a browser asking for a page
is sent to ``/login``, a plain form (``GET /login?token=...`` works too, for a bookmark).
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

COOKIE = "sandtrap_token"
PUBLIC_PATHS = frozenset({"/healthz", "/login", "/logout"})
MAX_FORM_BYTES = 4096

_LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sandtrap: sign in</title></head>
<body><h1>sandtrap</h1><p>{message}</p>
<form method="post" action="/login"><label>API token <input type="password" name="token" autofocus
autocomplete="current-password"></label> <button type="submit">Sign in</button></form></body></html>
"""


def cookie_value(token: str) -> str:
    """What the cookie holds: an HMAC of the token (a stolen cookie does not reveal the token)."""
    return hmac.new(token.encode(), b"sandtrap-api-cookie-v1", hashlib.sha256).hexdigest()


def token_matches(token: str, given: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "replace"), token.encode())


def is_authorized(token: str, authorization: str | None, cookie: str | None) -> bool:
    """True when no token is configured, or the request carries it (bearer header or login cookie)."""
    if not token:
        return True
    ok = False
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer":
            ok = token_matches(token, value.strip())
    if cookie:
        ok = hmac.compare_digest(cookie.encode("utf-8", "replace"), cookie_value(token).encode()) or ok
    return ok


class TokenGate:
    """ASGI middleware: every HTTP request and WebSocket except :data:`PUBLIC_PATHS` needs the token."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.token or scope["type"] not in ("http", "websocket") or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if is_authorized(self.token, request.headers.get("authorization"), request.cookies.get(COOKIE)):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        response: Response
        path: str = scope["path"]
        is_api = path.startswith("/api/") or path == "/metrics"
        if not is_api and "text/html" in request.headers.get("accept", ""):
            response = RedirectResponse("/login", status_code=303)
        else:
            response = JSONResponse(
                {"detail": "this API needs the api.token: send 'Authorization: Bearer <token>'"},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="sandtrap"'},
            )
        await response(scope, receive, send)


def login_router(token: str, home: str) -> APIRouter:
    """``/login`` (form, or ``?token=``) sets the cookie and goes to ``home``; ``/logout`` clears it."""
    router = APIRouter(include_in_schema=False)

    def signed_in(request: Request) -> Response:
        response = RedirectResponse(home, status_code=303)
        if token:
            response.set_cookie(
                COOKIE,
                cookie_value(token),
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
                path="/",
            )
        return response

    def form(message: str, status_code: int = 200) -> HTMLResponse:
        return HTMLResponse(_LOGIN_PAGE.format(message=message), status_code=status_code)

    @router.get("/login")
    async def login_page(request: Request) -> Response:
        given = request.query_params.get("token")
        if not token:
            return signed_in(request)
        if given is None:
            return form("Enter the API token (api.token in the configuration).")
        if token_matches(token, given):
            return signed_in(request)
        return form("Wrong token.", 401)

    @router.post("/login")
    async def login_form(request: Request) -> Response:
        if not token:
            return signed_in(request)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                return form("Wrong token.", 401)
        try:
            values = parse_qs(body.decode("utf-8", "replace"), max_num_fields=5)
        except ValueError:
            values = {}
        given = values.get("token", [""])[0]
        if token_matches(token, given):
            return signed_in(request)
        return form("Wrong token.", 401)

    @router.get("/logout")
    async def logout() -> Response:
        response = RedirectResponse("/login" if token else home, status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    return router
