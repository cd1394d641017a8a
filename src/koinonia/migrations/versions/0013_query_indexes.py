"""Indexes for hot queries: the recipients list without a status filter (id order per
broadcast, no sort of the whole broadcast per page), `sent` rows awaiting a final receipt
(the reconciler), and refund caps (`reference LIKE 'message:…:%'` as an index range).

Revision ID: 0013_query_indexes
Revises: 0012_provider_events
Create Date: 2026-11-29 02:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013_query_indexes"
down_revision: str | Sequence[str] | None = "0012_provider_events"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_message_recipients_message_id", "message_recipients", ["message_id", "id"])
    op.create_index(
        "ix_message_recipients_unsettled",
        "message_recipients",
        ["sent_at"],
        postgresql_where=sa.text("status = 'sent' AND finalized_at IS NULL"),
    )
    op.create_index(
        "ix_usage_ledger_credit_reference",
        "usage_ledger",
        ["church_id", "reference"],
        postgresql_ops={"reference": "text_pattern_ops"},
        postgresql_where=sa.text("kind = 'credit'"),
    )


def downgrade() -> None:
    op.drop_index("ix_usage_ledger_credit_reference", table_name="usage_ledger")
    op.drop_index("ix_message_recipients_unsettled", table_name="message_recipients")
    op.drop_index("ix_message_recipients_message_id", table_name="message_recipients")
