"""The sessions page's GET form: query parameters in, repository filters and pagination links out.

Parsing is lenient: a bad value becomes a message next to the form (never a 422 page), and the rest
of the filters still apply. Links to other pages keep the filters.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, get_args
from urllib.parse import urlencode

from sandtrap.storage.repository import SessionSort
from sandtrap.storage.types import clean

PAGE_SIZES = (25, 50, 100, 200)
DEFAULT_PAGE_SIZE = 50
SORTS: dict[str, str] = {
    "-started_at": "newest first",
    "started_at": "oldest first",
    "-duration_ms": "longest first",
    "-commands_count": "most commands",
    "src_ip": "source IP",
}
_RELATIVE = re.compile(r"(\d{1,5})\s*([mhdw])")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
FORM_KEYS = ("sensor", "src_ip", "service", "username", "command", "has_artifacts", "since", "sort", "per_page")
MAX_SENSOR = 256  # as the API's sensor filter


@dataclass
class SessionQuery:
    """What the form asked for, as typed (``form``) and as repository filters (``filters``)."""

    form: dict[str, str]
    filters: dict[str, Any]
    sort: SessionSort
    page: int
    per_page: int
    errors: list[str] = field(default_factory=list)

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.per_page

    @property
    def is_filtered(self) -> bool:
        return any(v is not None for v in self.filters.values())

    def url(self, **changes: Any) -> str:
        """``/sessions?...`` with the current form, ``changes`` applied, empty values left out."""
        params: dict[str, Any] = {**self.form, "page": str(self.page), **changes}
        if str(params.get("page")) == "1":
            params.pop("page")
        if params.get("sort") == "-started_at":
            params.pop("sort")
        if str(params.get("per_page")) == str(DEFAULT_PAGE_SIZE):
            params.pop("per_page")
        kept = {k: v for k, v in params.items() if v not in (None, "")}
        return "/sessions" + ("?" + urlencode(kept) if kept else "")


def parse_since(text: str, now: datetime) -> datetime:
    """``2026-05-01``, ``2026-05-01T12:30`` (UTC unless it names a zone) or relative: ``90m``, ``24h``, ``7d``, ``2w``."""
    text = text.strip()
    m = _RELATIVE.fullmatch(text.lower())
    if m:
        return now - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
    try:
        moment = datetime.fromisoformat(text.replace(" ", "T", 1) if "T" not in text else text)
    except ValueError:
        raise ValueError(
            f"since: {text[:40]!r} is not a date (2026-05-01, 2026-05-01T12:30) or an age (24h, 7d)"
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def parse_sensor(text: str) -> tuple[str | None, str]:
    """The sensor filter as typed: (its exact name or None for every sensor, an error message or '')."""
    text = text.strip()
    if not text:
        return None, ""
    if len(text) > MAX_SENSOR:
        return None, f"sensor: longer than {MAX_SENSOR} characters; showing every sensor"
    return clean(text), ""


def sensor_param(sensor: str | None) -> str:
    """``&sensor=NAME`` to append to a link's query (empty for every sensor): the filter follows the analyst."""
    return "&" + urlencode({"sensor": sensor}) if sensor else ""


def parse_query(params: Mapping[str, str], now: datetime) -> SessionQuery:
    form = {k: params.get(k, "").strip() for k in FORM_KEYS}
    errors: list[str] = []
    sensor, sensor_error = parse_sensor(form["sensor"])
    if sensor_error:
        errors.append(sensor_error)
        form["sensor"] = ""
    filters: dict[str, Any] = {
        "sensor": sensor,
        "src_ip": form["src_ip"] or None,
        "service": form["service"] or None,
        "username": form["username"] or None,
        "command": form["command"] or None,
        "has_artifacts": {"yes": True, "no": False}.get(form["has_artifacts"]),
        "since": None,
    }
    if form["since"]:
        try:
            filters["since"] = parse_since(form["since"], now)
        except ValueError as exc:
            errors.append(str(exc))
    sort_text = form["sort"] or "-started_at"
    if sort_text not in get_args(SessionSort):
        errors.append(f"sort: {sort_text[:40]!r} is not one of {', '.join(SORTS)}")
        sort_text = "-started_at"
    sort: SessionSort = sort_text  # type: ignore[assignment]  # checked against the Literal above
    per_page = _int(form["per_page"], DEFAULT_PAGE_SIZE)
    if per_page not in PAGE_SIZES:
        per_page = DEFAULT_PAGE_SIZE
    page = max(1, min(_int(params.get("page", ""), 1), 1_000_000))
    form["sort"] = sort_text
    form["per_page"] = str(per_page)
    return SessionQuery(form, filters, sort, page, per_page, errors)


@dataclass(frozen=True)
class Pager:
    total: int
    page: int
    per_page: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per_page))

    @property
    def first_item(self) -> int:
        return 0 if self.total == 0 else (self.page - 1) * self.per_page + 1

    @property
    def last_item(self) -> int:
        return min(self.total, self.page * self.per_page)

    @property
    def has_prev(self) -> bool:
        return self.page > 1

    @property
    def has_next(self) -> bool:
        return self.page < self.pages

    def window(self, width: int = 2) -> list[int | None]:
        """Page numbers to link: first, last and ``width`` around the current one; None for a gap."""
        keep = {1, self.pages, *range(self.page - width, self.page + width + 1)}
        shown = sorted(p for p in keep if 1 <= p <= self.pages)
        out: list[int | None] = []
        for p in shown:
            if out and isinstance(out[-1], int) and p - out[-1] > 1:
                out.append(None)
            out.append(p)
        return out


def _int(text: str, default: int) -> int:
    try:
        return int(text)
    except ValueError:
        return default
