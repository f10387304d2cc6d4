"""One target's queue and its worker: bounded, retried with exponential backoff and jitter, counted.

``offer`` never waits: a full queue drops the new alert (counted). The worker sends one alert at a time; a
failed attempt that may succeed later is retried after ``backoff_s * 2**n`` (capped at ``backoff_max_s``,
the second half jittered), up to ``retries`` times. Counters are kept per rule at this target.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from sandtrap.config.alerts import AlertTarget
from sandtrap.outputs.alerts.payload import Alert
from sandtrap.outputs.alerts.targets import Sender, SendError

log = logging.getLogger(__name__)
COUNTERS = ("sent", "failed", "dropped", "retried")
# A failure is logged when it starts, then at most once per this many seconds, and once more on recovery.
LOG_EVERY_S = 60.0


@dataclass
class Delivery:
    sent: int = 0  # alerts the target took
    failed: int = 0  # alerts given up on (retries exhausted, or an answer no retry can fix)
    dropped: int = 0  # alerts that found the queue full
    retried: int = 0  # attempts after a failed one


def backoff_s(target: AlertTarget, attempt: int, rng: random.Random) -> float:
    """The wait before retry ``attempt`` (1, 2, ...): exponential, capped, the second half jittered."""
    delay = min(target.backoff_max_s, target.backoff_s * 2 ** (attempt - 1))
    return float(delay / 2 + rng.uniform(0, delay / 2))


class TargetWorker:
    def __init__(self, target: AlertTarget, sender: Sender, rng: random.Random | None = None) -> None:
        self.target = target
        self.sender = sender
        self._rng = rng or random.Random()
        self._queue: asyncio.Queue[Alert] = asyncio.Queue(maxsize=target.queue_size)
        self.counts: defaultdict[str, Delivery] = defaultdict(Delivery)
        self.last_error = ""
        self.is_failing = False
        self._logged_at = -LOG_EVERY_S
        self._task: asyncio.Task[None] | None = None
        self._in_flight = 0  # 1 while an alert is being sent (its attempts and backoff)

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def offer(self, alert: Alert) -> None:
        try:
            self._queue.put_nowait(alert)
        except asyncio.QueueFull:
            self.counts[alert.rule].dropped += 1
            self._log_failure(f"queue full ({self.target.queue_size}): alert of rule {alert.rule} dropped")

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"alerts-{self.name}")

    async def close(self, grace_s: float) -> None:
        """Let the queue drain for up to ``grace_s``, then stop; close the sender."""
        if self._task is not None:
            try:
                async with asyncio.timeout(grace_s):
                    await self._queue.join()
            except TimeoutError:
                unsent = self._queue.qsize() + self._in_flight
                log.warning("alert target %s: %d alerts unsent at shutdown", self.name, unsent)
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.sender.close()

    async def _run(self) -> None:
        while True:
            alert = await self._queue.get()
            self._in_flight = 1
            try:
                await self._deliver(alert)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in a sender must not end the worker
                self.counts[alert.rule].failed += 1
                log.exception("alert target %s: sending failed", self.name)
            finally:
                self._in_flight = 0
                self._queue.task_done()

    async def _deliver(self, alert: Alert) -> None:
        counts = self.counts[alert.rule]
        attempt = 0
        while True:
            try:
                await self.sender.send(alert)
            except SendError as exc:
                self.last_error = str(exc)[:300]
                if not exc.retry or attempt >= self.target.retries:
                    counts.failed += 1
                    self.is_failing = True
                    self._log_failure(f"alert of rule {alert.rule} not sent after {attempt + 1} attempts: {exc}")
                    return
                attempt += 1
                counts.retried += 1
                await asyncio.sleep(backoff_s(self.target, attempt, self._rng))
                continue
            counts.sent += 1
            if self.is_failing:
                self.is_failing = False
                log.info("alert target %s (%s) takes alerts again", self.name, self.sender.description)
            return

    def _log_failure(self, message: str) -> None:
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_S:
            self._logged_at = now
            log.warning("alert target %s (%s): %s", self.name, self.sender.description, message)

    def status(self) -> dict[str, Any]:
        totals = {c: sum(getattr(d, c) for d in self.counts.values()) for c in COUNTERS}
        return {
            "name": self.name,
            "kind": self.target.kind,
            "address": self.sender.description,
            "queued": self.queued,
            "ok": not self.is_failing,
            "last_error": self.last_error or None,
            **totals,
        }
