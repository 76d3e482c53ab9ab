"""Conversation ownership: each conversation belongs to the owner of its first turn.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

Existing conversations are given the (tenant, app, user) of their earliest message, so that
turns already stored keep working for their owner and are refused to everyone else.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "conversations",
        sa.Column("conversation_id", sa.String(128), primary_key=True),
        sa.Column("tenant_id", sa.String(128), nullable=False),
        sa.Column("app_id", sa.String(128), nullable=False),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.execute(
        "INSERT INTO conversations (conversation_id, tenant_id, app_id, user_id, created_at) "
        "SELECT m.conversation_id, m.tenant_id, m.app_id, m.user_id, m.created_at "
        "FROM assistant_messages m "
        "WHERE m.message_id = (SELECT first.message_id FROM assistant_messages first "
        "WHERE first.conversation_id = m.conversation_id "
        "ORDER BY first.created_at, first.message_id LIMIT 1)"
    )


def downgrade() -> None:
    op.drop_table("conversations")
