"""The optional token: 401 without, 200 with (header or login cookie); /healthz open; headers on everything."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from sandtrap.api.auth import COOKIE, cookie_value, is_authorized
from sandtrap.api.server import check_exposure
from sandtrap.config import load_settings
from sandtrap.errors import ConfigError

from apidata import SHA_UPLOAD, A

Client = Callable[..., httpx.AsyncClient]
TOKEN = "s3cret-Token_with.punctuation"
PROTECTED = [
    "/api/v1/sessions",
    f"/api/v1/sessions/{A}",
    f"/api/v1/sessions/{A}/events",
    f"/api/v1/sessions/{A}/cast",
    f"/api/v1/sessions/{A}/export",
    f"/api/v1/sessions/{A}/live",
    f"/api/v1/artifacts/{SHA_UPLOAD}",
    "/api/v1/stats",
    "/api/v1/status",
    "/api/v1/openapi.json",
    "/metrics",
    "/api/v1/sessions/NOT-AN-ID",  # the gate comes before validation: no hints without the token
]


@pytest.mark.parametrize("path", PROTECTED)
async def test_every_endpoint_needs_the_token_when_one_is_set(client: Client, path: str) -> None:
    c = client(token=TOKEN)
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
    ):
        r = await c.get(path, headers=headers)
        assert r.status_code == 401, (path, headers)
        assert r.headers["www-authenticate"] == 'Bearer realm="sandtrap"'
        assert r.json()["detail"].startswith("this API needs the api.token")
    r = await c.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code not in (401, 403), path


async def test_healthz_needs_no_token(client: Client) -> None:
    r = await client(token=TOKEN).get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


async def test_no_token_configured_means_open(client: Client) -> None:
    assert (await client().get("/api/v1/sessions")).status_code == 200


async def test_login_sets_a_cookie_that_is_not_the_token(client: Client) -> None:
    c = client(token=TOKEN)
    wrong = await c.get("/login", params={"token": "nope"})
    assert wrong.status_code == 401 and COOKIE not in wrong.cookies
    form = await c.get("/login")
    assert form.status_code == 200 and "<form" in form.text and form.headers["content-type"].startswith("text/html")
    r = await c.get("/login", params={"token": TOKEN})
    assert r.status_code == 303
    cookie = r.headers["set-cookie"]
    assert f"{COOKIE}={cookie_value(TOKEN)}" in cookie and TOKEN not in cookie
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    c.cookies.set(COOKIE, cookie_value(TOKEN))
    assert (await c.get("/api/v1/sessions")).status_code == 200
    c.cookies.set(COOKIE, TOKEN)  # the raw token is not a valid cookie
    assert (await c.get("/api/v1/sessions")).status_code == 401


async def test_login_form_post(client: Client) -> None:
    c = client(token=TOKEN)
    r = await c.post("/login", data={"token": TOKEN})
    assert r.status_code == 303 and cookie_value(TOKEN) in r.headers["set-cookie"]
    bad = await c.post("/login", data={"token": TOKEN + "x"})
    assert bad.status_code == 401 and "set-cookie" not in bad.headers
    huge = await c.post(
        "/login", content=b"token=" + b"a" * 10_000, headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert huge.status_code == 401
    many = await c.post("/login", content=b"&".join(b"a=%d" % i for i in range(50)))
    assert many.status_code == 401


async def test_logout_clears_the_cookie(client: Client) -> None:
    r = await client(token=TOKEN).get("/logout")
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert f'{COOKIE}=""' in r.headers["set-cookie"] and "Max-Age=0" in r.headers["set-cookie"]


async def test_a_browser_asking_for_a_page_is_sent_to_the_login(client: Client) -> None:
    c = client(token=TOKEN)
    page = await c.get("/", headers={"Accept": "text/html,application/xhtml+xml"})
    assert page.status_code == 303 and page.headers["location"] == "/login"
    api = await c.get("/api/v1/sessions", headers={"Accept": "text/html"})
    assert api.status_code == 401


def test_token_comparison_takes_any_text() -> None:
    assert is_authorized("", None, None)
    assert is_authorized(TOKEN, f"Bearer {TOKEN}", None)
    assert is_authorized(TOKEN, f"bearer  {TOKEN} ", None)
    assert is_authorized(TOKEN, None, cookie_value(TOKEN))
    assert not is_authorized(TOKEN, "Bearer ünïcödé", "ü")
    assert not is_authorized(TOKEN, "Bearer", "")
    assert not is_authorized("tökén", "Bearer tökén".encode().decode("latin-1"), None)  # headers arrive as latin-1
    assert not is_authorized(TOKEN, f"Bearer {TOKEN}x", None)


async def test_openapi_declares_the_token_only_when_set(client: Client) -> None:
    open_doc = (await client().get("/api/v1/openapi.json")).json()
    assert "securitySchemes" not in open_doc.get("components", {})
    doc = (await client(token=TOKEN).get("/api/v1/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})).json()
    assert set(doc["components"]["securitySchemes"]) == {"bearer", "cookie"}
    sessions = doc["paths"]["/api/v1/sessions"]["get"]
    assert sessions["security"] == [{"bearer": []}, {"cookie": []}] and "401" in sessions["responses"]
    assert "security" not in doc["paths"]["/healthz"]["get"]


@pytest.mark.parametrize("path", ["/healthz", "/api/v1/sessions", "/login", f"/api/v1/artifacts/{SHA_UPLOAD}"])
async def test_security_headers(client: Client, path: str) -> None:
    r = await client(token=TOKEN).get(path)
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["referrer-policy"] == "no-referrer"
    if path.startswith("/api/"):
        assert r.headers["cache-control"] == "no-store"


# -- the refusal rule --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("listen", "token", "refused"),
    [
        ("127.0.0.1:8080", "", False),
        ("127.0.0.2:8080", "", False),
        ("localhost:8080", "", False),
        ("[::1]:8080", "", False),
        ("0.0.0.0:8080", "", True),
        (":8080", "", True),
        ("[::]:8080", "", True),
        ("192.0.2.10:8080", "", True),
        ("example.org:8080", "", True),
        ("0.0.0.0:8080", "t0ken", False),
    ],
)
def test_check_exposure(listen: str, token: str, refused: bool) -> None:
    settings = load_settings(None, {"api": {"listen": listen, "token": token}})
    if not refused:
        check_exposure(settings)
        return
    with pytest.raises(ConfigError) as err:
        check_exposure(settings)
    message = str(err.value)
    assert "api.listen" in message and "api.token" in message and "127.0.0.1:8080" in message
