"""Stripe events applied in order per object.

`subscriptions.status_event_created`: `created` of the newest event (subscription or
invoice) that set the status; an older one changes the status no more.
`subscriptions.invoice_period_end` / `invoice_event_created`: the newest invoice event
applied, ranked by the invoice's own period end (else its `created`) and then the
event's `created`; an invoice event ranked lower (a late `invoice.payment_failed` of an
earlier period) changes nothing.

Revision ID: 0012_provider_events
Revises: 0011_revocation
Create Date: 2026-12-10 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012_provider_events"
down_revision: str | Sequence[str] | None = "0011_revocation"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("status_event_created", "invoice_period_end", "invoice_event_created")


def upgrade() -> None:
    for name in COLUMNS:
        op.add_column(
            "subscriptions",
            sa.Column(name, sa.BigInteger(), server_default="0", nullable=False),
        )
    # Rows so far ordered every status change by `last_event_created`.
    op.execute("UPDATE subscriptions SET status_event_created = last_event_created")


def downgrade() -> None:
    for name in reversed(COLUMNS):
        op.drop_column("subscriptions", name)
