"""A turn's takeovers: how often a live worker took it over from a dead one, and from whom.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("assistant_messages") as table:
        table.add_column(sa.Column("takeovers", sa.Integer(), nullable=False,
                                   server_default="0"))
        table.add_column(sa.Column("taken_over_from", sa.String(255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("assistant_messages") as table:
        table.drop_column("taken_over_from")
        table.drop_column("takeovers")
