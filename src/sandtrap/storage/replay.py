"""Read events back from the JSON log (``sandtrap.json`` and its rotations) to re-import what the database missed."""

from __future__ import annotations

import glob
import json
import logging
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from sandtrap.events import Event
from sandtrap.storage.types import as_utc

log = logging.getLogger(__name__)

# Rotated names as outputs/jsonlog.py makes them: <name>.YYYY-MM-DD, then <name>.YYYY-MM-DD.N by size.
_ROTATED = re.compile(r"(\d{4}-\d{2}-\d{2})(?:\.(\d+))?")


def jsonlog_files(path: Path) -> list[Path]:
    """The log's rotated files, oldest first, then the current one (when present)."""
    rotated: list[tuple[tuple[str, int], Path]] = []
    for candidate in path.parent.glob(glob.escape(path.name) + ".*"):
        m = _ROTATED.fullmatch(candidate.name[len(path.name) + 1 :])
        if m and candidate.is_file():
            rotated.append(((m.group(1), int(m.group(2) or 0)), candidate))
    return [p for _, p in sorted(rotated)] + ([path] if path.is_file() else [])


def parse_line(line: str) -> Event | None:
    """One JSON-log line as an Event; None for a line that is not one of ours (or was cut short)."""
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("event_id"), str) or not data.get("eventid"):
        return None  # without an event_id a re-import could not tell it was stored already
    try:
        return Event.model_validate(data)
    except Exception:
        return None


def read_jsonlog(path: Path, since: datetime | None = None) -> Iterator[Event]:
    """Every event in the log files, oldest file first; with ``since``, only the files written to at or
    after it (by modification time: an event's own timestamp may be older than the outage it missed)."""
    for file in jsonlog_files(path):
        try:
            if since is not None and file.stat().st_mtime < as_utc(since).timestamp():
                continue
            with open(file, encoding="utf-8", errors="surrogateescape") as f:
                bad = 0
                for line in f:
                    event = parse_line(line)
                    if event is None:
                        bad += line.strip() != ""
                        continue
                    yield event
                if bad:
                    log.info("%s: %d lines are not sandtrap events; skipped", file, bad)
        except OSError as exc:
            log.warning("cannot read %s: %s", file, exc)
