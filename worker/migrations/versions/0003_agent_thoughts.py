"""The agent's steps shown with an assistant message (thinking, tool calls and their results).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "agent_thoughts",
        sa.Column("message_id", sa.String(128), primary_key=True),
        sa.Column("position", sa.Integer(), primary_key=True),
        sa.Column("step_id", sa.String(64), nullable=False),
        sa.Column("thought", sa.Text(), nullable=False),
        sa.Column("tool", sa.String(256), nullable=False),
        sa.Column("tool_input", sa.Text(), nullable=False),
        sa.Column("observation", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("agent_thoughts")
