"""A message waiting for the user's answer to a question: what resuming it takes.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

JsonColumn = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("assistant_messages") as table:
        table.add_column(sa.Column("pending_input", JsonColumn, nullable=True))
        table.add_column(sa.Column("input_expires_at", sa.DateTime(timezone=True),
                                   nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("assistant_messages") as table:
        table.drop_column("input_expires_at")
        table.drop_column("pending_input")
