"""Sessions name the listener they came in on (config ``services``: ssh, telnet, http, ...).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05

Rows from before are SSH's (the only listener then): their service is their protocol.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(
            sa.Column(
                "service",
                sa.String(),
                nullable=False,
                server_default="",
                comment="the listener's name (config `services`)",
            )
        )
    op.execute("UPDATE sessions SET service = protocol WHERE service = ''")
    op.create_index("ix_sessions_service", "sessions", ["service"])


def downgrade() -> None:
    op.drop_index("ix_sessions_service", table_name="sessions")
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("service")
