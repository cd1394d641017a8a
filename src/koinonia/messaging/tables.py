"""Tables of the messaging feature: broadcasts and their recipients.

`message_recipients` is partitioned by month on `created_at` (see `koinonia.partitions`);
every recipient carries its broadcast's `created_at`, so a broadcast's rows sit in one
partition and a query naming the broadcast's time prunes to it. There are no foreign
keys from the partitions: a per-row check would double the cost of a 100,000-row fan-out,
and recipients are only ever written by the broadcast that owns them.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    Sequence,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from koinonia.db import Base

MESSAGE_STATUSES = ("draft", "scheduled", "queued", "sending", "completed", "cancelled", "failed")
RECIPIENT_STATUSES = (
    "queued", "sending", "sent", "delivered", "failed", "undelivered", "skipped",
)  # fmt: skip
FINAL_RECIPIENT_STATUSES = ("delivered", "failed", "undelivered", "skipped")
SKIP_REASONS = (
    "opted_out",
    "invalid",
    "landline",
    "duplicate",
    "cancelled",
    "too_long",
    "empty_body",
)

recipient_id_seq = Sequence("message_recipients_id_seq", metadata=Base.metadata)


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("church_id", "idempotency_key"),
        Index("ix_messages_church_created", "church_id", "created_at", "id"),
        CheckConstraint(
            "status IN ('draft', 'scheduled', 'queued', 'sending', 'completed', 'cancelled', "
            "'failed')",
            name="status",
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), primary_key=True, server_default=text("gen_random_uuid()")
    )
    church_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("churches.id", ondelete="CASCADE"))
    created_by: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    body: Mapped[str] = mapped_column(Text)
    template_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    encoding: Mapped[str] = mapped_column(String(5))
    segments: Mapped[int] = mapped_column(Integer)  # per recipient, the most it may take
    characters: Mapped[int] = mapped_column(Integer)
    audience: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default="{}")
    status: Mapped[str] = mapped_column(String(10))
    recipients_total: Mapped[int] = mapped_column(Integer, server_default="0")
    queued_count: Mapped[int] = mapped_column(Integer, server_default="0")
    sent_count: Mapped[int] = mapped_column(Integer, server_default="0")
    delivered_count: Mapped[int] = mapped_column(Integer, server_default="0")
    failed_count: Mapped[int] = mapped_column(Integer, server_default="0")
    skipped_count: Mapped[int] = mapped_column(Integer, server_default="0")
    batches: Mapped[int] = mapped_column(Integer, server_default="0")
    segments_reserved: Mapped[int] = mapped_column(Integer, server_default="0")
    segments_refunded: Mapped[int] = mapped_column(Integer, server_default="0")
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[bytes | None] = mapped_column(LargeBinary)
    first_response: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    scheduled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When a held broadcast (scheduled, or outside the church's sending window) goes out.
    starts_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    urgent: Mapped[bool] = mapped_column(Boolean, server_default="false")
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class MessageRecipient(Base):
    __tablename__ = "message_recipients"
    __table_args__ = (
        # A worker claims the queued rows of its batch.
        Index("ix_message_recipients_claim", "message_id", "batch_no", "status"),
        # The recipients list, filtered by status, in id order.
        Index("ix_message_recipients_list", "message_id", "status", "id"),
        # … and unfiltered, in id order (no sort of the whole broadcast per page).
        Index("ix_message_recipients_message_id", "message_id", "id"),
        # `sent` rows still waiting for a final receipt (the reconciler looks them up).
        Index(
            "ix_message_recipients_unsettled",
            "sent_at",
            postgresql_where=text("status = 'sent' AND finalized_at IS NULL"),
        ),
        # Receipts find their recipient by Telnyx's message id.
        Index(
            "ix_message_recipients_provider_id",
            "provider_message_id",
            postgresql_where=text("provider_message_id IS NOT NULL"),
        ),
        # The reconciler finds sends that are in doubt.
        Index(
            "ix_message_recipients_in_doubt",
            "claimed_at",
            postgresql_where=text("status = 'sending'"),
        ),
        CheckConstraint(
            "status IN ('queued', 'sending', 'sent', 'delivered', 'failed', 'undelivered', "
            "'skipped', 'unconfirmed')",
            name="status",
        ),
        {"postgresql_partition_by": "RANGE (created_at)"},
    )

    id: Mapped[int] = mapped_column(
        BigInteger, recipient_id_seq, server_default=recipient_id_seq.next_value(), primary_key=True
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    church_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    message_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    member_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    batch_no: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(11))
    skip_reason: Mapped[str | None] = mapped_column(String(20))
    segments: Mapped[int] = mapped_column(SmallInteger)  # reserved, then Telnyx's `parts`
    attempts: Mapped[int] = mapped_column(SmallInteger, server_default="0")
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    in_doubt_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    provider_message_id: Mapped[str | None] = mapped_column(String(64))
    error_code: Mapped[str | None] = mapped_column(String(20))
    error_detail: Mapped[str | None] = mapped_column(String(300))
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finalized_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class SenderPause(Base):
    """Sending stopped by the provider's refusal of a whole scope: the account (a rotated
    key, a disabled profile, a spend limit) or one sending number (spam-blocked, campaign
    rejected). Work waits; nobody is failed, refunded or dead-lettered for it."""

    __tablename__ = "sender_pauses"
    __table_args__ = (CheckConstraint("scope IN ('account', 'number')", name="scope"),)

    scope: Mapped[str] = mapped_column(String(10), primary_key=True)
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    reason: Mapped[str] = mapped_column(String(200))
    error_code: Mapped[str | None] = mapped_column(String(20))
    paused_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    next_probe_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    probes: Mapped[int] = mapped_column(Integer, server_default="0")
