"""Sessions name the persona their box was made as (config ``personas``, issue 19).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05

Rows from before had the one box there was: their persona is ``default``, as a config without personas names it.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(
            sa.Column(
                "persona",
                sa.String(),
                nullable=False,
                server_default="",
                comment="the kind of box (config `personas`)",
            )
        )
    op.execute("UPDATE sessions SET persona = 'default' WHERE sandbox_id IS NOT NULL")


def downgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("persona")
