"""The web UI in a real browser against a real honeypot: hostile attacker text stays text, the player plays.

An attacker logs in over SSH (asyncssh as the client) with usernames and passwords that are XSS payloads
(rejected as invalid users, still recorded), then as root, with payloads as its SSH client version, runs
them as shell commands and, with terminal escape sequences, as an exec command. The API with the pages runs on a real uvicorn socket on
127.0.0.1 against that honeypot's storage, and Debian's headless Chromium (driven by Playwright, never
``playwright install``) loads the dashboard, the sessions list and the session page: no payload runs
(``window.__pwned`` stays undefined, no CSP violation), the payloads show as text, the replay plays,
clicking a command seeks, and the live view follows an open shell. Requests to anything but
127.0.0.1 are aborted and counted: the pages must work offline. Screenshots go to test-output/.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import asyncssh
import pytest
import uvicorn
from fastapi import FastAPI

from sandtrap.api.deps import ApiDeps
from sandtrap.api.web import has_vendor_assets, mount
from sandtrap.events import LOGIN_FAILED, SESSION_CLOSED, SESSION_CONNECT
from sandtrap.storage.records import SessionDetail

from sshclient import asyncssh_connected as connect

pytestmark = pytest.mark.timeout(420)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

IMG = '<img src=x onerror="window.__pwned=1">'
SCRIPT = "</script><script>window.__pwned=1</script>"
TEMPLATE = "{{7*7}}"
ESCAPES = "\x1b]0;pwned-title\x07\x1b[31mred\x1b[0m"
# Usernames with control characters never reach an auth attempt (the SSH layer refuses them per RFC 4013),
# so the escape sequences travel in an exec command instead.
BAD_USERNAMES = [IMG, SCRIPT, TEMPLATE]
MARKER_CMD = "echo SANDTRAP_MARKER_$((6*7))"
MARKER_OUT = "SANDTRAP_MARKER_42"  # only in the output: the typed command has $((6*7))
PROMPT = re.compile(rb"root@[\w.-]+:[^\r\n]*# ")

Honeypot = Callable[..., Any]


def _needs_browser() -> None:
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium: run scripts/chromium.sh")
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("playwright (Python) is not installed: pip install -e '.[dev]'")
    if not has_vendor_assets():
        pytest.fail("static/vendor is missing: run scripts/web-assets.sh")


# -- the attacker -------------------------------------------------------------------------------------------
async def session_id(hp: Any, conn: asyncssh.SSHClientConnection) -> str:
    port = int(conn.get_extra_info("sockname")[1])
    (event,) = await hp.wait_for(SESSION_CONNECT, src_port=port)
    return str(event.session)


async def read_until(stream: asyncssh.SSHReader[bytes], pattern: re.Pattern[bytes], timeout_s: float = 30.0) -> bytes:
    buf = b""
    async with asyncio.timeout(timeout_s):
        while not pattern.search(buf):
            chunk = await stream.read(4096)
            if not chunk:
                raise AssertionError(f"EOF before {pattern.pattern!r}; got {buf!r}")
            buf += chunk
    return buf


async def failed_logins(hp: Any) -> None:
    """One connection per hostile username: each is an invalid user, rejected, and recorded."""
    for name in BAD_USERNAMES:
        with pytest.raises(asyncssh.PermissionDenied):
            async with connect(hp, username=name, password=SCRIPT):
                pass


async def shell_session(hp: Any) -> str:
    """Root logs in (its client version a payload too) and types the payloads at a shell, seconds apart."""
    async with connect(hp, client_version=IMG) as conn:
        sid = await session_id(hp, conn)
        proc = await conn.create_process(term_type="xterm-256color", term_size=(100, 30), encoding=None)
        await read_until(proc.stdout, PROMPT)
        for line in (f"echo '{IMG}'", f"echo '{SCRIPT}'", f"echo '{TEMPLATE}'"):
            proc.stdin.write(line.encode() + b"\n")
            await read_until(proc.stdout, PROMPT)
            await asyncio.sleep(0.6)
        await asyncio.sleep(2.0)  # the marker command sits well into the recording
        proc.stdin.write(MARKER_CMD.encode() + b"\n")
        await read_until(proc.stdout, re.compile(MARKER_OUT.encode()))
        await asyncio.sleep(1.0)
        proc.stdin.write(b"exit\n")
        async with asyncio.timeout(30):
            await proc.stdout.read()
            await proc.wait()
    return sid


async def exec_session(hp: Any) -> str:
    """An exec command carrying real escape characters (a shell's line editor would eat them)."""
    async with connect(hp, client_version=SCRIPT) as conn:
        sid = await session_id(hp, conn)
        result = await conn.run(f"echo '{IMG}' '{ESCAPES}'", timeout=60)
        assert result.exit_status == 0
    return sid


async def stored(hp: Any, sid: str, check: Callable[[SessionDetail], bool], timeout_s: float = 30.0) -> SessionDetail:
    """The session as the repository has it, once ``check`` holds (the database sink writes behind)."""
    repo = hp.services.repository
    deadline = time.monotonic() + timeout_s
    while True:
        found = await asyncio.to_thread(repo.get_session, sid)
        if found is not None and check(found):
            return found
        assert time.monotonic() < deadline, f"session {sid} not stored as expected: {found}"
        await asyncio.sleep(0.1)


# -- the web app on a real socket ---------------------------------------------------------------------------
def web_app(deps: ApiDeps) -> FastAPI:
    """The real API app when it exists (it mounts the pages); otherwise the pages alone."""
    if importlib.util.find_spec("sandtrap.api.app") is not None:
        from sandtrap.api.app import create_app

        return create_app(deps)
    app = FastAPI()
    mount(app, deps)
    return app


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # leave pytest's signal handlers alone


@contextlib.asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = _Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:
                await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        stopping = getattr(app.state, "stopping", None)
        if isinstance(stopping, asyncio.Event):
            stopping.set()  # the API's live streams end
        server.should_exit = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await task
        sock.close()


# -- the browser --------------------------------------------------------------------------------------------
WATCH_SCRIPT = """
window.__csp = [];
document.addEventListener('securitypolicyviolation', (e) => {
  window.__csp.push(e.violatedDirective + ' ' + (e.blockedURI || '') + ' ' + (e.sample || ''));
});
"""


class Browser:
    """One Chromium page that records console errors, page errors and requests that left 127.0.0.1."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        self.outside: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("console", lambda msg: msg.type == "error" and self.errors.append(f"console: {msg.text}"))

    async def route(self, route: Any) -> None:
        host = urlsplit(route.request.url).hostname
        if route.request.url.startswith("data:") or host == "127.0.0.1":
            await route.continue_()
        else:
            self.outside.append(route.request.url)
            await route.abort()

    async def open(self, url: str) -> None:
        response = await self.page.goto(url, wait_until="load")
        assert response is not None and response.status == 200, (url, response and response.status)
        csp = response.headers.get("content-security-policy", "")
        assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp, csp
        await self.page.wait_for_timeout(300)

    async def assert_unharmed(self) -> None:
        assert await self.page.evaluate("typeof window.__pwned") == "undefined"
        violations = await self.page.evaluate("window.__csp")
        assert violations == [], violations  # nothing was even tried: no inline script or style got in
        assert self.outside == [], self.outside

    async def text(self) -> str:
        return str(await self.page.inner_text("body"))

    async def shot(self, path: Path) -> None:
        await self.page.screenshot(path=str(path), full_page=True)


@contextlib.asynccontextmanager
async def browser_page() -> AsyncIterator[Browser]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            context = await browser.new_context(viewport={"width": 1440, "height": 900}, device_scale_factor=1)
            page = await context.new_page()
            b = Browser(page)
            await context.route("**/*", b.route)
            await context.add_init_script(WATCH_SCRIPT)
            page.set_default_timeout(20_000)
            yield b
        finally:
            await browser.close()


def deps_for(hp: Any) -> ApiDeps:
    s = hp.services
    return ApiDeps(
        settings=hp.settings,
        repository=s.repository,
        live=s.ctx.hub.live,
        pool_stats=s.pool.stats,
        engine_ping=s.backend.ping,
    )


# -- the test -----------------------------------------------------------------------------------------------
async def test_hostile_sessions_render_as_text_and_replay(honeypot: Honeypot, output_dir: Path) -> None:
    _needs_browser()
    hp = await honeypot()
    await failed_logins(hp)
    shell = await shell_session(hp)
    exec_sid = await exec_session(hp)
    await hp.wait_for(SESSION_CLOSED, count=len(BAD_USERNAMES) + 2)
    detail = await stored(
        hp, shell, lambda d: d.ended_at is not None and len(d.commands) >= 4 and all(c.closed_at for c in d.casts)
    )
    await stored(hp, exec_sid, lambda d: d.ended_at is not None and len(d.commands) == 1)
    marker = next(i for i, c in enumerate(detail.commands) if c.input == MARKER_CMD)

    async with serving(web_app(deps_for(hp))) as base, browser_page() as b:
        # Dashboard: totals, chart, top lists with the payload usernames and passwords.
        await b.open(base + "/")
        await b.page.wait_for_function("() => document.getElementById('pool-note').textContent.includes('updated')")
        text = await b.text()
        assert IMG in text and SCRIPT in text and TEMPLATE in text
        assert "\\x1b]0;pwned-title\\x07" in text  # the escape sequence, shown as escapes
        assert await b.page.locator("svg.chart rect.bar").count() >= 1
        assert "warm" in await b.page.inner_text("#pool-values")
        await b.assert_unharmed()
        await b.shot(output_dir / "web-dashboard.png")

        # Sessions list (the client versions are payloads), then searches by command substring.
        await b.open(base + "/sessions")
        text = await b.text()
        assert IMG in text and SCRIPT in text
        await b.assert_unharmed()
        await b.shot(output_dir / "web-sessions.png")
        await b.page.fill("input[name=command]", "onerror")
        await b.page.select_option("select[name=has_artifacts]", "")
        await b.page.click("form.filters button[type=submit]")
        await b.page.wait_for_url(re.compile(r"command=onerror"))
        rows = await b.page.locator("table.sessions tbody tr").count()
        assert rows == 2, await b.text()  # the shell session and the exec session
        await b.assert_unharmed()

        # The payload itself as the search text: it comes back in the form as a value, never as markup.
        await b.open(base + "/sessions?" + urlencode({"command": IMG, "since": SCRIPT}))
        assert await b.page.input_value("input[name=command]") == IMG
        assert await b.page.input_value("input[name=since]") == SCRIPT
        assert await b.page.locator("table.sessions tbody tr").count() == 2
        assert "is not a date" in await b.text()
        await b.assert_unharmed()

        # A failed login's page: the hostile usernames in the attempts table, as text.
        for name in (IMG, TEMPLATE):
            (failed,) = [e for e in hp.events(LOGIN_FAILED) if e.get("username") == name]
            await b.open(f"{base}/sessions/{failed.session}")
            shown = await b.page.inner_text("table.data")
            assert name in shown and SCRIPT in shown, shown  # the username, and the password tried
            await b.assert_unharmed()

        # The exec session: the command with real escape characters, shown escaped.
        await b.open(f"{base}/sessions/{exec_sid}")
        assert "\\x1b]0;pwned-title\\x07\\x1b[31mred" in await b.page.inner_text("#commands")
        assert await b.page.locator("#commands .ctl").count() >= 4
        await b.assert_unharmed()

        # The shell session: replay, commands, seek.
        await b.open(f"{base}/sessions/{shell}")
        await b.page.wait_for_selector("#player .ap-term")
        text = await b.text()
        for payload in (IMG, SCRIPT, TEMPLATE):
            assert f"echo '{payload}'" in text
        player_time = "() => window.sandtrapPlayer.getCurrentTime()"

        # Clicking a command before anything played: the player loads, seeks there and plays on.
        data = json.loads(await b.page.inner_text("#player-data"))
        offset = data["commands"][marker]["offset"]
        assert offset > 2.0, data
        await b.page.click(f"#commands button.seek[data-command='{marker}']")
        await b.page.wait_for_function(f"() => Math.abs(({player_time})() - {offset}) < 1.5", timeout=15_000)
        await b.page.wait_for_function(
            f"() => document.querySelector('#player .ap-term').textContent.includes('{MARKER_OUT}')", timeout=15_000
        )
        assert await b.page.locator("#commands li.active").count() == 1
        await b.assert_unharmed()

        # Back to the start and play: the time advances and the terminal shows the session's output.
        await b.page.wait_for_function("() => document.getElementById('pc-play').textContent !== 'Pause'")
        await b.page.click("#pc-start")
        await b.page.wait_for_function(f"() => ({player_time})() < 1.5", timeout=15_000)
        await b.page.wait_for_function(f"() => ({player_time})() > 0.8", timeout=15_000)
        await b.page.wait_for_function(
            "() => document.querySelector('#player .ap-term').textContent.includes('onerror=\"window.__pwned=1\"')",
            timeout=15_000,
        )
        await b.shot(output_dir / "web-session-playing.png")

        # Go to a time; then 4x speed (the player is re-created where it was).
        await b.page.click("#pc-play")  # pause
        await b.page.fill("#pc-goto", "0:02")
        await b.page.press("#pc-goto", "Enter")
        await b.page.wait_for_function(f"() => Math.abs(({player_time})() - 2) < 1.0", timeout=15_000)
        await b.page.select_option("#pc-speed", "4")
        await b.page.wait_for_selector("#player .ap-term")
        await b.page.wait_for_function(f"() => ({player_time})() >= 1.5", timeout=15_000)
        await b.assert_unharmed()
        assert b.errors == [], b.errors
        await b.shot(output_dir / "web-session.png")


async def test_live_view_follows_an_open_shell(honeypot: Honeypot, output_dir: Path) -> None:
    _needs_browser()
    hp = await honeypot()
    async with connect(hp) as conn:
        sid = await session_id(hp, conn)
        proc = await conn.create_process(term_type="xterm", term_size=(90, 24), encoding=None)
        await read_until(proc.stdout, PROMPT)
        async with serving(web_app(deps_for(hp))) as base, browser_page() as b:
            await b.open(f"{base}/sessions/{sid}")
            assert "live" in await b.page.inner_text(".page-head")
            await b.page.click("#live-start")
            await b.page.wait_for_selector("#live-player .ap-term")
            await asyncio.sleep(1.0)  # the stream is subscribed before anything is typed
            proc.stdin.write(f"echo '{IMG}'; echo LIVE_$((5*5))\n".encode())
            await read_until(proc.stdout, re.compile(rb"LIVE_25"))
            await b.page.wait_for_function(
                "() => document.querySelector('#live-player .ap-term').textContent.includes('LIVE_25')", timeout=15_000
            )
            assert IMG in await b.page.inner_text("#live-player")
            await b.assert_unharmed()
            assert b.errors == [], b.errors
            await b.shot(output_dir / "web-live.png")
            proc.stdin.write(b"exit\n")
            async with asyncio.timeout(30):
                await proc.stdout.read()
                await proc.wait()
            await b.page.wait_for_function(
                "() => document.getElementById('live-note').textContent.includes('ended')", timeout=15_000
            )
