"""Attacker text on a page: JSON that cannot leave its ``<script>`` block, control characters made visible.

Every string the pages show may come from an attacker (usernames, passwords, commands, paths, client
versions). Templates autoescape; these helpers cover the two places autoescaping does not:

* :func:`json_for_html` — data handed to JavaScript in ``<script type="application/json">``, where
  HTML entities are not decoded, so ``<``, ``>`` and ``&`` become ``\\u003c``-style JSON escapes
  instead (no ``</script>`` or ``<!--`` can appear) and U+2028/U+2029 are escaped too. The page
  reads it back with ``JSON.parse(el.textContent)``.
* :func:`visible` — a terminal escape sequence in a command or a username is shown as ``\\x1b``,
  never passed raw to the page (where it would hide text or fool a copy-paste).
"""

from __future__ import annotations

import json
from typing import Any

from markupsafe import Markup, escape

_JSON_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}

# Characters shown as escapes: C0 controls, DEL, C1 controls, and the invisible formatting characters
# that reorder or hide text (bidi overrides and isolates, zero-width characters, BOM).
_INVISIBLE = frozenset(
    [
        *range(0x00, 0x20),  # C0
        0x7F,
        *range(0x80, 0xA0),  # C1 (0x9B is CSI on some terminals)
        *range(0x200B, 0x2010),  # zero-width space, joiners, LRM/RLM
        *range(0x202A, 0x202F),  # bidi embeddings and overrides
        *range(0x2066, 0x206A),  # bidi isolates
        0x2028,
        0x2029,
        0xFEFF,
    ]
)
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def json_for_html(data: Any) -> str:
    """``data`` as JSON that is safe as the whole content of a ``<script type="application/json">``."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str)
    for char, replacement in _JSON_ESCAPES.items():
        text = text.replace(char, replacement)
    return text


def json_script(data: Any, element_id: str) -> Markup:
    """A ``<script type="application/json" id=...>`` block holding ``data`` (read with JSON.parse)."""
    return Markup('<script type="application/json" id="{}">{}</script>').format(element_id, Markup(json_for_html(data)))


def escape_char(char: str) -> str:
    """How one invisible character is shown: ``\\n``, ``\\x1b``, ``\\u202e``."""
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def visible_text(text: str | None, limit: int | None = None) -> str:
    """``text`` with every control or invisible character replaced by its escape (plain text)."""
    if text is None:
        return ""
    if limit is not None and len(text) > limit:
        text = text[:limit] + "…"
    return "".join(escape_char(c) if ord(c) in _INVISIBLE else c for c in text)


def visible(text: str | None, limit: int | None = None) -> Markup:
    """HTML for ``text``: escaped, with each control character shown as ``<span class="ctl">\\x1b</span>``.

    ``limit`` cuts long text (an ellipsis marks the cut). The result is built from escaped pieces
    only, so it is safe wherever HTML text may go.
    """
    if text is None:
        return Markup("")
    cut = limit is not None and len(text) > limit
    if cut:
        text = text[:limit]
    parts: list[str] = []
    run: list[str] = []
    for char in text:
        if ord(char) in _INVISIBLE:
            if run:
                parts.append(escape("".join(run)))
                run = []
            parts.append(Markup('<span class="ctl">{}</span>').format(escape_char(char)))
        else:
            run.append(char)
    if run:
        parts.append(escape("".join(run)))
    if cut:
        parts.append(Markup('<span class="cut">…</span>'))
    return Markup("").join(parts)
