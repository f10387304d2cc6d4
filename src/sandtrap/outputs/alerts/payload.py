"""What an alert carries, built from an event: attacker bytes stay data.

Every string of the event is cut to ``max_field_chars`` and every list to ``MAX_ITEMS`` before it is JSON-encoded;
the Slack text escapes ``&``, ``<`` and ``>`` (Slack's control characters: ``<!channel>``, links) and shows control
characters as escapes. Webhook URLs hold secrets (Slack's path is its token): logs get :func:`redact` only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sandtrap import events as ev

MAX_ITEMS = 100
MAX_DEPTH = 4
MAX_SUMMARY_CHARS = 500
MAX_EVENT_BYTES = 64 * 1024  # an alert's event as JSON, at most (strings are cut further to fit)
MIN_FIELD_CHARS = 16
_SLACK_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;"})


@dataclass(frozen=True)
class Alert:
    """One alert, as every target gets it: JSON for webhooks and commands, text for Slack."""

    rule: str
    kind: str
    count: int
    event: dict[str, Any]

    @property
    def summary(self) -> str:
        e = self.event
        what = str(e.get("message") or e.get("eventid") or "")[:MAX_SUMMARY_CHARS]
        many = f" ({self.count} events)" if self.count > 1 else ""
        return (
            f"sandtrap {e.get('sensor', '')}: rule {self.rule}{many}: {what} "
            f"[src {e.get('src_ip', '')}, session {e.get('session', '')}]"
        )

    def as_json(self) -> bytes:
        body = {"rule": self.rule, "when": self.kind, "count": self.count, "summary": self.summary, "event": self.event}
        return json.dumps(body, ensure_ascii=True, separators=(",", ":")).encode("ascii")

    def as_slack(self) -> bytes:
        # No unfurling: Slack would fetch a URL the attacker typed, telling them the alert went out.
        body = {"text": slack_text(self.summary), "unfurl_links": False, "unfurl_media": False}
        return json.dumps(body, ensure_ascii=True).encode("ascii")


def make_alert(rule: str, kind: str, count: int, event: ev.Event, max_field_chars: int) -> Alert:
    """The alert for ``event``, its strings cut to ``max_field_chars`` (less, until its JSON fits
    ``MAX_EVENT_BYTES``: a queue of alerts is bounded in bytes too)."""
    data = ev.cowrie_dict(event)
    chars = max_field_chars
    while True:
        kept = bounded(data, chars)
        if chars <= MIN_FIELD_CHARS or len(json.dumps(kept, ensure_ascii=True)) <= MAX_EVENT_BYTES:
            return Alert(rule, kind, count, kept)
        chars = max(MIN_FIELD_CHARS, chars // 4)


def bounded(value: Any, max_chars: int, depth: int = 0) -> Any:
    """``value`` with strings cut to ``max_chars``, lists to ``MAX_ITEMS`` and nesting to ``MAX_DEPTH``."""
    if isinstance(value, str):
        return value if len(value) <= max_chars else value[:max_chars] + "…"
    if isinstance(value, bool | int | float) or value is None:
        return value
    if depth >= MAX_DEPTH:
        return "…"
    if isinstance(value, dict):
        items = list(value.items())[:MAX_ITEMS]
        return {str(k)[:max_chars]: bounded(v, max_chars, depth + 1) for k, v in items}
    if isinstance(value, list | tuple):
        return [bounded(v, max_chars, depth + 1) for v in value[:MAX_ITEMS]]
    return bounded(str(value), max_chars, depth)


def slack_text(text: str) -> str:
    """Slack's escaping of ``&``, ``<``, ``>``; control and bidi characters shown as ``\\xNN``/``\\uNNNN``."""
    shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return shown.translate(_SLACK_ESCAPES)


def redact(url: str) -> str:
    """A webhook URL fit for logs: scheme, host and port; its path, query and credentials (tokens) left out."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        host = f"[{host}]" if ":" in host else host
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<url>"
    return f"{parts.scheme}://{host}{port}/…"
