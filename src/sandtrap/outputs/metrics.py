"""Prometheus metrics: an :class:`~sandtrap.events.EventSink` that counts events, plus gauges read at scrape time.

From events (``write`` only touches in-memory counters): sessions, active sessions, auth attempts by
result, sandbox acquire latency, bytes relayed, events by id, artifacts stored. At scrape time, from the
callables given: the pool's sandboxes by state and its container start failures, the database
sink's counters, and the recording outputs' write failures with the data dir's free bytes. The registry is this sink's own (``/metrics`` serves it), never the global one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from sandtrap import events as ev
from sandtrap.outputs.recording import OUTPUTS

ACQUIRE_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
POOL_STATES = ("warm", "active", "preserved", "creating")
_STORAGE_COUNTERS = (
    ("stored", "sandtrap_storage_stored_events", "Events stored in the database"),
    ("errors", "sandtrap_storage_errors", "Failed attempts to store a batch of events (outages included)"),
    ("rejected", "sandtrap_storage_rejected_events", "Events the database refused"),
    ("dropped", "sandtrap_storage_dropped_events", "Events dropped from a full buffer with no JSON log to spill to"),
    ("spilled", "sandtrap_storage_spilled_events", "Events left to the JSON log while the buffer was full"),
    ("replayed", "sandtrap_storage_replayed_events", "Events stored from the JSON log after an outage"),
    ("catch_ups", "sandtrap_storage_catch_ups", "Replays from the JSON log finished"),
)


class MetricsSink:
    def __init__(
        self,
        pool_stats: Callable[[], Mapping[str, int]] | None = None,
        storage_status: Callable[[], Mapping[str, Any]] | None = None,
        recording_status: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._active: set[str] = set()
        self.sessions = Counter("sandtrap_sessions", "SSH connections accepted", registry=r)
        self.per_service = Counter(
            "sandtrap_service_sessions",
            "Connections accepted, by listener (config services) and protocol",
            ["service", "protocol"],
            registry=r,
        )
        self.active = Gauge("sandtrap_sessions_active", "SSH connections open now", registry=r)
        self.active.set_function(lambda: len(self._active))
        self.auth_attempts = Counter(
            "sandtrap_auth_attempts", "Authentication attempts by result", ["result"], registry=r
        )
        for result in ("success", "failed"):
            self.auth_attempts.labels(result=result)
        self.acquire = Histogram(
            "sandtrap_sandbox_acquire_seconds",
            "Time from a login to its sandbox being ready",
            buckets=ACQUIRE_BUCKETS_S,
            registry=r,
        )
        self.relayed = Counter(
            "sandtrap_relayed_bytes", "Bytes relayed between attackers and sandboxes", ["direction"], registry=r
        )
        for direction in ("in", "out"):
            self.relayed.labels(direction=direction)
        self.events = Counter("sandtrap_events", "Events emitted, by event id", ["eventid"], registry=r)
        self.artifacts = Counter(
            "sandtrap_artifacts_stored", "Uploaded or changed files whose content is stored", registry=r
        )
        r.register(_ScrapeTime(pool_stats, storage_status, recording_status))

    def write(self, event: ev.Event) -> None:
        eventid = event.eventid
        self.events.labels(eventid=eventid if eventid in ev.CATALOGUE else "other").inc()
        if eventid == ev.SESSION_CONNECT:
            self.sessions.inc()
            protocol = event.protocol if event.protocol in ("ssh", "telnet", "tcp", "udp") else "other"
            service = str(event.get("service") or protocol)[:32]  # a configured name: bounded label values
            self.per_service.labels(service=service, protocol=protocol).inc()
            if event.session:
                self._active.add(event.session)
        elif eventid == ev.SESSION_CLOSED:
            self._active.discard(event.session)
            self.relayed.labels(direction="in").inc(_number(event.get("bytes_in")))
            self.relayed.labels(direction="out").inc(_number(event.get("bytes_out")))
        elif eventid == ev.LOGIN_SUCCESS:
            self.auth_attempts.labels(result="success").inc()
        elif eventid == ev.LOGIN_FAILED:
            self.auth_attempts.labels(result="failed").inc()
        elif eventid == ev.SANDBOX_ASSIGNED:
            self.acquire.observe(_number(event.get("acquire_ms")) / 1000.0)
        elif eventid in (ev.SESSION_FILE_UPLOAD, ev.SESSION_FILE_CHANGED) and event.get("stored") is True:
            self.artifacts.inc()


class _ScrapeTime:
    """Gauges and counters that other components keep; read when Prometheus scrapes."""

    def __init__(
        self,
        pool_stats: Callable[[], Mapping[str, int]] | None,
        storage_status: Callable[[], Mapping[str, Any]] | None,
        recording_status: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        self._pool_stats = pool_stats
        self._storage_status = storage_status
        self._recording_status = recording_status

    def collect(self) -> Iterable[Metric]:
        if self._pool_stats is not None:
            stats = self._pool_stats()
            pool = GaugeMetricFamily("sandtrap_pool_sandboxes", "Sandboxes by state", labels=["state"])
            for state in POOL_STATES:
                pool.add_metric([state], float(stats.get(state, 0)))
            yield pool
            yield CounterMetricFamily(
                "sandtrap_sandbox_start_failures",
                "Sandbox containers that failed to start",
                value=float(stats.get("start_failures", 0)),
            )
            yield CounterMetricFamily(
                "sandtrap_sandbox_stop_retries",
                "Sandbox stops that failed at release and were retried in the background",
                value=float(stats.get("stop_retries", 0)),
            )
            yield CounterMetricFamily(
                "sandtrap_sandbox_strays_stopped",
                "Running sandboxes nobody tracked, stopped by the periodic sweep",
                value=float(stats.get("strays_stopped", 0)),
            )
            yield GaugeMetricFamily(
                "sandtrap_pool_target",
                "Warm boxes the pool aims for now (grows with the arrival rate, shrinks when idle)",
                value=float(stats.get("target", 0)),
            )
            yield CounterMetricFamily(
                "sandtrap_pool_memory_bound_hits",
                "Refills held back because MemAvailable had no room for another box",
                value=float(stats.get("memory_bound_hits", 0)),
            )
            yield CounterMetricFamily(
                "sandtrap_pool_shrunk",
                "Warm boxes removed because arrivals slowed",
                value=float(stats.get("shrunk", 0)),
            )
            yield CounterMetricFamily(
                "sandtrap_sandbox_cap_hits",
                "Acquires that found sandbox.max_sandboxes boxes live and none warm",
                value=float(stats.get("cap_hits", 0)),
            )
            yield CounterMetricFamily(
                "sandtrap_sandbox_evictions",
                "Idle boxes held for a source IP, released before their TTL to make room at the cap",
                value=float(stats.get("evictions", 0)),
            )
        if self._storage_status is not None:
            status = self._storage_status()
            for key, name, doc in _STORAGE_COUNTERS:
                yield CounterMetricFamily(name, doc, value=_number(status.get(key)))
            yield GaugeMetricFamily(
                "sandtrap_storage_pending_events",
                "Events queued for the database",
                value=_number(status.get("pending")),
            )
            yield GaugeMetricFamily(
                "sandtrap_storage_backlog_events",
                "Events left to the JSON log and not replayed into the database yet",
                value=_number(status.get("backlog")),
            )
            yield GaugeMetricFamily(
                "sandtrap_storage_spilling",
                "1 while the buffer is full and events go to the JSON log only",
                value=1.0 if status.get("spilling") else 0.0,
            )
            yield GaugeMetricFamily(
                "sandtrap_storage_up",
                "1 while the database stores events, 0 during an outage",
                value=0.0 if status.get("is_down") else 1.0,
            )
        if self._recording_status is not None:
            rec = self._recording_status()
            errors = rec.get("errors") or {}
            family = CounterMetricFamily(
                "sandtrap_recording_errors",
                "Failed writes of a recording output to the data dir (disk full, ...)",
                labels=["output"],
            )
            for output in OUTPUTS:
                family.add_metric([output], _number(errors.get(output)))
            yield family
            yield GaugeMetricFamily(
                "sandtrap_recording_ok",
                "1 while every recording output writes and the data dir has room, else 0",
                value=1.0 if rec.get("ok") else 0.0,
            )
            if rec.get("free_bytes") is not None:
                yield GaugeMetricFamily(
                    "sandtrap_data_free_bytes",
                    "Bytes free on the data dir's filesystem",
                    value=_number(rec.get("free_bytes")),
                )


def _number(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return number if number >= 0 and number == number and number != float("inf") else 0.0
