"""`webhook_events`: verified provider events as received, deduplicated by event id."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, Identity, Index, Integer, String, Text, func, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from koinonia.db import Base


class WebhookEvent(Base):
    __tablename__ = "webhook_events"
    __table_args__ = (
        # Redelivery of the same event is a no-op: INSERT … ON CONFLICT DO NOTHING.
        Index("uq_webhook_events_provider_event_id", "provider", "event_id", unique=True),
        # Workers claim unprocessed events in arrival order.
        Index(
            "ix_webhook_events_pending",
            "provider",
            "id",
            postgresql_where=text("processed_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    provider: Mapped[str] = mapped_column(String(20))  # telnyx | stripe
    event_id: Mapped[str] = mapped_column(String(100))
    event_type: Mapped[str] = mapped_column(String(100))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    received_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    processed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # A failed event waits until then before it is applied again (backoff over minutes).
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
