"""RecordingHealth (write failures per output, free space, rate-limited lines) and the JSON log on a full disk."""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

from sandtrap import events as ev
from sandtrap.bridge.artifacts import ArtifactStore
from sandtrap.bridge.recorder import CastRecorder
from sandtrap.outputs import jsonlog as jsonlog_module
from sandtrap.outputs.jsonlog import JsonLogSink
from sandtrap.outputs.recording import ARTIFACTS, CASTS, DATABASE, JSONLOG, RecordingHealth

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/casts/x/0.cast")


def wait_until(predicate: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_failing_output_is_reported_until_it_writes_again(tmp_path: Path) -> None:
    health = RecordingHealth(tmp_path)
    s = health.status()
    assert s["ok"] is True and s["error"] is None and s["failing"] == []
    assert s["errors"] == {JSONLOG: 0, CASTS: 0, ARTIFACTS: 0, DATABASE: 0}
    assert isinstance(s["free_bytes"], int) and s["free_bytes"] > 0

    health.failed(JSONLOG, ENOSPC)
    health.failed(JSONLOG, ENOSPC)
    health.failed(CASTS, ENOSPC)
    s = health.status()
    assert s["ok"] is False and s["failing"] == [CASTS, JSONLOG]
    assert s["errors"][JSONLOG] == 2 and s["errors"][CASTS] == 1
    assert "json log: [Errno 28] No space left on device" in s["error"]
    assert "0.cast" not in s["error"]  # file names (attacker-chosen parts) stay out of the status

    health.succeeded(JSONLOG)
    health.succeeded(CASTS)
    s = health.status()
    assert s["ok"] is True and s["failing"] == [] and s["errors"][JSONLOG] == 2  # the count stays


def test_low_space_and_the_database_make_recording_not_ok(tmp_path: Path) -> None:
    db: dict[str, Any] = {"errors": 3, "rejected": 1, "is_down": True, "last_error": "OperationalError: disk is full"}
    health = RecordingHealth(tmp_path, database_status=lambda: db, low_space_bytes=2**62)
    s = health.status()
    assert s["ok"] is False and s["low_space"] is True and s["failing"] == [DATABASE]
    assert s["errors"][DATABASE] == 4 and "nearly full" in s["error"] and "disk is full" in s["error"]
    db["is_down"] = False
    health = RecordingHealth(tmp_path / "missing", database_status=lambda: db)
    s = health.status()
    assert s["ok"] is True and s["free_bytes"] is None and s["low_space"] is False


def test_a_flood_of_failures_logs_a_line_then_one_when_it_writes_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    health = RecordingHealth(tmp_path)
    with caplog.at_level(logging.INFO, logger="sandtrap.outputs.recording"):
        for _ in range(10_000):
            health.failed(CASTS, ENOSPC)
            health.succeeded(CASTS)
        health.failed(JSONLOG, ENOSPC)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert "casts failed (1 failures so far): [Errno 28] No space left on device" in lines[0]
    assert "casts works again" in lines[1]
    assert "json log failed" in lines[2]
    assert health.status()["errors"][CASTS] == 10_000


def test_casts_and_artifacts_report_to_it(tmp_path: Path) -> None:
    health = RecordingHealth(tmp_path)
    if os.path.exists("/dev/full"):
        rec = CastRecorder(Path("/dev/full"), 80, 24, "xterm", "/bin/sh", "t", 0.5, 1 << 20, health=health)
        rec.close()
        assert health.status()["errors"][CASTS] == 1 and health.status()["failing"] == [CASTS]
    rec = CastRecorder(tmp_path / "c" / "0.cast", 80, 24, "xterm", "/bin/sh", "t", 0.5, 1 << 20, health=health)
    rec.on_output(b"hello", False)
    rec.close()
    assert CASTS not in health.status()["failing"]

    blocked = tmp_path / "artifacts"
    blocked.mkdir()
    store = ArtifactStore(blocked, 1 << 20, health=health)
    (blocked / "2c").write_text("a file where a directory goes")  # sha256(b"hello") starts with 2c
    assert store.put(b"hello").stored is False
    assert health.status()["errors"][ARTIFACTS] == 1 and ARTIFACTS in health.status()["failing"]
    assert store.put(b"other").stored is True
    assert ARTIFACTS not in health.status()["failing"]


def test_json_log_cuts_off_a_line_the_full_disk_cut_short(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that stops half-way (ENOSPC after some bytes) leaves no half line for the next event to join."""
    health = RecordingHealth(tmp_path)
    full = [False]
    real = jsonlog_module._write_all

    def write_all(f: Any, data: bytes) -> None:
        if full[0]:
            f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(f, data)

    monkeypatch.setattr(jsonlog_module, "_write_all", write_all)
    sink = JsonLogSink(tmp_path / "log", health=health)
    session = "0000000000a1"
    events = [ev.Event(eventid=ev.COMMAND_INPUT, session=session, input=f"cmd {i}") for i in range(6)]
    for event in events[:2]:
        sink.write(event)
    wait_until(lambda: sink.written == 2)
    before = sink.path.read_bytes()
    full[0] = True
    for event in events[2:4]:
        sink.write(event)
    wait_until(lambda: sink.errors == 2)
    assert sink.path.read_bytes() == before  # line for line what was there
    assert health.status()["failing"] == [JSONLOG]
    full[0] = False
    for event in events[4:]:
        sink.write(event)
    sink.close()
    lines = sink.path.read_text("utf-8").splitlines()
    assert [json.loads(line)["input"] for line in lines] == ["cmd 0", "cmd 1", "cmd 4", "cmd 5"]
    assert health.status()["failing"] == [] and health.status()["errors"][JSONLOG] == 2


def test_json_log_survives_values_that_cannot_be_encoded(tmp_path: Path) -> None:
    sink = JsonLogSink(tmp_path / "log")
    session = "0000000000a2"
    sink.write(ev.Event(eventid=ev.COMMAND_INPUT, session=session, input="lone \ud800 surrogate"))
    sink.write(ev.Event(eventid=ev.COMMAND_INPUT, session=session, input="next"))
    sink.close()
    lines = sink.path.read_text("utf-8").splitlines()
    assert [json.loads(line)["input"] for line in lines] == ["lone ? surrogate", "next"]
    assert sink.errors == 0
