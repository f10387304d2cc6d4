"""Column types that take attacker data as it comes: UTC timestamps, text and JSON that PostgreSQL accepts.

PostgreSQL's ``text`` and ``jsonb`` reject NUL (``\\x00``), and no driver can encode a lone surrogate
(what ``surrogateescape`` makes of invalid UTF-8). Both are replaced by U+FFFD (``\\ufffd``) when a value
is bound, on every backend alike, so SQLite and PostgreSQL hold the same text and a filter finds the
same rows on both. Nothing else is changed: escaping for display is the reader's job. The JSON log keeps
the original bytes.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Dialect, Text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeDecorator, TypeEngine

REPLACEMENT = "\ufffd"
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def clean(text: str) -> str:
    """``text`` with NUL and lone surrogates replaced by U+FFFD; everything else as given."""
    return _UNSTORABLE.sub(REPLACEMENT, text)


def clean_json(value: Any) -> Any:
    """:func:`clean` applied to every string (keys included) of a JSON-like value."""
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, dict):
        return {clean(str(k)): clean_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(v) for v in value]
    return value


def as_utc(value: datetime) -> datetime:
    """An aware UTC datetime; a naive one is taken to be UTC already."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class SafeText(TypeDecorator[str]):
    """``TEXT`` that never fails on NUL or invalid UTF-8 (see the module docstring)."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else clean(value)


class SafeJSON(TypeDecorator[Any]):
    """JSON (``jsonb`` on PostgreSQL) whose strings are cleaned like :class:`SafeText`."""

    impl = JSON
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(JSONB())
        return dialect.type_descriptor(JSON())

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        return clean_json(value)


class UTCDateTime(TypeDecorator[datetime]):
    """Always an aware UTC datetime in Python; ``timestamptz`` on PostgreSQL, UTC text on SQLite."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = as_utc(value)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else as_utc(value)
