"""Read events back from the JSON log (``sandtrap.json`` and its rotations) to re-import what the database missed.

Two ways: everything (:func:`read_jsonlog`, the start-up's catch-up), or from a position on (:func:`read_from`,
the database sink's replay of what it left to the log during an outage). A position names its file by device
and inode, so a rotation (a rename) does not move it; the reader goes on into the newer files after it.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

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


# A line longer than this is not one of ours (events are bounded well below it): skipped, never held in memory.
MAX_LINE_BYTES = 8 * 2**20
# A mark whose file is gone (removed by hand): replay the files written to since a little before it.
LOST_MARGIN_S = 60.0


@dataclass(frozen=True)
class LogPosition:
    """A byte offset in one file of the log, the file named by (device, inode); ``at``: when it was taken."""

    dev: int
    ino: int
    offset: int
    at: float = 0.0


@dataclass
class LogMark:
    """A position the JSON log's writer fills in when it gets there: every event handed to the log before the
    mark is before it, every one after it after. ``position`` None: the log could not say (it is failing)."""

    at: float = field(default_factory=time.time)
    ready: threading.Event = field(default_factory=threading.Event)
    position: LogPosition | None = None

    def resolve(self, position: LogPosition | None) -> None:
        self.position = position
        self.ready.set()


@dataclass
class ReadResult:
    events: list[Event]
    position: LogPosition | None  # where the next read starts (None: no file to start in yet)
    at_end: bool  # nothing more to read now (the current file's end, or ``end`` reached)
    reached: bool  # ``end`` was given and reached (or passed)
    skipped: int = 0  # lines that were not events


def _identity(file: Path) -> tuple[int, int, float] | None:
    try:
        st = file.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime


def first_position_since(path: Path, since: float) -> LogPosition | None:
    """The start of the oldest log file written to at or after ``since`` (epoch seconds); None: no such file."""
    for file in jsonlog_files(path):
        ident = _identity(file)
        if ident is not None and ident[2] >= since:
            return LogPosition(ident[0], ident[1], 0, since)
    return None


def read_from(path: Path, start: LogPosition, max_events: int, end: LogPosition | None = None) -> ReadResult:
    """Up to ``max_events`` events from ``start`` on, through the newer files, stopping at ``end`` (when given).

    Only whole lines are taken from the current file (a line still being written waits for the next read).
    A start whose file is gone falls back to the files written to since a minute before it was taken.
    """
    files = [(f, _identity(f)) for f in jsonlog_files(path)]
    keys = [(i[0], i[1]) if i else None for _, i in files]
    index = keys.index((start.dev, start.ino)) if (start.dev, start.ino) in keys else -1
    if index < 0:
        fallback = first_position_since(path, start.at - LOST_MARGIN_S)
        if fallback is None or (fallback.dev, fallback.ino) == (start.dev, start.ino):
            return ReadResult([], start, at_end=True, reached=end is not None and not files)
        log.warning("json log: the file of the replay position is gone; replaying the files written since")
        start, index = fallback, keys.index((fallback.dev, fallback.ino))
    end_index = keys.index((end.dev, end.ino)) if end is not None and (end.dev, end.ino) in keys else None
    events: list[Event] = []
    skipped = 0
    position = start
    while True:
        if end is not None and (
            end_index is not None and (index > end_index or (index == end_index and position.offset >= end.offset))
        ):
            return ReadResult(events, position, at_end=True, reached=True, skipped=skipped)
        file = files[index][0]
        is_current = index == len(files) - 1
        limit = end.offset if end is not None and index == end_index else None
        try:
            with open(file, "rb") as f:
                f.seek(position.offset)
                while len(events) < max_events and (limit is None or f.tell() < limit):
                    line = f.readline(MAX_LINE_BYTES + 1)
                    if not line:
                        break
                    if not line.endswith(b"\n"):
                        if len(line) > MAX_LINE_BYTES:
                            _skip_line(f)
                            skipped += 1
                            continue
                        if is_current:
                            f.seek(-len(line), os.SEEK_CUR)  # still being written: next time
                            break
                    event = parse_line(line.decode("utf-8", "surrogateescape"))
                    if event is None:
                        skipped += line.strip() != b""
                        continue
                    events.append(event)
                offset = f.tell()
        except OSError as exc:
            log.warning("cannot read %s: %s", file, exc)
            return ReadResult(events, position, at_end=True, reached=False, skipped=skipped)
        position = LogPosition(position.dev, position.ino, offset, position.at)
        if len(events) >= max_events:
            return ReadResult(events, position, at_end=False, reached=False, skipped=skipped)
        if limit is not None and offset >= limit:
            continue  # the end check above says so
        if is_current:
            return ReadResult(
                events, position, at_end=True, reached=end is not None and end_index is None, skipped=skipped
            )
        index += 1  # this file is done (rotated): on into the next one
        ident = files[index][1]
        if ident is None:
            return ReadResult(events, position, at_end=True, reached=False, skipped=skipped)
        position = LogPosition(ident[0], ident[1], 0, position.at)


def _skip_line(f: Any) -> None:
    while True:
        chunk = f.readline(MAX_LINE_BYTES)
        if not chunk or chunk.endswith(b"\n"):
            return
