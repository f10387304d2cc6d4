"""The alerts output: an :class:`~sandtrap.events.EventSink` that runs the rules and hands alerts to the targets.

``write`` only runs the rules (in-memory counts, an RE2 search of a bounded string) and puts alerts on the
targets' bounded queues: it never waits for a target, so neither a session nor the event bus ever does. An
event emitted from another thread is handed to the event loop first. The HASSHes seen are kept in
``<data_dir>/alerts/hassh-seen.txt`` (saved every ``SAVE_EVERY_S`` when new ones came, and at close).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from sandtrap import events as ev
from sandtrap.config.alerts import AlertSettings
from sandtrap.outputs.alerts.delivery import COUNTERS, TargetWorker
from sandtrap.outputs.alerts.payload import make_alert
from sandtrap.outputs.alerts.rules import RuleState, SeenSet
from sandtrap.outputs.alerts.targets import Sender, make_sender

log = logging.getLogger(__name__)
SAVE_EVERY_S = 30.0
CLOSE_GRACE_S = 2.0


class AlertSink:
    def __init__(
        self,
        settings: AlertSettings,
        data_dir: Path,
        *,
        senders: Mapping[str, Sender] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self.seen_path = data_dir / "alerts" / "hassh-seen.txt"
        self.seen: SeenSet | None = None
        if any(r.when == "new_hassh" for r in settings.rules):
            self.seen = SeenSet(settings.seen_hassh_max, _read_seen(self.seen_path, settings.seen_hassh_max))
        self.rules = [RuleState(r, settings.max_sources, self.seen) for r in settings.rules]
        given = senders or {}
        self.workers = {t.name: TargetWorker(t, given.get(t.name) or make_sender(t)) for t in settings.targets}
        self.errors = 0  # events the rules failed on (a bug): counted and logged, never raised
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread_id = 0
        self._saver: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread_id = threading.get_ident()
        for worker in self.workers.values():
            worker.start()
        if self.seen is not None:
            self._saver = asyncio.create_task(self._save_periodically(), name="alerts-seen-hassh")

    async def close(self, grace_s: float = CLOSE_GRACE_S) -> None:
        if self._saver is not None:
            self._saver.cancel()
            await asyncio.gather(self._saver, return_exceptions=True)
        await asyncio.gather(*(w.close(grace_s) for w in self.workers.values()))
        await self._save()

    # -- the EventSink side ------------------------------------------------------------------------------
    def write(self, event: ev.Event) -> None:
        if not self.rules:
            return
        if self._loop is not None and threading.get_ident() != self._thread_id:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the honeypot is going away
                self._loop.call_soon_threadsafe(self._consider, event)
            return
        self._consider(event)

    def _consider(self, event: ev.Event) -> None:
        now = self._clock()
        for state in self.rules:
            try:
                count = state.consider(event, now)
                if not count:
                    continue
                rule = state.rule
                alert = make_alert(rule.name, rule.when, count, event, self.settings.max_field_chars)
            except Exception:
                self.errors += 1
                log.exception("alert rule %s failed on %s (session %s)", state.rule.name, event.eventid, event.session)
                continue
            log.info("alert: rule %s fired on %s (session %s)", rule.name, event.eventid, event.session)
            for name in rule.targets:
                self.workers[name].offer(alert)

    # -- the seen HASSHes --------------------------------------------------------------------------------
    async def _save_periodically(self) -> None:
        while True:
            await asyncio.sleep(SAVE_EVERY_S)
            await self._save()

    async def _save(self) -> None:
        if self.seen is None or not self.seen.dirty:
            return
        text = self.seen.dump()
        try:
            await asyncio.to_thread(_write_atomically, self.seen_path, text)
        except OSError as exc:
            self.seen.dirty = True
            log.warning("alerts: cannot save the HASSHes seen to %s: %s", self.seen_path, exc.strerror)

    # -- status and metrics ------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        targets = [w.status() for w in self.workers.values()]
        failing = [t["name"] for t in targets if not t["ok"]]
        deliveries = [
            {"rule": rule, "target": w.name, **{c: getattr(w.counts[rule], c) for c in COUNTERS}}
            for rule, w in self._pairs()
        ]
        rules = [{"name": s.rule.name, "when": s.rule.when, **vars(s.counters)} for s in self.rules]
        error = f"failing: {', '.join(failing)}" if failing else None
        return {"ok": not failing, "error": error, "rules": rules, "targets": targets, "deliveries": deliveries}

    def _pairs(self) -> list[tuple[str, TargetWorker]]:
        """Every (rule, target) a rule sends to."""
        return [(s.rule.name, self.workers[t]) for s in self.rules for t in s.rule.targets]

    def collect(self) -> Iterable[Metric]:
        """Prometheus: deliveries per rule and target, matches and rate-limited alerts per rule, queue sizes."""
        docs = {
            "sent": "Alerts a target took",
            "failed": "Alerts given up on after their retries (or refused for good)",
            "dropped": "Alerts dropped because the target's queue was full",
            "retried": "Alert sending attempts after a failed one",
        }
        for counter in COUNTERS:
            family = CounterMetricFamily(f"sandtrap_alerts_{counter}", docs[counter], labels=["rule", "target"])
            for rule, w in self._pairs():
                family.add_metric([rule, w.name], float(getattr(w.counts[rule], counter)))
            yield family
        for counter, doc in (("fired", "Alerts a rule made"), ("suppressed", "Alerts a rule's rate limit held back")):
            family = CounterMetricFamily(f"sandtrap_alerts_{counter}", doc, labels=["rule"])
            for s in self.rules:
                family.add_metric([s.rule.name], float(getattr(s.counters, counter)))
            yield family
        queued = GaugeMetricFamily("sandtrap_alerts_queued", "Alerts waiting for a target", labels=["target"])
        for w in self.workers.values():
            queued.add_metric([w.name], float(w.queued))
        yield queued


def _read_seen(path: Path, max_items: int) -> list[str]:
    try:
        with path.open(encoding="ascii", errors="replace") as f:
            lines = [line.strip() for _, line in zip(range(max_items * 2), f, strict=False)]
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("alerts: cannot read the HASSHes seen from %s: %s", path, exc.strerror)
        return []
    return lines


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="ascii")
    os.replace(tmp, path)
