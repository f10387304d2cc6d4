"""MetricsSink: counters from events, gauges read at scrape time, served at /metrics in Prometheus' format."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sandtrap import events as ev
from sandtrap.outputs.metrics import MetricsSink

from apidata import recorded_events

Client = Callable[..., httpx.AsyncClient]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, tuple(sorted(labels.items())))]


def test_counters_follow_the_events() -> None:
    sink = MetricsSink()
    for event in recorded_events():
        sink.write(event)
    text = generate_latest(sink.registry).decode()
    assert value(text, "sandtrap_sessions_total") == 3
    assert value(text, "sandtrap_sessions_active") == 1  # C is still open
    assert value(text, "sandtrap_auth_attempts_total", result="success") == 2
    assert value(text, "sandtrap_auth_attempts_total", result="failed") == 4
    assert value(text, "sandtrap_sandbox_acquire_seconds_count") == 1
    assert value(text, "sandtrap_sandbox_acquire_seconds_sum") == 0.0125
    assert value(text, "sandtrap_sandbox_acquire_seconds_bucket", le="0.025") == 1
    assert value(text, "sandtrap_sandbox_acquire_seconds_bucket", le="0.01") == 0
    assert value(text, "sandtrap_relayed_bytes_total", direction="in") == 310 + 5
    assert value(text, "sandtrap_relayed_bytes_total", direction="out") == 910 + 7
    assert value(text, "sandtrap_artifacts_stored_total") == 1  # the upload; the changed file was not stored
    assert value(text, "sandtrap_events_total", eventid=ev.SESSION_CONNECT) == 3
    assert sum(v for (n, _), v in samples(text).items() if n == "sandtrap_events_total") == len(recorded_events())
    # Nothing wired for scrape time: no pool or storage families.
    assert not any(n.startswith(("sandtrap_pool", "sandtrap_storage")) for n, _ in samples(text))


def test_odd_field_values_do_not_break_counting() -> None:
    sink = MetricsSink()
    for fields in ({"bytes_in": "lots", "bytes_out": -5}, {"bytes_in": float("nan")}, {}):
        sink.write(ev.Event(eventid=ev.SESSION_CLOSED, session="000000000001", **fields))
    sink.write(ev.Event(eventid=ev.SANDBOX_ASSIGNED, session="000000000001", acquire_ms=None))
    sink.write(ev.Event(eventid="not.in.the.catalogue", session="000000000001"))
    text = generate_latest(sink.registry).decode()
    assert value(text, "sandtrap_relayed_bytes_total", direction="in") == 0
    assert value(text, "sandtrap_sessions_active") == 0
    assert value(text, "sandtrap_events_total", eventid="other") == 1


def test_scrape_time_gauges_from_pool_and_storage() -> None:
    pool = {"warm": 3, "active": 1, "preserved": 7, "creating": 0, "start_failures": 2}
    storage: dict[str, Any] = {"pending": 4, "stored": 100, "errors": 1, "rejected": 0, "dropped": 5, "is_down": True}
    sink = MetricsSink(lambda: pool, lambda: storage)
    text = generate_latest(sink.registry).decode()
    assert value(text, "sandtrap_pool_sandboxes", state="warm") == 3
    assert value(text, "sandtrap_pool_sandboxes", state="active") == 1
    assert value(text, "sandtrap_pool_sandboxes", state="preserved") == 7
    assert value(text, "sandtrap_sandbox_start_failures_total") == 2
    assert value(text, "sandtrap_storage_errors_total") == 1
    assert value(text, "sandtrap_storage_dropped_events_total") == 5
    assert value(text, "sandtrap_storage_pending_events") == 4
    assert value(text, "sandtrap_storage_up") == 0
    pool["warm"], storage["is_down"] = 2, False
    text = generate_latest(sink.registry).decode()
    assert value(text, "sandtrap_pool_sandboxes", state="warm") == 2
    assert value(text, "sandtrap_storage_up") == 1


def test_recording_errors_and_free_bytes() -> None:
    rec: dict[str, Any] = {"ok": False, "errors": {"jsonlog": 3, "casts": 1}, "free_bytes": 0}
    sink = MetricsSink(recording_status=lambda: rec)
    text = generate_latest(sink.registry).decode()
    assert value(text, "sandtrap_recording_errors_total", output="jsonlog") == 3
    assert value(text, "sandtrap_recording_errors_total", output="casts") == 1
    assert value(text, "sandtrap_recording_errors_total", output="artifacts") == 0
    assert value(text, "sandtrap_recording_errors_total", output="database") == 0
    assert value(text, "sandtrap_recording_ok") == 0
    assert value(text, "sandtrap_data_free_bytes") == 0
    rec.update(ok=True, free_bytes=None)
    text = generate_latest(sink.registry).decode()
    assert value(text, "sandtrap_recording_ok") == 1
    assert not any(n == "sandtrap_data_free_bytes" for n, _ in samples(text))  # unknown: not a made-up 0


async def test_metrics_endpoint(client: Client) -> None:
    sink = MetricsSink(lambda: {"warm": 1})
    for event in recorded_events():
        sink.write(event)
    c = client(metrics=sink.registry)
    r = await c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert value(r.text, "sandtrap_sessions_total") == 3
    assert value(r.text, "sandtrap_pool_sandboxes", state="warm") == 1
    om = await c.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert om.text.rstrip().endswith("# EOF")
    assert (await client().get("/metrics")).status_code == 404  # sandtrap api: no metrics
