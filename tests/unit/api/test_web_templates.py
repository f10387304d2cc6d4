"""Every page's template rendered with attacker text in every field: the text shows, nothing becomes markup.

The rendered HTML is parsed as a browser would tokenize it; each page must hold exactly the elements
the template wrote (no ``img``, no extra ``script``, no event-handler or ``style`` attribute) and the
payloads must come back as the page's text.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from sandtrap.api.web import STATIC
from sandtrap.api.web import detail as view
from sandtrap.api.web.listing import PAGE_SIZES, SORTS, Pager, parse_query, sensor_param
from sandtrap.api.web.renderer import TEMPLATES, Renderer, make_environment
from sandtrap.api.web.timeline import chart, fill_hours
from sandtrap.storage.records import (
    ArtifactInfo,
    AuthAttemptInfo,
    CastInfo,
    CommandInfo,
    Count,
    HourCount,
    PairCount,
    SandboxInfo,
    SensorInfo,
    SessionDetail,
    Stats,
)

T0 = datetime(2026, 3, 4, 5, 0, tzinfo=UTC)
IMG = "<img src=x onerror=alert(1)>"
SCRIPT = "</script><script>window.pwned=1</script>"
TEMPLATE = "{{7*7}}"
OSC = "\x1b]0;title\x07"
LS = "line\u2028sep"
PAYLOADS = [IMG, SCRIPT, TEMPLATE, OSC, LS]
HOSTILE = "".join(PAYLOADS)
SHOWN = {  # how each payload reads on the page
    IMG: IMG,
    SCRIPT: SCRIPT,
    TEMPLATE: TEMPLATE,
    OSC: "\\x1b]0;title\\x07",
    LS: "line\\u2028sep",
}
SHA = "d" * 64


class Page(HTMLParser):
    """Tags, attributes, script blocks and text of a page, as the HTML tokenizer sees them."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self.text_parts: list[str] = []
        self._script: dict[str, str | None] | None = None
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "script":
            self._script = dict(attrs)
            self.scripts.append((self._script, ""))

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._script = None

    def handle_data(self, data: str) -> None:
        if self._script is not None:
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)
        else:
            self.text_parts.append(data)

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def names(self) -> set[str]:
        return {tag for tag, _ in self.tags}

    def json_block(self, element_id: str) -> Any:
        (text,) = [t for attrs, t in self.scripts if attrs.get("id") == element_id]
        return json.loads(text)


def assert_inert(page: Page) -> None:
    assert "img" not in page.names()
    for tag, attrs in page.tags:
        for name in attrs:
            assert not name.startswith("on"), (tag, attrs)
            assert name != "style", (tag, attrs)
        if tag == "script":
            assert attrs.get("type") == "application/json" or (attrs.get("src") or "").startswith("/static/"), attrs
    for attrs, text in page.scripts:
        if attrs.get("src"):
            assert text == "", attrs  # a script with a src has no inline code
    for _, attrs in page.tags:
        for name in ("href", "src", "action"):
            value = attrs.get(name)
            assert value is None or value.startswith(("/", "#", "?")) or value == "", (name, value)


def hostile_detail(session_id: str = "0123456789ab") -> SessionDetail:
    def cmd(n: int, text: str, channel: int | None = 0, source: str = "tty") -> CommandInfo:
        return CommandInfo(
            session=session_id, timestamp=T0 + timedelta(seconds=n), channel=channel, input=text, source=source
        )

    def art(path: str, via: str, stored: bool, sha: str | None = SHA, origin: str | None = None) -> ArtifactInfo:
        return ArtifactInfo(
            session=session_id,
            timestamp=T0 + timedelta(seconds=9),
            sha256=sha,
            path=path,
            size=123,
            mode="0644",
            via=via,
            kind=HOSTILE,
            origin=origin,
            stored=stored,
            outfile=None,
        )

    return SessionDetail(
        id=session_id,
        sensor=HOSTILE,
        protocol="ssh",
        src_ip="203.0.113.7",
        src_port=50022,
        dst_ip="192.0.2.1",
        dst_port=22,
        started_at=T0,
        ended_at=T0 + timedelta(seconds=30),
        duration_ms=30_000,
        close_reason=HOSTILE,
        client_version="SSH-2.0-" + HOSTILE,
        hassh=HOSTILE,
        hassh_algorithms=HOSTILE,
        key_type=HOSTILE,
        key_fingerprint=HOSTILE,
        username=HOSTILE,
        login_success=True,
        auth_attempts_count=2,
        commands_count=len(PAYLOADS) + 1,
        artifacts_count=3,
        sandbox_id="c0ffee",
        sandbox_name=HOSTILE,
        bytes_in=10,
        bytes_out=20,
        auth_attempts=[
            AuthAttemptInfo(
                session=session_id,
                timestamp=T0,
                username=u,
                password=p,
                method="password",
                success=False,
                key_type=None,
                fingerprint=None,
                fingerprint_sha256=None,
                key=None,
            )
            for u, p in zip(PAYLOADS, reversed(PAYLOADS), strict=True)
        ],
        commands=[*(cmd(i + 1, p) for i, p in enumerate(PAYLOADS)), cmd(8, HOSTILE, channel=1, source="exec")],
        artifacts=[
            art("/tmp/" + IMG, "download", stored=True),
            art("/etc/" + SCRIPT, "changed", stored=False, sha=None),
            art("/var/log/" + TEMPLATE, "changed", stored=False, sha=None, origin=SCRIPT),  # a row forged in the DB
            art("/x", "upload", stored=True, sha='"><script>alert(1)</script>'),
        ],
        casts=[
            CastInfo(
                session=session_id,
                channel=0,
                path=f"casts/{session_id}/0.cast",
                size=100,
                sha256=SHA,
                opened_at=T0,
                closed_at=T0 + timedelta(seconds=20),
            ),
            CastInfo(
                session=session_id,
                channel=1,
                path=f"casts/{session_id}/1.cast",
                size=10,
                sha256=None,
                opened_at=T0 + timedelta(seconds=7),
                closed_at=None,
            ),
        ],
        sandbox=SandboxInfo(
            id="c0ffee",
            name=HOSTILE,
            session=session_id,
            src_ip="203.0.113.7",
            state=HOSTILE,
            acquired_at=T0,
            released_at=None,
        ),
    )


def hostile_stats() -> Stats:
    counts = [Count(value=p, count=5 - i) for i, p in enumerate(PAYLOADS)]
    return Stats(
        sessions=3,
        auth_attempts=7,
        commands=9,
        artifacts=1,
        top_usernames=counts,
        top_passwords=counts,
        top_pairs=[PairCount(username=p, password=p, count=3) for p in PAYLOADS],
        top_src_ips=counts,
        top_commands=counts,
        top_client_versions=counts,
        sessions_per_hour=[HourCount(hour=T0, count=3)],
    )


def base_context() -> dict[str, Any]:
    return {"nav": "", "sensor": HOSTILE, "has_token": True, "path": "/"}


@pytest.fixture
def renderer() -> Renderer:
    return Renderer()


def test_session_page_shows_every_payload_as_text(renderer: Renderer) -> None:
    d = hostile_detail()
    recs = view.recordings(d)
    placed = view.place_commands(d, recs)
    artifacts, changed = view.split_artifacts(d.artifacts)
    changed, bookkeeping = view.split_changed(changed)
    assert len(bookkeeping) == 1
    live = {"url": view.api_session_path(d.id) + "/live", "cols": 80, "rows": 24}
    html = renderer.render(
        "session.html",
        {
            **base_context(),
            "s": d,
            "recordings": recs,
            "commands": placed,
            "artifacts": artifacts,
            "changed": changed,
            "bookkeeping": bookkeeping,
            "live": live,
            "player": view.player_data(d, recs, placed, live),
            "artifact_url": view.artifact_url,
            "format_offset": view.format_offset,
            "api_path": view.api_session_path(d.id),
        },
    )
    page = Page(html)
    assert_inert(page)
    for payload in PAYLOADS:
        assert SHOWN[payload] in page.text, payload
    assert "49" not in page.text
    assert "\x1b" not in html and "\u2028" not in html and "\x07" not in html
    # The player's data block parses back; the download links are ours only.
    data = page.json_block("player-data")
    assert [r["url"] for r in data["recordings"]] == [
        "/api/v1/sessions/0123456789ab/cast",
        "/api/v1/sessions/0123456789ab/cast?channel=1",
    ]
    assert data["live"] == live
    hrefs = [attrs.get("href") for tag, attrs in page.tags if tag == "a"]
    assert f"/api/v1/artifacts/{SHA}" in hrefs
    assert not any(h and "script" in h for h in hrefs)  # the bad "sha256" got no link


def test_dashboard_shows_every_payload_as_text(renderer: Renderer) -> None:
    stats = hostile_stats()
    buckets = fill_hours(stats.sessions_per_hour, T0 - timedelta(hours=23), T0)
    html = renderer.render(
        "dashboard.html",
        {
            **base_context(),
            "stats": stats,
            "chart": chart(buckets),
            "range": "24h",
            "ranges": {"24h": "last 24 hours", "7d": "last 7 days"},
            "recent": [hostile_detail()],
            "live_ids": {"0123456789ab"},
            "status": {"pool": {"warm": 1, "note": SCRIPT}},
            # Sensor names are whatever each sensor's config says: text like the rest.
            "sensors": [SCRIPT, IMG],
            "sensor_filter": None,
            "keep": "",
            "show_sensor": True,
            "sensor_error": "",
            "sensor_rows": [
                SensorInfo(sensor=SCRIPT, sessions=3, open_sessions=1, logins=2, first_seen=T0, last_seen=T0),
                SensorInfo(sensor=IMG, sessions=1, open_sessions=0, logins=0, first_seen=T0, last_seen=T0),
            ],
        },
    )
    page = Page(html)
    assert_inert(page)
    for payload in PAYLOADS:
        assert SHOWN[payload] in page.text, payload
    options = [attrs.get("value") for tag, attrs in page.tags if tag == "option"]
    assert options == ["", SCRIPT, IMG]  # the filter sends back the exact names
    links = [attrs.get("href") or "" for tag, attrs in page.tags if tag == "a"]
    assert "/?range=24h&sensor=%3Cimg+src%3Dx+onerror%3Dalert%281%29%3E" in links  # the sensors' card
    assert page.json_block("status-data") == {"pool": {"warm": 1, "note": SCRIPT}}
    assert sum(1 for tag, attrs in page.tags if tag == "rect" and attrs.get("class") == "bar") == 1


def test_sessions_page_shows_payloads_and_keeps_the_form_as_values(renderer: Renderer) -> None:
    q = parse_query(
        {"command": SCRIPT, "src_ip": IMG, "username": OSC, "since": TEMPLATE, "page": "2", "sensor": IMG}, T0
    )
    html = renderer.render(
        "sessions.html",
        {
            **base_context(),
            "q": q,
            "sessions": [hostile_detail()],
            "pager": Pager(120, 2, 50),
            "sorts": SORTS,
            "page_sizes": PAGE_SIZES,
            "live_ids": set(),
            "sensors": [SCRIPT, IMG],
            "sensor_filter": IMG,
            "keep": sensor_param(IMG),
            "show_sensor": False,
        },
    )
    page = Page(html)
    assert_inert(page)
    inputs = {attrs.get("name"): attrs.get("value") for tag, attrs in page.tags if tag == "input"}
    assert inputs["command"] == SCRIPT and inputs["src_ip"] == IMG and inputs["username"] == OSC
    assert inputs["since"] == TEMPLATE
    assert "since: '{{7*7}}' is not a date" in page.text
    assert "SSH-2.0-" + IMG in page.text
    assert SHOWN[OSC] in page.text  # the username column
    chosen = [attrs.get("value") for tag, attrs in page.tags if tag == "option" and "selected" in attrs]
    assert IMG in chosen
    hrefs = [attrs.get("href") or "" for tag, attrs in page.tags if tag == "a"]
    assert any(h.endswith("&sensor=%3Cimg+src%3Dx+onerror%3Dalert%281%29%3E") for h in hrefs)
    links = [attrs["href"] for tag, attrs in page.tags if tag == "a" and attrs.get("rel") in ("prev", "next")]
    assert links and all(h and h.startswith("/sessions?") and "%3C%2Fscript%3E" in h for h in links)


def test_error_page_escapes_its_message(renderer: Renderer) -> None:
    html = renderer.render("error.html", {**base_context(), "title": "No such session", "message": IMG + OSC})
    page = Page(html)
    assert_inert(page)
    assert IMG in page.text and SHOWN[OSC] in page.text


def test_autoescape_is_on_whatever_the_template_is_called() -> None:
    env = make_environment()
    assert env.autoescape is True  # not select_autoescape: a .txt or .svg template escapes too
    assert env.from_string("{{ x }}").render(x=IMG) == "&lt;img src=x onerror=alert(1)&gt;"
    assert env.from_string("<a title='{{ x }}'>").render(x="' onmouseover='x") == "<a title='&#39; onmouseover=&#39;x'>"


@pytest.mark.parametrize("path", sorted(TEMPLATES.glob("*.html")), ids=lambda p: p.name)
def test_templates_have_no_inline_script_style_or_unescaped_output(path: Path) -> None:
    source = path.read_text()
    for forbidden in ("|safe", "| safe", "autoescape false", "style=", "javascript:", "<style", "Markup("):
        assert forbidden not in source, (path.name, forbidden)
    assert not re.search(r"\son[a-z]+\s*=", source), path  # no event-handler attributes
    for tag in re.findall(r"<script[^>]*>", source):
        assert 'src="/static/' in tag, tag  # JSON blocks come from json_script(), never hand-written


@pytest.mark.parametrize("path", sorted(STATIC.glob("*.js")), ids=lambda p: p.name)
def test_scripts_never_parse_strings_as_html_or_code(path: Path) -> None:
    source = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("//"))
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function", ".html("):
        assert sink not in source, (path.name, sink)
    assert "JSON.parse(" in source and "textContent" in source
