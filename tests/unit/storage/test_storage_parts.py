"""Storage pieces without a workload: text cleaning, URLs, SQLite settings, log files, the sink's bounds."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from sandtrap.events import CATALOGUE, Event
from sandtrap.outputs.database import DatabaseSink
from sandtrap.storage.engine import StorageError, make_engine, normalize_url
from sandtrap.storage.ingest import HANDLERS, SESSIONLESS
from sandtrap.storage.migrate import is_migrated, upgrade
from sandtrap.storage.replay import jsonlog_files, parse_line
from sandtrap.storage.repository import Repository, like_pattern
from sandtrap.storage.types import clean, clean_json


def test_clean_replaces_only_nul_and_lone_surrogates() -> None:
    assert clean("a\x00b") == "a\ufffdb"
    assert clean(b"\xff\xfe".decode("utf-8", "surrogateescape")) == "\ufffd\ufffd"
    kept = "tab\tesc\x1b[0m bell\x07 emoji 🐍 rtl \u202e é"
    assert clean(kept) == kept
    assert clean_json({"k\x00": ["v\x00", 1, None, {"n": "\udcff"}], "t": (True, 2.5)}) == {
        "k\ufffd": ["v\ufffd", 1, None, {"n": "\ufffd"}],
        "t": [True, 2.5],
    }


def test_like_pattern_takes_wildcards_literally() -> None:
    assert like_pattern("50%_off\\") == "%50\\%\\_off\\\\%"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u:p@h:5432/db", "postgresql+psycopg://u:p@h:5432/db"),
        ("postgres://u:p@h/db", "postgresql+psycopg://u:p@h/db"),
        ("postgresql+psycopg://u:p@h/db", "postgresql+psycopg://u:p@h/db"),
        ("sqlite:////var/lib/sandtrap/sandtrap.db", "sqlite:////var/lib/sandtrap/sandtrap.db"),
    ],
)
def test_urls_are_normalised(given: str, expected: str) -> None:
    assert normalize_url(given).render_as_string(hide_password=False) == expected


@pytest.mark.parametrize("bad", ["postgresql+psycopg2://u@h/db", "mysql://u@h/db", "not a url", ""])
def test_unsupported_urls_are_refused_with_the_key_named(bad: str) -> None:
    with pytest.raises(StorageError, match=r"storage\.database_url"):
        normalize_url(bad)


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'new' / 'dir' / 'x.db'}")  # the directory is created
    try:
        with engine.connect() as conn:
            pragmas = {p: conn.exec_driver_sql(f"PRAGMA {p}").scalar() for p in ("journal_mode", "synchronous")}
            pragmas["busy_timeout"] = conn.exec_driver_sql("PRAGMA busy_timeout").scalar()
            pragmas["foreign_keys"] = conn.exec_driver_sql("PRAGMA foreign_keys").scalar()
    finally:
        engine.dispose()
    assert pragmas == {"journal_mode": "wal", "synchronous": 1, "busy_timeout": 10_000, "foreign_keys": 1}


def test_jsonlog_files_oldest_first(tmp_path: Path) -> None:
    names = [
        "sandtrap.json.2026-01-02",
        "sandtrap.json",
        "sandtrap.json.2026-01-01.2",
        "sandtrap.json.2026-01-01",
        "sandtrap.json.2026-01-01.10",
        "sandtrap.json.2026-01-01.1",
        "sandtrap.json.bak",
        "sandtrap.jsonx",
        "other.json.2026-01-01",
    ]
    for name in names:
        (tmp_path / name).write_text("")
    assert [p.name for p in jsonlog_files(tmp_path / "sandtrap.json")] == [
        "sandtrap.json.2026-01-01",
        "sandtrap.json.2026-01-01.1",
        "sandtrap.json.2026-01-01.2",
        "sandtrap.json.2026-01-01.10",
        "sandtrap.json.2026-01-02",
        "sandtrap.json",
    ]
    assert jsonlog_files(tmp_path / "nothing.json") == []


def test_parse_line_takes_only_our_events() -> None:
    event = parse_line('{"eventid": "cowrie.command.input", "event_id": "e1", "input": "ls", "session": "s"}')
    assert isinstance(event, Event) and event.get("input") == "ls" and event.event_id == "e1"
    assert parse_line('{"eventid": "cowrie.command.input", "input": "ls"}') is None  # no event_id
    assert parse_line("[1, 2]") is None
    assert parse_line('{"eventid": "x", "event_id": "e1", "timestamp": "yesterday"}') is None
    assert parse_line('{"eventid": "x", "ev') is None


def test_every_handled_id_is_in_the_catalogue() -> None:
    assert set(HANDLERS) <= set(CATALOGUE)
    assert set(SESSIONLESS) <= set(HANDLERS)


def test_sink_buffer_is_bounded_and_close_gives_up_in_time(tmp_path: Path) -> None:
    sink = DatabaseSink(f"sqlite:///{tmp_path / 'unmigrated.db'}", buffer_events=3, retry_min_s=0.01)
    try:
        for n in range(10):
            sink.write(Event(eventid="cowrie.session.connect", session=f"{n:012x}"))
        assert (sink.pending, sink.dropped) == (3, 7)
    finally:
        start = time.monotonic()
        sink.close(timeout_s=0.3)
        assert time.monotonic() - start < 2.0
    assert sink.pending == 3 and sink.stored == 0 and sink.errors >= 1


def test_database_errors_leave_as_storage_error(tmp_path: Path) -> None:
    with (
        Repository(f"sqlite:///{tmp_path / 'unmigrated.db'}") as repo,
        pytest.raises(StorageError, match="no such table"),
    ):
        repo.list_sessions()
    unreachable = "postgresql://sandtrap:secret@127.0.0.1:1/nothing"  # nothing listens on port 1
    with pytest.raises(StorageError, match="cannot migrate the database postgresql") as info:
        upgrade(unreachable)
    assert "secret" not in str(info.value)


def test_is_migrated_reads_without_creating_a_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh' / 'sandtrap.db'}"
    assert not is_migrated(url)
    assert not (tmp_path / "fresh").exists()  # a read on a fresh data dir leaves it as it was
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "sandtrap.db").touch()
    assert not is_migrated(url)  # a file with no tables
    upgrade(url)
    assert is_migrated(url)
