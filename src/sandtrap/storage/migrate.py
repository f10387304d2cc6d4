"""Apply the schema migrations shipped in this package; no alembic.ini needed at run time."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError as AlembicError
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from sandtrap.storage.engine import StorageError, describe, make_engine, normalize_url, shown_url

log = logging.getLogger(__name__)
# Alembic says "Context impl ..." at INFO on every start; our own line below is the one worth reading.
if logging.getLogger("alembic").level == logging.NOTSET:
    logging.getLogger("alembic").setLevel(logging.WARNING)

MIGRATIONS = Path(__file__).with_name("migrations")
# Two processes starting at once (honeypot and API) must not both create the tables.
_PG_LOCK_KEY = 0x5A4D7472  # any constant; "sandtrap migrations"


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head() -> str:
    """The newest revision this code knows."""
    revision = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert revision is not None
    return revision


def current(url: str) -> str | None:
    """The revision the database is at (None: not migrated yet)."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except SQLAlchemyError as exc:
        raise StorageError(f"cannot read the schema version of {shown_url(url)}: {describe(exc)}") from exc
    finally:
        engine.dispose()


def is_migrated(url: str) -> bool:
    """Whether the database has sandtrap's tables (any revision). For a read on a fresh data dir: a SQLite
    file that is not there (nothing recorded yet) is not created, nor is its directory."""
    parsed = normalize_url(url)
    database = parsed.database or ""
    if parsed.get_backend_name() == "sqlite" and database not in ("", ":memory:") and not database.startswith("file:"):
        if not Path(database).expanduser().exists():
            return False
    return current(url) is not None


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database to ``revision`` (default: the newest); a no-op when it is there already.

    Raises :class:`~sandtrap.storage.engine.StorageError` when the database cannot be reached or migrated.
    """
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
            before = MigrationContext.configure(conn).get_current_revision()
            config = alembic_config()
            config.attributes["connection"] = conn
            command.upgrade(config, revision)
            after = MigrationContext.configure(conn).get_current_revision()
        if before != after:
            log.info("database schema migrated from %s to %s", before or "empty", after)
    except (SQLAlchemyError, AlembicError) as exc:
        raise StorageError(f"cannot migrate the database {shown_url(url)}: {describe(exc)}") from exc
    finally:
        engine.dispose()
