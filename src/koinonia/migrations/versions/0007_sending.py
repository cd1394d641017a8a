"""Sending correctness: held and urgent broadcasts, sender pauses by scope, the
`unconfirmed` recipient state and the `empty_body` skip.

Revision ID: 0007_sending
Revises: 0006_messaging
Create Date: 2026-11-29 02:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_sending"
down_revision: str | Sequence[str] | None = "0006_messaging"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_STATUSES = (
    "status IN ('queued', 'sending', 'sent', 'delivered', 'failed', 'undelivered', 'skipped')"
)
NEW_STATUSES = (
    "status IN ('queued', 'sending', 'sent', 'delivered', 'failed', 'undelivered', "
    "'skipped', 'unconfirmed')"
)


def upgrade() -> None:
    op.add_column("messages", sa.Column("starts_at", sa.DateTime(timezone=True)))
    op.add_column(
        "messages", sa.Column("urgent", sa.Boolean, server_default="false", nullable=False)
    )
    op.create_table(
        "sender_pauses",
        sa.Column("scope", sa.String(10), nullable=False),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("reason", sa.String(200), nullable=False),
        sa.Column("error_code", sa.String(20)),
        sa.Column(
            "paused_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("next_probe_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("probes", sa.Integer, server_default="0", nullable=False),
        sa.CheckConstraint("scope IN ('account', 'number')", name=op.f("ck_sender_pauses_scope")),
        sa.PrimaryKeyConstraint("scope", "key", name=op.f("pk_sender_pauses")),
    )
    op.drop_constraint("ck_message_recipients_status", "message_recipients")
    op.create_check_constraint("status", "message_recipients", NEW_STATUSES)


def downgrade() -> None:
    op.execute("UPDATE message_recipients SET status = 'sent' WHERE status = 'unconfirmed'")
    op.drop_constraint("ck_message_recipients_status", "message_recipients")
    op.create_check_constraint("status", "message_recipients", OLD_STATUSES)
    op.drop_table("sender_pauses")
    op.drop_column("messages", "urgent")
    op.drop_column("messages", "starts_at")
