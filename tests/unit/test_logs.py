"""Rate-limited diagnostics: a flood logs a line per interval with the count it suppressed."""

from __future__ import annotations

import logging

import pytest

from sandtrap.logs import RateLimited


def test_flood_is_rate_limited(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr("sandtrap.logs.time.monotonic", lambda: clock[0])
    limited = RateLimited(logging.getLogger("t"), interval_s=60)
    with caplog.at_level(logging.INFO, logger="t"):
        for _ in range(10_000):
            limited.log(logging.INFO, "max_sessions", "refused %s", "1.2.3.4")
        limited.log(logging.INFO, "other", "other kind")
        clock[0] += 61
        limited.log(logging.INFO, "max_sessions", "refused %s", "1.2.3.4")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["refused 1.2.3.4", "other kind", "refused 1.2.3.4 (9999 more like this suppressed)"]


def test_keys_are_bounded() -> None:
    limited = RateLimited(logging.getLogger("t2"), max_keys=10)
    for i in range(1000):
        limited.log(logging.DEBUG, f"k{i}", "x")
    assert len(limited._last) <= 10
