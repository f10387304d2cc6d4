"""Cowrie-compatible JSON lines: ``<data_dir>/log/sandtrap.json``, one event per line, rotated.

Writes happen on a background thread so a slow disk never stalls the SSH event loop; each line is
flushed as it is written, so a SIGKILL of the honeypot loses at most what was still queued (well
under a second). Rotation: by day (UTC) to ``sandtrap.json.YYYY-MM-DD`` as Cowrie does, and by size
to ``sandtrap.json.YYYY-MM-DD.N``. A write error (disk full) is counted and reported (to the
:class:`~sandtrap.outputs.recording.RecordingHealth` when given), never raised. A line cut short by
the error is cut off again, so the file holds whole lines only and the next event starts a line of its
own: what was written before the disk filled stays intact, and line-based readers lose nothing more.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import queue
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sandtrap.events import Event, cowrie_dict
from sandtrap.logs import RateLimited
from sandtrap.outputs.recording import JSONLOG, RecordingHealth
from sandtrap.storage.replay import LogMark, LogPosition

log = logging.getLogger(__name__)

_STOP = object()
_limited = RateLimited(log)


class JsonLogSink:
    def __init__(
        self,
        directory: Path,
        rotate_bytes: int = 100 * 2**20,
        rotate_daily: bool = True,
        health: RecordingHealth | None = None,
    ) -> None:
        self.path = directory / "sandtrap.json"
        self._health = health
        self._torn = False  # a cut-short line could not be cut off: start the next one on a new line
        self._rotate_bytes = rotate_bytes
        self._rotate_daily = rotate_daily
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.written = 0
        self.errors = 0
        self.last_error = ""
        directory.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="jsonlog", daemon=True)
        self._thread.start()

    def write(self, event: Event) -> None:
        self._queue.put(event)

    def mark(self) -> LogMark:
        """A mark in the log's order: the writer fills in its file and offset when it gets there (every event
        written before this call lies before it). The database sink replays an outage's backlog from one."""
        mark = LogMark()
        self._queue.put(mark)
        return mark

    def close(self, timeout_s: float = 5.0) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout_s)

    # -- the writer thread ------------------------------------------------------------------------
    def _run(self) -> None:
        f = None
        day = ""
        while True:
            item = self._queue.get()
            if item is _STOP:
                break
            if isinstance(item, LogMark):
                f, day = self._place(item, f, day)
                continue
            try:
                line = json.dumps(cowrie_dict(item), ensure_ascii=False, separators=(",", ":")) + "\n"
                try:
                    data = line.encode("utf-8", "surrogateescape")
                except UnicodeEncodeError:  # a lone surrogate that no byte decoded to: not a reason to lose the event
                    data = line.encode("utf-8", "replace")
                today = datetime.now(UTC).strftime("%Y-%m-%d")
                if f is None:
                    f, day = self._open(), today
                size = f.tell()
                if (self._rotate_daily and today != day and size) or (size and size + len(data) > self._rotate_bytes):
                    f.close()
                    self._rotate(day)
                    f, day = self._open(), today
                if self._torn:
                    data = b"\n" + data
                start = f.tell()
                try:
                    _write_all(f, data)
                except OSError:
                    # A short write (disk full) must not leave half a line for the next one to join.
                    try:
                        os.ftruncate(f.fileno(), start)
                    except OSError:
                        self._torn = True
                    raise
                self._torn = False
                self.written += 1
                if self._health is not None:
                    self._health.succeeded(JSONLOG)
            except OSError as exc:
                self.errors += 1
                self.last_error = str(exc)
                if self._health is not None:
                    self._health.failed(JSONLOG, exc)
                elif self.errors == 1 or self.errors % 1000 == 0:
                    log.error("json log write failed (%d so far): %s", self.errors, exc)
                if f is not None:
                    try:
                        f.close()
                    except OSError:
                        pass
                    f = None
            except Exception:  # a bug must not end the thread: every later event would be lost
                self.errors += 1
                self.last_error = "internal error"
                _limited.log(logging.ERROR, "bug", "json log: event %s not written", getattr(item, "event_id", "?"))
                log.debug("json log: event not written", exc_info=True)
        if f is not None:
            f.close()

    def _place(self, mark: LogMark, f: Any, day: str) -> tuple[Any, str]:
        """Resolve ``mark`` at the end of what is written (opening the file if need be); its file and day."""
        try:
            if f is None:
                f, day = self._open(), datetime.now(UTC).strftime("%Y-%m-%d")
            st = os.fstat(f.fileno())
            mark.resolve(LogPosition(st.st_dev, st.st_ino, f.tell(), mark.at))
        except OSError as exc:
            log.warning("json log: cannot mark a replay position: %s", exc)
            mark.resolve(None)
        return f, day

    def _open(self) -> Any:
        # Kept open across events on purpose; unbuffered: each line is one write, and a failed one
        # leaves nothing in a buffer that a later flush would append after the cut.
        return open(self.path, "ab", buffering=0)

    def _rotate(self, day: str) -> None:
        self._torn = False
        target = self.path.with_name(f"{self.path.name}.{day}")
        n = 1
        while target.exists():
            target = self.path.with_name(f"{self.path.name}.{day}.{n}")
            n += 1
        os.replace(self.path, target)


def _write_all(f: Any, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = f.write(view)
        if not n:
            raise OSError(errno.EIO, "short write")
        view = view[n:]
