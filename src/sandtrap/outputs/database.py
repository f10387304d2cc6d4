"""Events into the database: ``write`` only queues; a thread stores them in batches, one transaction each.

The mapping of each event id to rows lives in :mod:`sandtrap.storage.ingest`; this module is about
getting events there without ever stalling the SSH event loop:

* Idempotent: every event carries a unique ``event_id``; one already stored is skipped.
* Outage (database unreachable or not operating): the batch stays queued and is retried with
  backoff (0.5 s doubling to 30 s). The queue holds at most ``buffer_events``. When it is full and the
  JSON log is on, the sink *spills*: it marks the log's position (:meth:`JsonLogSink.mark`) and queues
  nothing more; every later event is in the log only. Once the database stores again, the writer replays
  the log from that mark (:func:`~sandtrap.storage.replay.read_from`, a batch at a time, through
  rotations) until it reaches the log's end; the next event then closes the spill with a second mark and
  is queued again, and the replay finishes at that mark. Memory stays bounded by ``buffer_events`` however
  long the outage; events lost: none (the replay overlaps the queue at both ends; storing is idempotent).
  Without a JSON log, the oldest queued event is dropped and counted in ``dropped``.
  Status: ``spilling``, ``spilled`` (events left to the log), ``replayed`` (events stored from it),
  ``backlog`` (left to replay), ``catch_ups`` (replays finished). The outage is logged when it starts
  and when it ends, not per event.
* An event a working database refuses (a bug, a value it cannot take) is stored alone, rejected,
  counted in ``rejected`` and logged; the rest of its batch is stored.

The spill's marks are taken in ``write`` (the event loop), so an event the bus hands to both sinks is on
the right side of a mark whichever sink it reaches first.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from sandtrap.events import Event
from sandtrap.outputs.backlog import Backlog
from sandtrap.outputs.jsonlog import JsonLogSink
from sandtrap.storage.engine import IMMEDIATE, describe, make_engine
from sandtrap.storage.ingest import apply_events
from sandtrap.storage.replay import ReadResult, read_jsonlog

log = logging.getLogger(__name__)
# How long the writer waits for a batch to fill once an event is queued (a bound on the added latency).
LINGER_S = 0.05

BATCH_SIZE = 500
RETRY_MIN_S = 0.5
RETRY_MAX_S = 30.0
# While a replay waits for the log (a mark not placed yet, the log's end reached): how often it looks again.
REPLAY_POLL_S = 0.1
PROGRESS_S = 10.0  # a long replay says how far it is this often
# PostgreSQL: table or schema missing (not migrated yet): wait for it like for an outage.
_NOT_READY = frozenset({"42P01", "3F000"})


class DatabaseSink:
    """An :class:`~sandtrap.events.EventSink` that stores events through its own writer thread."""

    def __init__(
        self,
        url: str,
        buffer_events: int = 100_000,
        *,
        jsonlog: JsonLogSink | Path | None = None,
        batch_size: int = BATCH_SIZE,
        retry_min_s: float = RETRY_MIN_S,
        retry_max_s: float = RETRY_MAX_S,
    ) -> None:
        self._engine = make_engine(url)
        self._writer = self._engine.execution_options(**{IMMEDIATE: True})
        self._buffer = max(1, buffer_events)
        self._batch = max(1, batch_size)
        self._retry = (retry_min_s, retry_max_s)
        # The log to spill to and replay from (a JsonLogSink); a bare path: only the start-up's catch-up.
        self._log = jsonlog if isinstance(jsonlog, JsonLogSink) else None
        self._jsonlog = jsonlog.path if isinstance(jsonlog, JsonLogSink) else jsonlog
        self._backlogs: deque[Backlog] = deque()  # stretches of the log to replay, oldest first
        self._spilling = False  # events are left to the log, not queued
        self._resume = False  # the replay reached the log's end: the next write closes the spill
        self._progress_logged = time.monotonic()
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
        self.spilled = 0
        self.replayed = 0
        self.catch_ups = 0
        self.last_error = ""
        self._down_since: datetime | None = None
        self._dropped_seen = 0
        self._drop_logged = False
        self._thread = threading.Thread(target=self._run, name="database-sink", daemon=True)
        self._thread.start()

    # -- the EventSink side (event loop thread) -------------------------------------------------------------
    def write(self, event: Event) -> None:
        """Queue the event (or, spilling, leave it to the JSON log); never waits for the database."""
        with self._lock:
            if self._spilling:
                if not self._resume:
                    self.spilled += 1
                    return
                # The replay caught up with the log: from this event on, queue again; replay up to here.
                assert self._log is not None
                self._backlogs[-1].end = self._log.mark()
                self._spilling = self._resume = False
                log.info("database sink: queueing again; replaying the JSON log up to this point")
            self._seq += 1
            self._queue.append((self._seq, event))
            if len(self._queue) > self._buffer:
                if self._log is not None:
                    # This event stays queued; every later one is after the mark (or is this one: harmless).
                    self._backlogs.append(Backlog(self._log.mark()))
                    self._spilling = True
                    log.warning(
                        "database sink buffer full (%d events): further events stay in the JSON log only, "
                        "replayed from it when the database takes them",
                        self._buffer,
                    )
                else:
                    self._queue.popleft()
                    self.dropped += 1
                    if not self._drop_logged:
                        self._drop_logged = True
                        log.warning(
                            "database sink buffer full (%d events) and no JSON log: dropping the oldest",
                            self._buffer,
                        )
            self._lock.notify()

    @property
    def pending(self) -> int:
        """Events queued and not stored yet."""
        return len(self._queue)

    @property
    def backlog(self) -> int:
        """Events left to the JSON log and not replayed yet (an estimate: the replay's overlap counts once)."""
        return max(0, self.spilled - self.replayed) if self._backlogs else 0

    @property
    def is_spilling(self) -> bool:
        """Events go to the JSON log only, and the replay has not caught up with it."""
        return self._spilling and not self._resume

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
            "down_since": self._down_since,
            "spilling": self.is_spilling,
            "spilled": self.spilled,
            "replayed": self.replayed,
            "backlog": self.backlog,
            "catch_ups": self.catch_ups,
            "last_error": self.last_error,
        }

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued event is stored and the log's backlog replayed; False when ``timeout_s``
        passed first."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._queue and not self._has_log_work(), timeout_s)

    def _has_log_work(self) -> bool:
        """A backlog to replay (not just the open one, read to the log's end, waiting for the next event)."""
        return bool(self._backlogs) and not (len(self._backlogs) == 1 and self._spilling and self._resume)

    def close(self, timeout_s: float = 10.0) -> None:
        """Store what is queued, waiting at most ``timeout_s``; what is left is in the JSON log."""
        with self._lock:
            self._closing = True
            self._deadline = time.monotonic() + timeout_s
            self._lock.notify_all()
        self._wake.set()
        self._thread.join(timeout_s + 1.0)
        if self.pending or self._backlogs:
            log.warning(
                "database sink closed with %d events not stored and %d left to replay from the JSON log; they "
                "are in the JSON log and the next start-up imports them",
                self.pending,
                self.backlog,
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
        log_turn = False  # alternate queue and backlog batches, so neither waits on the other under load
        while True:
            with self._lock:
                while not self._queue and not self._closing and not self._has_log_work():
                    self._lock.wait(REPLAY_POLL_S if self._backlogs else None)
                if self._closing and not self._queue:
                    return  # a backlog left is in the JSON log: the next start-up imports it
                use_log = self._has_log_work() and not self._closing and (log_turn or not self._queue)
                if not use_log:
                    # Linger a moment for more: under a flood, one transaction then carries many events
                    # (per-transaction work dominated the honeypot's CPU per login attempt).
                    linger_until = time.monotonic() + LINGER_S
                    while len(self._queue) < self._batch and not self._closing:
                        remaining = linger_until - time.monotonic()
                        if remaining <= 0:
                            break
                        self._lock.wait(remaining)
                    batch = list(itertools.islice(self._queue, self._batch))
            log_turn = not use_log
            if use_log:
                stored = self._replay_step()
                if stored is None:
                    with self._lock:
                        self._lock.wait(REPLAY_POLL_S)  # the log has nothing yet: look again shortly
                    continue
                if stored:
                    delay = self._retry[0]
                    continue
            elif self._store([event for _, event in batch]) is not None:
                if self._down_since is not None:
                    self._recovered()
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

    def _replay_step(self) -> bool | None:
        """One batch of the oldest backlog into the database: True when it moved on, False when the database
        is unavailable (back off), None when there is nothing to read yet."""
        assert self._jsonlog is not None
        backlog = self._backlogs[0]
        result = backlog.read_batch(self._jsonlog, self._batch)
        if result is None:
            return None
        new = 0
        if result.events:
            stored = self._store(result.events)
            if stored is None:
                return False
            if self._down_since is not None:
                self._recovered()
            new = stored
        backlog.advance(result, new)
        with self._count_lock:
            self.replayed += new
        if new and time.monotonic() - self._progress_logged >= PROGRESS_S:
            self._progress_logged = time.monotonic()
            log.info(
                "database sink replaying the JSON log: %d events replayed, about %d left", self.replayed, self.backlog
            )
        return self._after_replay(backlog, result)

    def _after_replay(self, backlog: Backlog, result: ReadResult) -> bool | None:
        with self._lock:
            if backlog.is_done(result):
                self._backlogs.popleft()
                self.catch_ups += 1
                log.info(
                    "database sink caught up from the JSON log: %d events replayed (%d read) in %.1f s",
                    backlog.replayed,
                    backlog.read,
                    time.monotonic() - backlog.began_monotonic,
                )
                self._lock.notify_all()
                return True
            if result.events:
                return True
            # Read to the log's end with the database storing and room in the queue: the next event closes the
            # spill (while the database is down, closing it would only open the next one, an event more queued).
            caught_up = result.at_end and backlog.is_open and len(self._backlogs) == 1
            if caught_up and not self._resume and self._down_since is None and len(self._queue) < self._buffer:
                self._resume = True
                self._lock.notify_all()
            return None

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
            "database available again after %.0f s (%d failed attempts so far; %d events to replay from the JSON "
            "log, %d dropped from the buffer)",
            (datetime.now(UTC) - down_since).total_seconds(),
            self.errors,
            self.backlog,
            lost,
        )


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
