"""Events into the database: ``write`` only queues; a thread stores them in batches, one transaction each.

The mapping of each event id to rows lives in :mod:`sandtrap.storage.ingest`; this module is about
getting events there without ever stalling the SSH event loop:

* Idempotent: every event carries a unique ``event_id``; one already stored is skipped.
* Outage (database unreachable or not operating): the batch stays queued and is retried with
  backoff (0.5 s doubling to 30 s). The queue holds at most ``buffer_events``; beyond that the
  oldest are dropped and counted in ``dropped``. They are still in the JSON log: the writer re-imports
  them from it when the database is back (when given the log's path), and so does
  :meth:`DatabaseSink.catch_up_from_jsonlog` at start-up. The outage is logged when it starts and when
  it ends, not per event.
* An event a working database refuses (a bug, a value it cannot take) is stored alone, rejected,
  counted in ``rejected`` and logged; the rest of its batch is stored.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from sandtrap.events import Event
from sandtrap.storage.engine import IMMEDIATE, describe, make_engine
from sandtrap.storage.ingest import apply_events
from sandtrap.storage.replay import read_jsonlog

log = logging.getLogger(__name__)
# How long the writer waits for a batch to fill once an event is queued (a bound on the added latency).
LINGER_S = 0.05

BATCH_SIZE = 500
RETRY_MIN_S = 0.5
RETRY_MAX_S = 30.0
# After an outage that dropped events, re-read the JSON log from a little before the outage began.
CATCH_UP_MARGIN = timedelta(minutes=1)
# PostgreSQL: table or schema missing (not migrated yet): wait for it like for an outage.
_NOT_READY = frozenset({"42P01", "3F000"})


class DatabaseSink:
    """An :class:`~sandtrap.events.EventSink` that stores events through its own writer thread."""

    def __init__(
        self,
        url: str,
        buffer_events: int = 100_000,
        *,
        jsonlog: Path | None = None,
        batch_size: int = BATCH_SIZE,
        retry_min_s: float = RETRY_MIN_S,
        retry_max_s: float = RETRY_MAX_S,
    ) -> None:
        self._engine = make_engine(url)
        self._writer = self._engine.execution_options(**{IMMEDIATE: True})
        self._buffer = max(1, buffer_events)
        self._batch = max(1, batch_size)
        self._retry = (retry_min_s, retry_max_s)
        self._jsonlog = jsonlog
        self._lock = threading.Condition()
        self._count_lock = threading.Lock()
        self._queue: deque[tuple[int, Event]] = deque()
        self._seq = 0
        self._wake = threading.Event()
        self._closing = False
        self._deadline = math.inf
        # Counters for status and metrics.
        self.stored = 0
        self.duplicates = 0
        self.rejected = 0
        self.errors = 0
        self.dropped = 0
        self.last_error = ""
        self._down_since: datetime | None = None
        self._dropped_seen = 0
        self._drop_logged = False
        self._thread = threading.Thread(target=self._run, name="database-sink", daemon=True)
        self._thread.start()

    # -- the EventSink side (event loop thread) -------------------------------------------------------------
    def write(self, event: Event) -> None:
        """Queue the event; never waits for the database."""
        with self._lock:
            self._seq += 1
            self._queue.append((self._seq, event))
            if len(self._queue) > self._buffer:
                self._queue.popleft()
                self.dropped += 1
                if not self._drop_logged:
                    self._drop_logged = True
                    log.warning(
                        "database sink buffer full (%d events): dropping the oldest; they are in the JSON log",
                        self._buffer,
                    )
            self._lock.notify()

    @property
    def pending(self) -> int:
        """Events queued and not stored yet."""
        return len(self._queue)

    @property
    def is_down(self) -> bool:
        """True while the database cannot store events (from the first failure until a batch is stored)."""
        return self._down_since is not None

    def status(self) -> dict[str, Any]:
        return {
            "pending": self.pending,
            "stored": self.stored,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
            "errors": self.errors,
            "dropped": self.dropped,
            "is_down": self.is_down,
            "last_error": self.last_error,
        }

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued event is stored; False when ``timeout_s`` passed first."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._queue, timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        """Store what is queued, waiting at most ``timeout_s``; what is left is in the JSON log."""
        with self._lock:
            self._closing = True
            self._deadline = time.monotonic() + timeout_s
            self._lock.notify_all()
        self._wake.set()
        self._thread.join(timeout_s + 1.0)
        if self.pending:
            log.warning(
                "database sink closed with %d events not stored; they are in the JSON log and the next "
                "start-up imports them",
                self.pending,
            )
        if not self._thread.is_alive():
            self._engine.dispose()

    # -- re-import from the JSON log ------------------------------------------------------------------------
    def catch_up_from_jsonlog(self, path: Path | None = None, since: datetime | None = None) -> int:
        """Store the events of the JSON log (current and rotated files) that the database lacks.

        ``since`` skips files last written before it. Blocking: at start-up call it through
        ``asyncio.to_thread`` before serving. Returns how many events were new. Stops early (logging
        why) when the database is unavailable.
        """
        path = path or self._jsonlog
        if path is None:
            return 0
        new = 0
        for chunk in _chunks(read_jsonlog(path, since), self._batch):
            stored = self._store(chunk)
            if stored is None:
                log.warning("catch-up from %s stopped: the database is unavailable (%s)", path, self.last_error)
                break
            new += stored
        if new:
            log.info("stored %d events from %s that the database had missed", new, path)
        return new

    # -- the writer thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        delay = self._retry[0]
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._lock.wait()
                if not self._queue:
                    return
                # Linger a moment for more: under a flood, one transaction then carries many events
                # (per-transaction work dominated the honeypot's CPU per login attempt).
                linger_until = time.monotonic() + LINGER_S
                while len(self._queue) < self._batch and not self._closing:
                    remaining = linger_until - time.monotonic()
                    if remaining <= 0:
                        break
                    self._lock.wait(remaining)
                batch = list(itertools.islice(self._queue, self._batch))
            if self._store([event for _, event in batch]) is not None:
                if self._down_since is not None:
                    self._recovered()  # before dequeuing: flush() returns only after the catch-up
                with self._lock:
                    last = batch[-1][0]
                    while self._queue and self._queue[0][0] <= last:
                        self._queue.popleft()
                    self._lock.notify_all()
                delay = self._retry[0]
                continue
            if time.monotonic() >= self._deadline:
                return  # closing, and the database did not come back in time
            self._wake.wait(min(delay, max(0.0, self._deadline - time.monotonic())))
            self._wake.clear()
            delay = min(delay * 2, self._retry[1])

    def _store(self, events: list[Event]) -> int | None:
        """Store a batch; how many were new, or None when the database is unavailable (keep the batch)."""
        try:
            return self._commit(events)
        except Exception as exc:
            if _is_transient(exc) or not self._is_reachable():
                self._failed(exc)
                return None
            log.debug("batch refused (%s); storing its events one by one", describe(exc))
        new = 0
        for event in events:
            try:
                new += self._commit([event])
            except Exception as exc:
                if _is_transient(exc) or not self._is_reachable():
                    self._failed(exc)
                    return None
                with self._count_lock:
                    self.rejected += 1
                log.error(
                    "database refused event %s (%s, session %s): %s",
                    event.event_id,
                    event.eventid,
                    event.session,
                    describe(exc),
                    exc_info=not isinstance(exc, sa_exc.DBAPIError),
                )
        return new

    def _commit(self, events: list[Event]) -> int:
        with Session(self._writer) as db, db.begin():
            new = apply_events(db, events)
        with self._count_lock:
            self.stored += new
            self.duplicates += len(events) - new
        return new

    def _is_reachable(self) -> bool:
        try:
            with self._engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            return True
        except Exception:
            return False

    def _failed(self, exc: Exception) -> None:
        with self._count_lock:
            self.errors += 1
        self.last_error = describe(exc)
        if self._down_since is None:
            self._down_since = datetime.now(UTC)
            log.warning("database unavailable, buffering events (up to %d): %s", self._buffer, self.last_error)

    def _recovered(self) -> None:
        assert self._down_since is not None
        down_since, self._down_since = self._down_since, None
        lost, self._dropped_seen = self.dropped - self._dropped_seen, self.dropped
        self._drop_logged = False
        log.info(
            "database available again after %.0f s (%d failed attempts so far, %d events dropped from the buffer)",
            (datetime.now(UTC) - down_since).total_seconds(),
            self.errors,
            lost,
        )
        if lost and self._jsonlog is not None:
            self.catch_up_from_jsonlog(self._jsonlog, since=down_since - CATCH_UP_MARGIN)


def _is_transient(exc: Exception) -> bool:
    """An error that says the database cannot work right now (not that this batch is wrong)."""
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        sqlstate = str(getattr(exc.orig, "sqlstate", "") or "")
        if sqlstate in _NOT_READY:
            return True
        if sqlstate.startswith("54"):
            return False  # PostgreSQL "program limit exceeded": this data, not the server
        return isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError)
    return isinstance(exc, sa_exc.DisconnectionError | sa_exc.TimeoutError)


def _chunks(events: Iterable[Event], size: int) -> Iterable[list[Event]]:
    it = iter(events)
    while chunk := list(itertools.islice(it, size)):
        yield chunk
