"""Sessions by sensor: several sensors share one database (a fleet) and the console filters by sensor.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05

An index on (sensor, started_at): the sensor filter, newest first, and the sensors' list.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_sessions_sensor_started_at", "sessions", ["sensor", "started_at"])


def downgrade() -> None:
    op.drop_index("ix_sessions_sensor_started_at", table_name="sessions")
