"""Alembic environment: runs on the connection :func:`sandtrap.storage.migrate.upgrade` hands over.

For developers, ``alembic -x url=sqlite:///data/sandtrap.db revision --autogenerate -m "..."`` (with a
throw-away alembic.ini pointing ``script_location`` here) works as well: the URL then comes from ``-x``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from sandtrap.storage.engine import make_engine
from sandtrap.storage.models import Base

config = context.config


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
        if not url:
            raise SystemExit("pass the database with: alembic -x url=sqlite:///path/to/sandtrap.db ...")
        with make_engine(url).begin() as conn:
            _migrate(conn)
        return
    _migrate(connection)


def _migrate(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=True,  # SQLite alters tables by copying them
        compare_type=True,
        user_module_prefix="sandtrap.storage.types.",
    )
    with context.begin_transaction():
        context.run_migrations()


run()
