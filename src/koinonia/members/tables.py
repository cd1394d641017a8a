"""Tables of the members feature."""

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
    Identity,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from koinonia.db import Base

OPT_OUT_SOURCES = ("keyword", "api", "import", "provider")
# What changed a member's consent (`member_consent_events.source`): the opt-out sources,
# `renormalize` (an opt-out copied between phone twins) and `erase` (the state an erased
# member keeps as a suppression).
CONSENT_SOURCES = (*OPT_OUT_SOURCES, "renormalize", "erase")


class Member(Base):
    __tablename__ = "members"
    __table_args__ = (
        # The blind index de-duplicates phones per church (deleted rows included: a member
        # added again is revived, keeping their opt-out).
        UniqueConstraint("church_id", "phone_hash"),
        Index(
            "ix_members_church_email_hash",
            "church_id",
            "email_hash",
            postgresql_where=text("email_hash IS NOT NULL"),
        ),
        # Pagination order; name search filters one church's rows (a trigram index would
        # cost imports ~40 % more for a search that touches a few thousand rows).
        Index("ix_members_church_created", "church_id", "created_at", "id"),
        Index("ix_members_review", "church_id", postgresql_where=text("review_reason IS NOT NULL")),
        CheckConstraint(
            "opted_out_source IS NULL OR opted_out_source IN "
            "('keyword', 'api', 'import', 'provider')",
            name="opted_out_source",
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True),
        primary_key=True,
        server_default=text("gen_random_uuid()"),
        default=uuid.uuid4,
    )
    church_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("churches.id", ondelete="CASCADE"))
    first_name: Mapped[str] = mapped_column(String(100), server_default="")
    last_name: Mapped[str] = mapped_column(String(100), server_default="")
    phone_ct: Mapped[bytes] = mapped_column(LargeBinary)
    phone_hash: Mapped[bytes] = mapped_column(LargeBinary)
    email_ct: Mapped[bytes | None] = mapped_column(LargeBinary)
    email_hash: Mapped[bytes | None] = mapped_column(LargeBinary)
    opted_out: Mapped[bool] = mapped_column(Boolean, server_default="false")
    opted_out_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    opted_out_source: Mapped[str | None] = mapped_column(String(10))
    # Someone who texted the church without being in its list.
    is_unknown: Mapped[bool] = mapped_column(Boolean, server_default="false")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Set by `koinonia members renormalize-phones`: "duplicate_phone" when, once made
    # E.164, the phone is another member's (`duplicate_of`); see docs/members.md.
    review_reason: Mapped[str | None] = mapped_column(Text)
    duplicate_of: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("members.id", ondelete="SET NULL")
    )
    # Set by `POST /members/{id}/erase` (members/rights.py): the row is a tombstone with no
    # name, phone or email; an opted-out one keeps its blind index so the phone stays
    # suppressed. A tombstone is also `deleted_at`.
    erased_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ConsentEvent(Base):
    """One change of a member's consent to be texted: the consent history."""

    __tablename__ = "member_consent_events"
    __table_args__ = (
        Index("ix_member_consent_events_member", "member_id", "at", "id"),
        CheckConstraint(
            "source IN ('keyword', 'api', 'import', 'provider', 'renormalize', 'erase')",
            name="source",
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    church_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("churches.id", ondelete="CASCADE"))
    member_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("members.id", ondelete="CASCADE"))
    opted_out: Mapped[bool] = mapped_column(Boolean)  # the state after the change
    source: Mapped[str] = mapped_column(String(12))
    actor_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))  # staff / API key
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class MemberImport(Base):
    __tablename__ = "member_imports"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'running', 'completed', 'failed')", name="status"),
        CheckConstraint("on_duplicate IN ('update', 'skip')", name="on_duplicate"),
    )

    id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True),
        primary_key=True,
        server_default=text("gen_random_uuid()"),
        default=uuid.uuid4,
    )
    church_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("churches.id", ondelete="CASCADE"), index=True
    )
    created_by: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    filename: Mapped[str] = mapped_column(String(255), server_default="")
    size_bytes: Mapped[int] = mapped_column(BigInteger, server_default="0")
    on_duplicate: Mapped[str] = mapped_column(String(6), server_default="update")
    group_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    column_map: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default="{}")
    status: Mapped[str] = mapped_column(String(10), server_default="pending")
    processed: Mapped[int] = mapped_column(Integer, server_default="0")
    created: Mapped[int] = mapped_column(Integer, server_default="0")
    updated: Mapped[int] = mapped_column(Integer, server_default="0")
    skipped: Mapped[int] = mapped_column(Integer, server_default="0")
    error_count: Mapped[int] = mapped_column(Integer, server_default="0")
    errors: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, server_default="[]")
    failure: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class MemberImportFile(Base):
    """The uploaded CSV of an import run as a job, until the job has read it."""

    __tablename__ = "member_import_files"

    import_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("member_imports.id", ondelete="CASCADE"), primary_key=True
    )
    content: Mapped[bytes] = mapped_column(LargeBinary)
