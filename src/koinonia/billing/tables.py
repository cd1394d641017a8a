"""Tables of the billing feature."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    String,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from koinonia.db import Base


class Subscription(Base):
    """A church's plan and billing period (trial or Stripe subscription)."""

    __tablename__ = "subscriptions"

    church_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("churches.id", ondelete="CASCADE"), primary_key=True
    )
    plan: Mapped[str] = mapped_column(String(40), server_default="trial")
    status: Mapped[str] = mapped_column(String(30), server_default="trialing")
    stripe_customer_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    stripe_subscription_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    period_start: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    period_end: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    cancel_at_period_end: Mapped[bool] = mapped_column(Boolean, server_default="false")
    # `created` of the newest Stripe event applied: older ones arriving late change nothing.
    last_event_created: Mapped[int] = mapped_column(BigInteger, server_default="0")
    # `created` of the newest event (subscription or invoice) that set `status`.
    status_event_created: Mapped[int] = mapped_column(BigInteger, server_default="0")
    # The newest invoice event applied: (invoice period end or created, event created).
    invoice_period_end: Mapped[int] = mapped_column(BigInteger, server_default="0")
    invoice_event_created: Mapped[int] = mapped_column(BigInteger, server_default="0")
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class LedgerEntry(Base):
    """Append-only (a trigger refuses UPDATE and DELETE): grants, debits and credits."""

    __tablename__ = "usage_ledger"
    __table_args__ = (
        CheckConstraint("kind IN ('grant', 'debit', 'credit')", name="kind"),
        # The same grant, debit or credit is written once, however often it is retried.
        UniqueConstraint("church_id", "kind", "reference"),
        Index("ix_usage_ledger_church_period", "church_id", "period_start"),
        # Refund caps sum a debit's credits by reference prefix (`LIKE 'message:…:%'`).
        Index(
            "ix_usage_ledger_credit_reference",
            "church_id",
            "reference",
            postgresql_ops={"reference": "text_pattern_ops"},
            postgresql_where=text("kind = 'credit'"),
        ),
        # … and the debit with its replays (`= '<debit>' OR LIKE '<debit>:replay:%'`).
        Index(
            "ix_usage_ledger_debit_reference",
            "church_id",
            "reference",
            postgresql_ops={"reference": "text_pattern_ops"},
            postgresql_where=text("kind = 'debit'"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    church_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("churches.id", ondelete="CASCADE"))
    period_start: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    kind: Mapped[str] = mapped_column(String(10))
    segments: Mapped[int] = mapped_column(Integer)  # + grants and credits, - debits
    reference: Mapped[str] = mapped_column(String(120))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
