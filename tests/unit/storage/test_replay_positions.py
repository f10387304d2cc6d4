"""The JSON log's replay positions: a mark lands between the events written before and after it, reading from it
follows rotations and stops at an end mark, half-written and oversized lines are handled, a backlog moves on only
when its batch is stored. No database: the log files and the bookkeeping only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandtrap.events import Event
from sandtrap.outputs.backlog import Backlog
from sandtrap.outputs.jsonlog import JsonLogSink
from sandtrap.storage import replay
from sandtrap.storage.replay import LogMark, LogPosition, read_from

from .storage_suite import full_session


def placed(mark: LogMark) -> LogPosition:
    assert mark.ready.wait(10)
    assert mark.position is not None
    return mark.position


def ids(events: list[Event]) -> list[str]:
    return [e.event_id for e in events]


def test_a_mark_lies_between_the_events_before_and_after_it(tmp_path: Path) -> None:
    events = full_session("0000000000f1")
    log = JsonLogSink(tmp_path)
    for e in events[:4]:
        log.write(e)
    start = log.mark()
    for e in events[4:9]:
        log.write(e)
    end = log.mark()
    for e in events[9:]:
        log.write(e)
    log.close()
    got = read_from(log.path, placed(start), 100, placed(end))
    assert ids(got.events) == ids(events[4:9]) and got.reached and got.at_end
    rest = read_from(log.path, placed(end), 100)
    assert ids(rest.events) == ids(events[9:]) and rest.at_end and not rest.reached
    # In batches: each picks up where the last stopped.
    first = read_from(log.path, placed(start), 2, placed(end))
    assert ids(first.events) == ids(events[4:6]) and not first.at_end and first.position is not None
    second = read_from(log.path, first.position, 100, placed(end))
    assert ids(second.events) == ids(events[6:9]) and second.reached


def test_reading_follows_rotations_to_the_end_mark(tmp_path: Path) -> None:
    events = full_session("0000000000f2") + full_session("0000000000f3")
    log = JsonLogSink(tmp_path, rotate_bytes=1500)  # a few events per file
    log.write(events[0])
    start = log.mark()
    for e in events[1:-3]:
        log.write(e)
    end = log.mark()
    for e in events[-3:]:
        log.write(e)
    log.close()
    assert len(list(tmp_path.glob("sandtrap.json.*"))) >= 3
    assert (placed(start).dev, placed(start).ino) != (placed(end).dev, placed(end).ino)
    got, position, rounds = [], placed(start), 0
    while True:
        result = read_from(log.path, position, 3, placed(end))
        got += result.events
        assert result.position is not None
        position, rounds = result.position, rounds + 1
        if result.reached:
            break
    assert ids(got) == ids(events[1:-3]) and rounds > 3


def test_a_half_written_line_waits_and_long_or_broken_lines_are_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replay, "MAX_LINE_BYTES", 4096)
    events = full_session("0000000000f4")
    log = JsonLogSink(tmp_path)
    mark = log.mark()
    log.write(events[0])
    log.close()
    line = (tmp_path / "sandtrap.json").read_bytes()
    with open(log.path, "ab") as f:
        f.write(b"x" * 10_000 + b"\n" + b"not json\n" + line.replace(events[0].event_id.encode(), b"f" * 32)[:40])
    got = read_from(log.path, placed(mark), 100)
    assert ids(got.events) == [events[0].event_id] and got.skipped == 2 and got.at_end
    assert got.position is not None and got.position.offset == os.path.getsize(log.path) - 40
    with open(log.path, "ab") as f:  # the writer finishes the line
        f.write(line.replace(events[0].event_id.encode(), b"f" * 32)[40:])
    later = read_from(log.path, got.position, 100)
    assert ids(later.events) == ["f" * 32]


def test_a_mark_whose_file_is_gone_falls_back_to_recent_files(tmp_path: Path) -> None:
    events = full_session("0000000000f5")
    log = JsonLogSink(tmp_path)
    for e in events:
        log.write(e)
    mark = log.mark()
    log.close()
    gone = LogPosition(placed(mark).dev, placed(mark).ino + 10_000_000, 5, placed(mark).at)
    got = read_from(log.path, gone, 100)
    assert ids(got.events) == ids(events)  # replayed again: storing is idempotent


def test_a_backlog_moves_on_only_when_its_batch_is_stored(tmp_path: Path) -> None:
    events = full_session("0000000000f6")
    log = JsonLogSink(tmp_path)
    backlog = Backlog(log.mark())
    for e in events:
        log.write(e)
    log.close()
    result = backlog.read_batch(log.path, 4)
    assert result is not None and ids(result.events) == ids(events[:4])
    again = backlog.read_batch(log.path, 4)  # not stored (the database was down): the same batch
    assert again is not None and ids(again.events) == ids(events[:4])
    backlog.advance(again, new=3)
    rest = backlog.read_batch(log.path, 100)
    assert rest is not None and ids(rest.events) == ids(events[4:]) and rest.at_end
    backlog.advance(rest, new=len(rest.events))
    assert backlog.is_open and not backlog.is_done(rest)
    assert (backlog.read, backlog.replayed) == (len(events), len(events) - 1)
    # Closed at the log's end: done once read there.
    end = LogMark()
    end.resolve(LogPosition(rest.position.dev, rest.position.ino, rest.position.offset) if rest.position else None)
    backlog.end = end
    last = backlog.read_batch(log.path, 100)
    assert last is not None and last.events == [] and backlog.is_done(last)
