"""`dead_letters`: what exhausted its retries, with its error, attempts and replay state."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, Identity, Index, Integer, String, Text, func
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from koinonia.db import Base


class DeadLetter(Base):
    __tablename__ = "dead_letters"
    __table_args__ = (
        Index("ix_dead_letters_kind_created_at", "kind", "created_at"),
        Index("ix_dead_letters_church_id", "church_id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    # e.g. "sms.send", "webhook.telnyx", "webhook.stripe", "job.<task name>"
    kind: Mapped[str] = mapped_column(String(60))
    church_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    # What a replay needs to run the work again (never secrets; ids rather than contents).
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    last_error: Mapped[str] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(String(40))
    attempts: Mapped[int] = mapped_column(Integer)
    first_failed_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    last_failed_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    # pending → replaying → replayed | replay_failed
    replay_state: Mapped[str] = mapped_column(String(20), server_default="pending")
    replayed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
