"""Cowrie-compatible JSON lines: ``<data_dir>/log/sandtrap.json``, one event per line, rotated.

Writes happen on a background thread so a slow disk never stalls the SSH event loop; each line is
flushed as it is written, so a SIGKILL of the honeypot loses at most what was still queued (well
under a second). Rotation: by day (UTC) to ``sandtrap.json.YYYY-MM-DD`` as Cowrie does, and by size
to ``sandtrap.json.YYYY-MM-DD.N``. A write error (disk full) is counted and reported, never raised.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sandtrap.events import Event

log = logging.getLogger(__name__)

_STOP = object()


def cowrie_dict(event: Event) -> dict[str, Any]:
    """The event as Cowrie's JSON log has it: envelope plus fields, ``timestamp`` in ``...Z`` form."""
    data = event.model_dump(mode="json")
    # Cowrie 2.x names next to 3.x's where they differ (T-Pot and most dashboards read 2.x).
    if "duration_ms" in data and "duration" not in data:
        data["duration"] = f"{data['duration_ms'] / 1000:.1f}"
    return data


class JsonLogSink:
    def __init__(self, directory: Path, rotate_bytes: int = 100 * 2**20, rotate_daily: bool = True) -> None:
        self.path = directory / "sandtrap.json"
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
            try:
                line = json.dumps(cowrie_dict(item), ensure_ascii=False, separators=(",", ":")) + "\n"
                data = line.encode("utf-8", "surrogateescape")
                today = datetime.now(UTC).strftime("%Y-%m-%d")
                if f is None:
                    f, day = self._open(), today
                size = f.tell()
                if (self._rotate_daily and today != day and size) or (size and size + len(data) > self._rotate_bytes):
                    f.close()
                    self._rotate(day)
                    f, day = self._open(), today
                start = f.tell()
                try:
                    f.write(data)
                    f.flush()
                except OSError:
                    # A short write (disk full) must not leave half a line for the next one to join.
                    f.truncate(start)
                    raise
                self.written += 1
            except OSError as exc:
                self.errors += 1
                if self.errors == 1 or self.errors % 1000 == 0:
                    log.error("json log write failed (%d so far): %s", self.errors, exc)
                self.last_error = str(exc)
                if f is not None:
                    try:
                        f.close()
                    except OSError:
                        pass
                    f = None
        if f is not None:
            f.close()

    def _open(self) -> Any:
        return open(self.path, "ab")  # kept open across events on purpose

    def _rotate(self, day: str) -> None:
        target = self.path.with_name(f"{self.path.name}.{day}")
        n = 1
        while target.exists():
            target = self.path.with_name(f"{self.path.name}.{day}.{n}")
            n += 1
        os.replace(self.path, target)
