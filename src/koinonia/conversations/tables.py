"""Tables of the inbox. `conversation_messages` is partitioned by month on `created_at`."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    Sequence,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import Mapped, mapped_column

from koinonia.db import Base

CONVERSATION_STATUSES = ("open", "closed", "archived")
conversation_message_id_seq = Sequence("conversation_messages_id_seq", metadata=Base.metadata)


class Conversation(Base):
    __tablename__ = "conversations"
    __table_args__ = (
        UniqueConstraint("church_id", "member_id"),
        # The inbox: newest activity first, per church.
        Index("ix_conversations_inbox", "church_id", "last_message_at", "id"),
        CheckConstraint("status IN ('open', 'closed', 'archived')", name="status"),
        CheckConstraint("unread_count >= 0", name="unread_count"),
    )

    id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), primary_key=True, server_default=text("gen_random_uuid()")
    )
    church_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("churches.id", ondelete="CASCADE"))
    member_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("members.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(10), server_default="open")
    unread_count: Mapped[int] = mapped_column(Integer, server_default="0")
    last_message_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    last_message_preview: Mapped[str | None] = mapped_column(String(160))
    last_message_direction: Mapped[str | None] = mapped_column(String(8))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ConversationMessage(Base):
    __tablename__ = "conversation_messages"
    __table_args__ = (
        Index("ix_conversation_messages_thread", "conversation_id", "created_at", "id"),
        Index(
            "ix_conversation_messages_provider_id",
            "provider_message_id",
            postgresql_where=text("provider_message_id IS NOT NULL"),
        ),
        CheckConstraint("direction IN ('inbound', 'outbound')", name="direction"),
        {"postgresql_partition_by": "RANGE (created_at)"},
    )

    id: Mapped[int] = mapped_column(
        BigInteger,
        conversation_message_id_seq,
        server_default=conversation_message_id_seq.next_value(),
        primary_key=True,
    )
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), primary_key=True, server_default=func.now()
    )
    church_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    conversation_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    direction: Mapped[str] = mapped_column(String(8))
    body: Mapped[str] = mapped_column(Text)
    # inbound: received; outbound: queued → sending → sent → delivered | failed | undelivered
    status: Mapped[str] = mapped_column(String(11))
    # reply (staff), auto (opt-out / help confirmations)
    kind: Mapped[str] = mapped_column(String(10), server_default="reply")
    author_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    segments: Mapped[int] = mapped_column(SmallInteger, server_default="1")
    attempts: Mapped[int] = mapped_column(SmallInteger, server_default="0")
    provider_message_id: Mapped[str | None] = mapped_column(String(64))
    error_code: Mapped[str | None] = mapped_column(String(20))
    error_detail: Mapped[str | None] = mapped_column(String(300))
    in_doubt_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
