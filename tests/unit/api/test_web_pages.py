"""The pages over HTTP (httpx's ASGI transport, no sockets) against SQLite filled through the real sink.

Hostile sessions, then 60 plain ones for the pager. The pages are mounted on a bare FastAPI app
(``mount``), and once on the API's own app (``create_app``) to check they live together.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from sandtrap import events as ev
from sandtrap.api.deps import ApiDeps
from sandtrap.api.web import has_vendor_assets, mount
from sandtrap.api.web.renderer import CSP, CSP_WITH_PLAYER
from sandtrap.bridge.live import LiveHub
from sandtrap.config import Settings, load_settings
from sandtrap.events import Event
from sandtrap.outputs.database import DatabaseSink
from sandtrap.sandbox.base import TermSize
from sandtrap.storage.migrate import upgrade
from sandtrap.storage.repository import Repository

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "storage"))

from storage_suite import Conn

NOW = datetime.now(UTC).replace(microsecond=0)
T0 = NOW.replace(minute=0, second=0) - timedelta(hours=3)  # whole hour: its sessions share one bar
IMG = '<img src=x onerror="window.__pwned=1">'
SCRIPT = "</script><script>window.__pwned=1</script>"
OSC = "\x1b]0;title\x07"
SHELL, FAILED, OPEN = "5e55100000a1", "5e55100000b2", "5e55100000c3"
SHA = "e" * 64
PLAIN = 60
CHANGED = {"/root/.ssh/authorized_keys": "attacker", "/var/log/wtmp": "login", "/var/log/nginx/access.log": "system"}
EXPECTED_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'"
)


def hostile_events() -> list[Event]:
    a = Conn(SHELL, src_ip="203.0.113.7", start=T0)
    b = Conn(FAILED, src_ip="198.51.100.20", start=T0 + timedelta(minutes=5))
    c = Conn(OPEN, src_ip="198.51.100.30", start=T0 + timedelta(minutes=10))
    cast = f"casts/{SHELL}/0.cast"
    return [
        a(ev.SESSION_CONNECT, after_s=0),
        a(ev.CLIENT_VERSION, version=f"SSH-2.0-{IMG}"),
        a(ev.LOGIN_FAILED, username=IMG, password=SCRIPT, method="password"),
        a(ev.LOGIN_SUCCESS, username="root", password="hunter2", method="password"),
        a(ev.CHANNEL_OPEN, channel=0),
        a(ev.LOG_OPEN, ttylog=cast, channel=0),
        a(ev.COMMAND_INPUT, input=f"echo '{IMG}'", channel=0, source="tty"),
        a(ev.COMMAND_INPUT, input=f"printf '{OSC}' # 100%_done", channel=0, source="tty", after_s=2.5),
        a(
            ev.SESSION_FILE_UPLOAD,
            filename=f"/tmp/{SCRIPT}",
            outfile=f"artifacts/{SHA}",
            shasum=SHA,
            size=4,
            stored=True,
        ),
        a(ev.LOG_CLOSED, ttylog=cast, channel=0, size=10, shasum=SHA, duration="5.0", duration_ms=5000),
        *(
            a(
                ev.SESSION_FILE_CHANGED,
                filename=path,
                kind="C",
                origin=origin,
                shasum="",
                size=1,
                outfile="",
                stored=False,
            )
            for path, origin in CHANGED.items()
        ),
        a(ev.SESSION_CLOSED, duration="9.0", duration_ms=9000, reason="client_closed", bytes_in=1, bytes_out=2),
        b(ev.SESSION_CONNECT, after_s=0),
        b(ev.LOGIN_FAILED, username=SCRIPT, password=IMG, method="password"),
        b(ev.SESSION_CLOSED, duration="1.0", duration_ms=1000, reason="client_closed", bytes_in=1, bytes_out=2),
        c(ev.SESSION_CONNECT, after_s=0),
        c(ev.LOGIN_SUCCESS, username="admin", password="admin", method="password"),
    ]


def plain_events() -> list[Event]:
    out: list[Event] = []
    for i in range(PLAIN):
        c = Conn(f"9a{i:010x}", src_ip="192.0.2.77", start=T0 - timedelta(days=2, minutes=i))
        out += [c(ev.SESSION_CONNECT, after_s=0), c(ev.SESSION_CLOSED, duration="1.0", duration_ms=1000, reason="x")]
    return out


class Text(HTMLParser):
    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.blocks: dict[str, str] = {}
        self._block: str | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "script" and a.get("type") == "application/json":
            self._block = a.get("id") or ""
            self.blocks[self._block] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._block = None

    def handle_data(self, data: str) -> None:
        if self._block is not None:
            self.blocks[self._block] += data
        else:
            self.parts.append(data)

    @property
    def text(self) -> str:
        return " ".join("".join(self.parts).split())


@pytest.fixture(scope="module")
def web_database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("web") / "sandtrap.db"
    url = f"sqlite:///{path}"
    upgrade(url)
    sink = DatabaseSink(url)
    try:
        for event in [*hostile_events(), *plain_events()]:
            sink.write(event)
        assert sink.flush(30), sink.status()
    finally:
        sink.close(5)
    return path


@pytest.fixture
def web_settings(tmp_path: Path, web_database: Path) -> Settings:
    return load_settings(
        None, {"storage": {"database_url": f"sqlite:///{web_database}", "data_dir": str(tmp_path)}, "sensor": "s1"}
    )


@pytest.fixture
async def pages(web_settings: Settings) -> AsyncIterator[Callable[..., httpx.AsyncClient]]:
    """Factory: ``pages(live=hub, app=...)``: an httpx client on the pages (closed after)."""
    made: list[httpx.AsyncClient] = []
    repos: list[Repository] = []

    def make(
        build: Callable[[ApiDeps], FastAPI] | None = None, url: str | None = None, **deps: Any
    ) -> httpx.AsyncClient:
        repo = Repository(url or web_settings.database_url)
        repos.append(repo)
        d = ApiDeps(web_settings, repo, **deps)
        if build is None:
            app = FastAPI()
            mount(app, d)
        else:
            app = build(d)
        c = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")
        made.append(c)
        return c

    try:
        yield make
    finally:
        for c in made:
            await c.aclose()
        for r in repos:
            r.close()


async def get_page(c: httpx.AsyncClient, url: str, status: int = 200) -> tuple[httpx.Response, Text]:
    r = await c.get(url)
    assert r.status_code == status, (url, r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("text/html")
    return r, Text(r.text)


# -- headers ----------------------------------------------------------------------------------------------
def test_csp_is_the_strict_one() -> None:
    assert CSP.startswith(EXPECTED_CSP)
    assert "unsafe-inline" not in CSP and "unsafe-eval" not in CSP
    assert CSP_WITH_PLAYER == CSP.replace("script-src 'self'", "script-src 'self' 'wasm-unsafe-eval'")


@pytest.mark.parametrize("url", ["/", "/sessions", f"/sessions/{SHELL}", "/sessions/nope"])
async def test_every_page_carries_the_security_headers(pages: Callable[..., httpx.AsyncClient], url: str) -> None:
    r = await pages().get(url)
    expected = CSP_WITH_PLAYER if url == f"/sessions/{SHELL}" else CSP
    assert r.headers["content-security-policy"] == expected
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert r.headers["cache-control"] == "no-store"


# -- dashboard ---------------------------------------------------------------------------------------------
async def test_dashboard_totals_tops_and_chart(pages: Callable[..., httpx.AsyncClient]) -> None:
    c = pages(pool_stats=lambda: {"warm": 2, "active": 1})
    _, page = await get_page(c, "/")
    assert "last 7 days, 63 sessions" in page.text  # the 60 plain ones are two days old
    assert IMG in page.text and SCRIPT in page.text and "\\x1b]0;title\\x07" in page.text
    assert json.loads(page.blocks["status-data"]) == {"pool": {"warm": 2, "active": 1}}
    r, page = await get_page(c, "/?range=24h")
    assert "last 24 hours, 3 sessions" in page.text
    assert len(re.findall(r'<rect class="bar"', r.text)) == 1  # the three hostile sessions, one hour
    assert "all time, 63 sessions" in (await get_page(c, "/?range=all"))[1].text
    assert (await c.get("/?range=<script>")).status_code == 200


async def test_dashboard_survives_a_failing_pool_stats(pages: Callable[..., httpx.AsyncClient]) -> None:
    def broken() -> dict[str, int]:
        raise RuntimeError("boom")

    _, page = await get_page(pages(pool_stats=broken), "/")
    assert json.loads(page.blocks["status-data"]) == {}


# -- sessions list ------------------------------------------------------------------------------------------
async def sessions_shown(c: httpx.AsyncClient, query: str) -> list[str]:
    r = await c.get("/sessions" + query)
    assert r.status_code == 200
    return re.findall(r'<td><a class="mono" href="/sessions/([0-9a-f]+)">', r.text)


async def test_sessions_filters(pages: Callable[..., httpx.AsyncClient]) -> None:
    c = pages()
    assert await sessions_shown(c, "?src_ip=203.0.113.7") == [SHELL]
    assert await sessions_shown(c, "?username=admin") == [OPEN]
    assert await sessions_shown(c, "?command=ONERROR") == [SHELL]  # case-insensitive substring
    assert await sessions_shown(c, "?command=100%25_d") == [SHELL]  # % and _ match themselves
    assert await sessions_shown(c, "?command=1000_d") == []
    assert await sessions_shown(c, "?has_artifacts=yes") == [SHELL]
    assert await sessions_shown(c, "?since=1d") == [OPEN, FAILED, SHELL]
    assert await sessions_shown(c, "?since=1d&sort=started_at") == [SHELL, FAILED, OPEN]
    assert len(await sessions_shown(c, "?has_artifacts=no&since=1d")) == 2


async def test_sessions_pages(pages: Callable[..., httpx.AsyncClient]) -> None:
    c = pages()
    r, page = await get_page(c, "/sessions?per_page=25&page=2")
    assert "26–50 of 63" in page.text
    assert len(await sessions_shown(c, "?per_page=25&page=2")) == 25
    assert 'href="/sessions?per_page=25&amp;page=3" rel="next"' in r.text
    assert 'href="/sessions?per_page=25" rel="prev"' in r.text
    assert len(await sessions_shown(c, "?per_page=25&page=3")) == 13
    assert await sessions_shown(c, "?per_page=25&page=99") == []
    every = await sessions_shown(c, "?per_page=200")
    assert len(every) == len(set(every)) == PLAIN + 3


async def test_sessions_form_reports_a_bad_since_and_still_lists(pages: Callable[..., httpx.AsyncClient]) -> None:
    r, page = await get_page(pages(), "/sessions?since=%3Cscript%3E&src_ip=203.0.113.7")
    assert "since: '<script>' is not a date" in page.text
    assert "<script>'" not in r.text
    assert await sessions_shown(pages(), "?since=%3Cscript%3E&src_ip=203.0.113.7") == [SHELL]


async def test_sessions_marks_live_ones(pages: Callable[..., httpx.AsyncClient]) -> None:
    hub = LiveHub()
    hub.open(OPEN, TermSize(100, 30))
    r = await pages(live=hub).get("/sessions?since=1d")
    assert r.text.count('<span class="badge live">live</span>') == 1


# -- one session ------------------------------------------------------------------------------------------
async def test_session_page(pages: Callable[..., httpx.AsyncClient]) -> None:
    r, page = await get_page(pages(), f"/sessions/{SHELL}")
    assert f"echo '{IMG}'" in page.text
    assert "printf '\\x1b]0;title\\x07' # 100%_done" in page.text
    assert f"/tmp/{SCRIPT}" in page.text and "SSH-2.0-" + IMG in page.text
    data = json.loads(page.blocks["player-data"])
    assert data["recordings"] == [
        {"index": 0, "url": f"/api/v1/sessions/{SHELL}/cast", "label": "channel 0", "channel": 0, "closed": True}
    ]
    assert data["commands"] == [{"recording": 0, "offset": 1.0}, {"recording": 0, "offset": 3.5}]
    assert data["live"] is None
    assert f'href="/api/v1/artifacts/{SHA}"' in r.text
    assert '<script src="/static/vendor/asciinema-player.min.js" defer></script>' in r.text
    assert '<link rel="stylesheet" href="/static/vendor/asciinema-player.css">' in r.text
    assert 'id="live-start"' not in r.text


def _between(html: str, start: str, end: str) -> str:
    return html[html.index(start) : html.index(end, html.index(start))]


async def test_session_page_keeps_the_bookkeeping_apart_and_collapsed(pages: Callable[..., httpx.AsyncClient]) -> None:
    r, _ = await get_page(pages(), f"/sessions/{SHELL}")
    section = _between(r.text, 'id="changed-files"', "</section>")
    bookkeeping = _between(section, '<details id="bookkeeping">', "</details>")
    assert '<details id="bookkeeping" open' not in section
    mine = section.replace(bookkeeping, "")
    assert "/root/.ssh/authorized_keys" in mine and "/var/log/wtmp" not in mine
    assert "/var/log/wtmp" in bookkeeping and "/var/log/nginx/access.log" in bookkeeping
    assert "by the session, since it began: 1" in section and "daemons: 2" in section


async def test_failed_session_page_lists_the_attempts(pages: Callable[..., httpx.AsyncClient]) -> None:
    _, page = await get_page(pages(), f"/sessions/{FAILED}")
    assert f"{SCRIPT} {IMG} rejected" in page.text
    assert "No terminal recording for this session (it never logged in)" in page.text


async def test_live_session_offers_the_live_view(pages: Callable[..., httpx.AsyncClient]) -> None:
    hub = LiveHub()
    hub.open(OPEN, TermSize(132, 43))
    r, page = await get_page(pages(live=hub), f"/sessions/{OPEN}")
    assert json.loads(page.blocks["player-data"])["live"] == {
        "url": f"/api/v1/sessions/{OPEN}/live",
        "cols": 132,
        "rows": 43,
    }
    assert 'id="live-start"' in r.text
    hub.close(OPEN)
    r, page = await get_page(pages(live=hub), f"/sessions/{OPEN}")
    assert json.loads(page.blocks["player-data"])["live"] is None


async def test_unknown_session_is_a_404_page(pages: Callable[..., httpx.AsyncClient]) -> None:
    r, page = await get_page(pages(), "/sessions/%3Cimg%20src%3Dx%3E", status=404)
    assert "There is no session '<img src=x>'." in page.text
    assert "<img" not in r.text


async def test_storage_down_is_a_503_page(pages: Callable[..., httpx.AsyncClient], tmp_path: Path) -> None:
    c = pages(url=f"sqlite:///{tmp_path / 'empty' / 'not-migrated.db'}")
    for url in ("/", "/sessions", f"/sessions/{SHELL}"):
        _, page = await get_page(c, url, status=503)
        assert "Storage unavailable" in page.text


# -- static files ---------------------------------------------------------------------------------------------
async def test_static_files(pages: Callable[..., httpx.AsyncClient]) -> None:
    c = pages()
    for name, kind in (("sandtrap.css", "text/css"), ("session.js", "javascript"), ("dashboard.js", "javascript")):
        r = await c.get(f"/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"], name
    if has_vendor_assets():
        r = await c.get("/static/vendor/asciinema-player.min.js")
        assert r.status_code == 200 and "AsciinemaPlayer" in r.text
    assert (await c.get("/static/../pages.py")).status_code == 404


# -- on the API's own app -----------------------------------------------------------------------------------
async def test_pages_on_the_api_app_behind_its_token(
    pages: Callable[..., httpx.AsyncClient], web_settings: Settings
) -> None:
    create_app = pytest.importorskip("sandtrap.api.app").create_app
    web_settings.api.token = "s3cret-token"  # type: ignore[misc]  # a fresh Settings per test
    c = pages(build=create_app)
    r = await c.get("/", headers={"accept": "text/html"})
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
    r = await c.get(f"/sessions/{SHELL}", headers={"authorization": "Bearer s3cret-token"})
    assert r.status_code == 200
    assert r.headers["content-security-policy"] == CSP_WITH_PLAYER  # the page's own, not the API's
    r = await c.get("/sessions", headers={"authorization": "Bearer s3cret-token"})
    assert r.status_code == 200 and 'href="/logout"' in r.text
    r = await c.get("/static/sandtrap.css", headers={"authorization": "Bearer s3cret-token"})
    assert r.status_code == 200
