"""Engines for the two supported databases: SQLite (WAL) and PostgreSQL through psycopg 3.

``postgresql://`` and ``postgres://`` URLs are rewritten to ``postgresql+psycopg://``; SQLite gets
WAL, ``synchronous=NORMAL`` and a busy timeout on every connection, and real transactions (the
driver's own implicit ones are switched off, so DDL and reads are transactional too).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, Connection, make_url

from sandtrap.errors import SandtrapError

BUSY_TIMEOUT_MS = 10_000
CONNECT_TIMEOUT_S = 5
# Execution option: the writer opens SQLite transactions with BEGIN IMMEDIATE (takes the write lock
# up front, so a read-then-write transaction never fails with SQLITE_BUSY half-way).
IMMEDIATE = "sandtrap_sqlite_immediate"


class StorageError(SandtrapError):
    """The database URL is unusable or the database refused what we asked."""


def normalize_url(url: str) -> URL:
    """The URL as SQLAlchemy should see it; PostgreSQL always through psycopg 3."""
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise StorageError(
            "storage.database_url: not a database URL (expected sqlite:///path or postgresql://user:pass@host/db)"
        ) from exc
    backend, _, driver = parsed.drivername.partition("+")
    if backend in ("postgresql", "postgres"):
        if driver not in ("", "psycopg"):
            raise StorageError(f"storage.database_url: driver {driver!r} is not supported; use postgresql+psycopg://")
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        if driver not in ("", "pysqlite"):
            raise StorageError(f"storage.database_url: driver {driver!r} is not supported; use sqlite:///path")
        return parsed
    raise StorageError(f"storage.database_url: {backend!r} is not supported; use sqlite:/// or postgresql://")


def shown_url(url: str) -> str:
    """The URL for messages and logs: the password masked."""
    try:
        return normalize_url(url).render_as_string(hide_password=True)
    except StorageError:
        return "(invalid URL)"


def describe(exc: BaseException) -> str:
    """A database error in one line, without the SQL and its parameters (attacker data, possibly huge)."""
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0][:300] if lines else ''}"


def make_engine(url: str) -> Engine:
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:" and not parsed.database.startswith("file:"):
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            parsed, connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000}, pool_pre_ping=True
        )
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(
        parsed,
        pool_pre_ping=True,
        connect_args={"connect_timeout": CONNECT_TIMEOUT_S, "options": "-c timezone=UTC"},
    )


def _sqlite_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # we say BEGIN ourselves (see _sqlite_begin)
    cur = dbapi_connection.cursor()
    try:
        cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA foreign_keys = ON")
    finally:
        cur.close()


def _sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(IMMEDIATE) else "BEGIN")
