"""The storage suite on SQLite and on a real PostgreSQL, and a real PostgreSQL outage.

PostgreSQL comes from ``SANDTRAP_TEST_PG_URL`` or else from ``scripts/postgres.sh`` (which installs
and starts a local cluster when needed). Every test gets a database of its own, dropped afterwards.
The outage test stops and restarts the local cluster with ``pg_ctlcluster`` (root only).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

from sandtrap import events as ev
from sandtrap.outputs.database import DatabaseSink
from sandtrap.storage.engine import normalize_url
from sandtrap.storage.migrate import upgrade
from sandtrap.storage.repository import Repository

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "unit" / "storage"))

from recording_helpers import fresh_database  # noqa: E402  (dropped with retries: an autovacuum worker may hold it)
from storage_suite import *  # noqa: E402, F403  (the suite's tests and fixtures, collected here)
from storage_suite import Conn, full_session, wait_until  # noqa: E402


@pytest.fixture(scope="session")
def pg_base_url() -> URL:
    url = os.environ.get("SANDTRAP_TEST_PG_URL", "")
    if not url:
        proc = subprocess.run(
            ["bash", str(ROOT / "scripts" / "postgres.sh")], capture_output=True, text=True, timeout=900, check=False
        )
        if proc.returncode != 0 or not proc.stdout.strip():
            pytest.fail(f"scripts/postgres.sh failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        url = proc.stdout.strip().splitlines()[-1]
    return normalize_url(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'db' / 'sandtrap.db'}"
        return
    with fresh_database(request.getfixturevalue("pg_base_url")) as url:
        yield url


@pytest.fixture
def pg_url(pg_base_url: URL) -> Iterator[str]:
    with fresh_database(pg_base_url) as url:
        yield url


def _local_cluster(url: str) -> tuple[str, str]:
    """(version, name) of the local cluster serving ``url``, for pg_ctlcluster; skips when there is none."""
    parsed = normalize_url(url)
    if os.geteuid() != 0 or not shutil.which("pg_ctlcluster") or parsed.host not in ("127.0.0.1", "localhost"):
        pytest.skip("stopping PostgreSQL needs root and a local cluster managed by pg_ctlcluster")
    rows = subprocess.run(["pg_lsclusters", "-h"], capture_output=True, text=True, check=True).stdout.splitlines()
    for row in rows:
        version, name, port, *_ = row.split()
        if int(port) == (parsed.port or 5432):
            return version, name
    pytest.skip(f"no local cluster listens on port {parsed.port}")


def test_postgresql_outage_buffers_then_lands(pg_url: str, make_sink: Callable[..., DatabaseSink]) -> None:
    version, cluster = _local_cluster(pg_url)
    upgrade(pg_url)
    events = full_session("0000000000f1")
    sink = make_sink(pg_url, retry_min_s=0.1, retry_max_s=0.5)
    sink.write(events[0])
    assert sink.flush(30)

    subprocess.run(["pg_ctlcluster", version, cluster, "stop", "-m", "fast"], check=True)
    try:
        for event in events[1:]:
            sink.write(event)  # never raises, never waits
        wait_until(lambda: sink.errors >= 3)
        assert sink.is_down and sink.pending == len(events) - 1 and sink.last_error
        assert sink.stored == 1 and sink.dropped == 0
        assert not sink.flush(0.5)
    finally:
        subprocess.run(["pg_ctlcluster", version, cluster, "start"], check=True)

    assert sink.flush(60), sink.status()
    assert not sink.is_down and (sink.stored, sink.pending, sink.rejected) == (len(events), 0, 0)
    with Repository(pg_url) as repo:
        assert [e.event_id for e in repo.events("0000000000f1")] == [e.event_id for e in events]
        s = repo.get_session("0000000000f1")
        assert s is not None and s.close_reason == "client_closed" and s.commands_count == 3


def test_postgresql_schema_missing_is_waited_for(pg_url: str, make_sink: Callable[..., DatabaseSink]) -> None:
    """Tables not there yet (migration pending) is treated like an outage, not as bad events."""
    c = Conn("0000000000f2")
    sink = make_sink(pg_url)
    sink.write(c(ev.SESSION_CONNECT, after_s=0))
    wait_until(lambda: sink.errors >= 2)
    assert (sink.pending, sink.rejected, sink.is_down) == (1, 0, True)
    upgrade(pg_url)
    assert sink.flush(30) and sink.stored == 1
