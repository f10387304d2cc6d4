"""Initial schema: sessions, auth attempts, commands, events, artifacts, casts, sandboxes.

Revision ID: 0001
Revises:
Create Date: 2026-11-22

Plain SQLAlchemy types here (not the application's TypeDecorators), so this file keeps meaning what
it meant when it was written. On PostgreSQL the command-text index needs the ``pg_trgm`` extension (a
trusted extension: the database owner may create it); where it cannot be created, that one index is
left out and substring search scans.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger(__name__)

TS = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _session_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["session"], ["sessions.id"], name=f"fk_{table}_session_sessions", ondelete="CASCADE"
    )


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("id", sa.String(), nullable=False, comment="12 hex chars, the events' `session`"),
        sa.Column("sensor", sa.String(), nullable=False),
        sa.Column("protocol", sa.String(), nullable=False),
        sa.Column("src_ip", sa.String(), nullable=False),
        sa.Column("src_port", sa.Integer(), nullable=False),
        sa.Column("dst_ip", sa.String(), nullable=False),
        sa.Column("dst_port", sa.Integer(), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("ended_at", TS, nullable=True),
        sa.Column("duration_ms", sa.BigInteger(), nullable=True),
        sa.Column("close_reason", sa.Text(), nullable=True),
        sa.Column("client_version", sa.Text(), nullable=True),
        sa.Column("hassh", sa.String(), nullable=True),
        sa.Column("hassh_algorithms", sa.Text(), nullable=True),
        sa.Column("key_type", sa.Text(), nullable=True, comment="last public key offered"),
        sa.Column("key_fingerprint", sa.String(), nullable=True, comment="MD5, colon-separated hex"),
        sa.Column("username", sa.Text(), nullable=True, comment="last successful login"),
        sa.Column("login_success", sa.Boolean(), nullable=False),
        sa.Column("auth_attempts_count", sa.Integer(), nullable=False),
        sa.Column("commands_count", sa.Integer(), nullable=False),
        sa.Column("artifacts_count", sa.Integer(), nullable=False),
        sa.Column("sandbox_id", sa.String(), nullable=True),
        sa.Column("sandbox_name", sa.String(), nullable=True),
        sa.Column("bytes_in", sa.BigInteger(), nullable=False),
        sa.Column("bytes_out", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_sessions"),
    )
    op.create_index("ix_sessions_started_at", "sessions", ["started_at"])
    op.create_index("ix_sessions_src_ip", "sessions", ["src_ip"])
    op.create_index("ix_sessions_username", "sessions", ["username"], postgresql_using="hash")

    op.create_table(
        "auth_attempts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("session", sa.String(), nullable=False),
        sa.Column("timestamp", TS, nullable=False),
        sa.Column("username", sa.Text(), nullable=False),
        sa.Column("password", sa.Text(), nullable=True),
        sa.Column("method", sa.String(), nullable=False),
        sa.Column("success", sa.Boolean(), nullable=False),
        sa.Column("key_type", sa.Text(), nullable=True),
        sa.Column("fingerprint", sa.String(), nullable=True),
        sa.Column("fingerprint_sha256", sa.String(), nullable=True),
        sa.Column("key", sa.Text(), nullable=True),
        _session_fk("auth_attempts"),
        sa.PrimaryKeyConstraint("id", name="pk_auth_attempts"),
    )
    op.create_index("ix_auth_attempts_session_timestamp", "auth_attempts", ["session", "timestamp"])
    op.create_index("ix_auth_attempts_username", "auth_attempts", ["username"], postgresql_using="hash")
    op.create_index("ix_auth_attempts_password", "auth_attempts", ["password"], postgresql_using="hash")

    op.create_table(
        "commands",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("session", sa.String(), nullable=False),
        sa.Column("timestamp", TS, nullable=False),
        sa.Column("channel", sa.Integer(), nullable=True),
        sa.Column("input", sa.Text(), nullable=False),
        sa.Column("source", sa.String(), nullable=False, comment="'exec' or 'tty'"),
        _session_fk("commands"),
        sa.PrimaryKeyConstraint("id", name="pk_commands"),
    )
    op.create_index("ix_commands_session_timestamp", "commands", ["session", "timestamp"])
    if op.get_bind().dialect.name != "postgresql":
        op.create_index("ix_commands_input", "commands", ["input"])
    elif _create_trigram_extension():
        op.create_index(
            "ix_commands_input",
            "commands",
            ["input"],
            postgresql_using="gin",
            postgresql_ops={"input": "gin_trgm_ops"},
        )

    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(), nullable=False),
        sa.Column("session", sa.String(), nullable=True, comment="no foreign key: sensor-wide events have none"),
        sa.Column("eventid", sa.String(), nullable=False),
        sa.Column("timestamp", TS, nullable=False),
        sa.Column("data", JSON, nullable=False, comment="the event as the JSON log has it"),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
        sa.UniqueConstraint("event_id", name="uq_events_event_id"),
    )
    op.create_index("ix_events_session_timestamp", "events", ["session", "timestamp"])

    op.create_table(
        "artifacts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("session", sa.String(), nullable=False),
        sa.Column("timestamp", TS, nullable=False),
        sa.Column("sha256", sa.String(), nullable=True),
        sa.Column("path", sa.Text(), nullable=False, comment="the file's name or path in the sandbox"),
        sa.Column("size", sa.BigInteger(), nullable=True),
        sa.Column("mode", sa.String(), nullable=True),
        sa.Column("via", sa.String(), nullable=False, comment="'sftp', 'scp' or 'changed'"),
        sa.Column("kind", sa.String(), nullable=True, comment="what changed: e.g. 'added', 'modified'"),
        sa.Column("stored", sa.Boolean(), nullable=False),
        sa.Column("outfile", sa.Text(), nullable=True, comment="where the content is kept on the sensor"),
        _session_fk("artifacts"),
        sa.PrimaryKeyConstraint("id", name="pk_artifacts"),
    )
    op.create_index("ix_artifacts_session", "artifacts", ["session"])
    op.create_index("ix_artifacts_sha256", "artifacts", ["sha256"])

    op.create_table(
        "casts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("session", sa.String(), nullable=False),
        sa.Column("channel", sa.Integer(), nullable=True),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=True),
        sa.Column("sha256", sa.String(), nullable=True),
        sa.Column("opened_at", TS, nullable=True),
        sa.Column("closed_at", TS, nullable=True),
        _session_fk("casts"),
        sa.PrimaryKeyConstraint("id", name="pk_casts"),
    )
    op.create_index("ix_casts_session", "casts", ["session"])

    op.create_table(
        "sandboxes",
        sa.Column("id", sa.String(), nullable=False, comment="the backend's id (container id)"),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("session", sa.String(), nullable=True, comment="the session that acquired it"),
        sa.Column("src_ip", sa.String(), nullable=True),
        sa.Column("state", sa.String(), nullable=False, comment="'assigned' or 'released'"),
        sa.Column("acquired_at", TS, nullable=True),
        sa.Column("released_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_sandboxes"),
    )
    op.create_index("ix_sandboxes_session", "sandboxes", ["session"])


def _create_trigram_extension() -> bool:
    """``CREATE EXTENSION pg_trgm`` in a savepoint: True when it is there afterwards."""
    bind = op.get_bind()
    try:
        with bind.begin_nested():
            bind.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    except sa.exc.DBAPIError as exc:
        log.warning("pg_trgm is not available (%s): command search will scan the commands table", exc.orig)
        return False
    return True


def downgrade() -> None:
    for table in ("sandboxes", "casts", "artifacts", "events", "commands", "auth_attempts", "sessions"):
        op.drop_table(table)
