"""Suppressions ("STOP always wins") and the retry schedule of Telnyx events.

`suppressions`: phones (keyed hash, church-independent) that opted out of a sending
number, written in the same statement that stores the inbound STOP event.
`webhook_events.next_attempt_at`: an event that failed to apply waits for it
(exponential backoff over minutes) before it is claimed again.

Revision ID: 0009_suppressions
Revises: 0008_send_window
Create Date: 2026-11-30 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_suppressions"
down_revision: str | Sequence[str] | None = "0008_send_window"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "suppressions",
        sa.Column("sender_number", sa.Text(), nullable=False),
        sa.Column("phone_hmac", sa.LargeBinary(), nullable=False),
        sa.Column("opted_out_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("sender_number", "phone_hmac", name=op.f("pk_suppressions")),
    )
    op.add_column(
        "webhook_events",
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    op.drop_column("webhook_events", "next_attempt_at")
    op.drop_table("suppressions")
