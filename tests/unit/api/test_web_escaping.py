"""JSON for <script> blocks and visible control characters: attacker text must come out inert."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest
from markupsafe import Markup

from sandtrap.api.web.escaping import escape_char, json_for_html, json_script, visible, visible_text

PAYLOADS = [
    "<img src=x onerror=alert(1)>",
    "</script><script>window.pwned=1</script>",
    "</SCRIPT ><script>alert(1)</script>",
    "<!--<script>",
    "{{7*7}}",
    "${7*7}",
    "\x1b]0;title\x07",
    "a\u2028b\u2029c",
    "&lt;already&gt; & &amp;",
    "'\"`",
    "\x00\x7f\x9b",
    "\u202eevil\u202c",
    "😀 non-BMP",
]


class Scripts(HTMLParser):
    """Collects each <script>'s attributes and text, as a browser's tokenizer would split them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self.tags: list[str] = []
        self._in: dict[str, str | None] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "script":
            self._in = dict(attrs)
            self.scripts.append((self._in, ""))

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._in is not None:
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)


@pytest.mark.parametrize("payload", PAYLOADS)
def test_json_for_html_has_no_markup_characters_and_round_trips(payload: str) -> None:
    data = {"text": payload, "list": [payload, 1, None], payload: True}
    out = json_for_html(data)
    for char in "<>&\u2028\u2029":
        assert char not in out
    assert json.loads(out) == data


@pytest.mark.parametrize("payload", PAYLOADS)
def test_json_script_is_one_inert_block_that_parses_back(payload: str) -> None:
    data = {"text": payload, "nested": {"cmd": payload}}
    html = str(json_script(data, "player-data"))
    parser = Scripts()
    parser.feed(f"<body>{html}<p>after</p></body>")
    assert parser.tags == ["body", "script", "p"]  # nothing broke out of the block
    ((attrs, text),) = parser.scripts
    assert attrs == {"type": "application/json", "id": "player-data"}
    assert json.loads(text) == data  # what JSON.parse(el.textContent) gets


def test_json_script_is_markup_and_its_id_is_escaped() -> None:
    block = json_script([], 'x" onload="alert(1)')
    assert isinstance(block, Markup)
    assert 'id="x&#34; onload=&#34;alert(1)"' in block


def test_json_for_html_keeps_non_ascii_text() -> None:
    assert json_for_html("müller 😀") == '"müller 😀"'


def test_visible_escapes_html_and_shows_controls() -> None:
    out = visible("<img src=x onerror=alert(1)>\x1b]0;title\x07")
    assert isinstance(out, Markup)
    assert out == (
        '&lt;img src=x onerror=alert(1)&gt;<span class="ctl">\\x1b</span>]0;title<span class="ctl">\\x07</span>'
    )


@pytest.mark.parametrize(
    ("char", "shown"),
    [
        ("\n", "\\n"),
        ("\r", "\\r"),
        ("\t", "\\t"),
        ("\x00", "\\x00"),
        ("\x1b", "\\x1b"),
        ("\x7f", "\\x7f"),
        ("\x9b", "\\x9b"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
        ("\u202e", "\\u202e"),
        ("\u200b", "\\u200b"),
        ("\ufeff", "\\ufeff"),
        ("\u2066", "\\u2066"),
    ],
)
def test_each_invisible_character_is_shown_as_an_escape(char: str, shown: str) -> None:
    assert escape_char(char) == shown
    assert visible_text(f"a{char}b") == f"a{shown}b"
    assert str(visible(f"a{char}b")) == f'a<span class="ctl">{shown}</span>b'


def test_visible_leaves_templates_and_printable_unicode_alone() -> None:
    assert visible("{{7*7}} ${x} müller 😀") == "{{7*7}} ${x} müller 😀"


def test_visible_cuts_long_text_and_marks_the_cut() -> None:
    assert visible("a" * 10, limit=4) == 'aaaa<span class="cut">…</span>'
    assert visible_text("a" * 10, limit=4) == "aaaa…"
    assert visible("abcd", limit=4) == "abcd"


def test_visible_of_none_is_empty() -> None:
    assert visible(None) == Markup("")
    assert visible_text(None) == ""


def test_visible_escapes_markup_it_is_given() -> None:
    # Even a Markup-looking string from the database is escaped: visible() takes text, never HTML.
    assert visible("&amp;<b>") == "&amp;amp;&lt;b&gt;"
