"""Changed files say whose doing they are: ``attacker``, ``login`` (the login's bookkeeping) or ``system`` (the
box's own daemons); see :mod:`sandtrap.bridge.origin`.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05

Rows from before stay NULL: they were diffed against the image, whose doing is not known.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("artifacts") as batch:
        batch.add_column(
            sa.Column(
                "origin",
                sa.String(),
                nullable=True,
                comment="a changed file's: 'attacker', 'login' or 'system'; NULL for uploads and older rows",
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("artifacts") as batch:
        batch.drop_column("origin")
