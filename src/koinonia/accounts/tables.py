"""Tables of the accounts feature."""

from __future__ import annotations

import uuid
from datetime import datetime, time

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    String,
    Text,
    Time,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import Mapped, mapped_column

from koinonia.db import Base

ROLES = ("owner", "admin", "staff")


def _uuid_pk() -> Mapped[uuid.UUID]:
    return mapped_column(
        UUID(as_uuid=True),
        primary_key=True,
        default=uuid.uuid4,
        server_default=text("gen_random_uuid()"),
    )


def _created_at() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now())


class Church(Base):
    __tablename__ = "churches"

    id: Mapped[uuid.UUID] = _uuid_pk()
    name: Mapped[str] = mapped_column(String(200))
    timezone: Mapped[str] = mapped_column(String(64), server_default="America/New_York")
    default_region: Mapped[str] = mapped_column(String(2), server_default="US")
    # Sending number (E.164); unique because inbound SMS are routed by it.
    phone_number: Mapped[str | None] = mapped_column(String(16), unique=True)
    number_status: Mapped[str] = mapped_column(String(20), server_default="pending")
    number_order_id: Mapped[str | None] = mapped_column(String(64))
    messaging_profile_id: Mapped[str | None] = mapped_column(String(64))
    help_text: Mapped[str | None] = mapped_column(String(320))
    # Local hours (in `timezone`) in which broadcasts may go out: [start, end), wrapping
    # midnight when start > end, always open when equal (see messaging/window.py).
    send_window_start: Mapped[time] = mapped_column(Time, server_default="08:00")
    send_window_end: Mapped[time] = mapped_column(Time, server_default="20:00")
    plan: Mapped[str] = mapped_column(String(40), server_default="trial")
    subscription_status: Mapped[str] = mapped_column(String(30), server_default="trialing")
    stripe_customer_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    # Staff without MFA must enrol before they get tokens (accounts/mfa.py); keys unaffected.
    require_mfa: Mapped[bool] = mapped_column(Boolean, server_default="false")
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class User(Base):
    __tablename__ = "users"
    __table_args__ = (
        CheckConstraint("role IN ('owner', 'admin', 'staff')", name="role"),
        # Emails log in without naming a church, so they are unique across the platform.
        Index("uq_users_email", func.lower(text("email")), unique=True),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    church_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("churches.id", ondelete="CASCADE"), index=True
    )
    email: Mapped[str] = mapped_column(String(254))
    name: Mapped[str] = mapped_column(String(200))
    password_hash: Mapped[str] = mapped_column(Text)
    role: Mapped[str] = mapped_column(String(10))
    is_operator: Mapped[bool] = mapped_column(Boolean, server_default="false")
    is_active: Mapped[bool] = mapped_column(Boolean, server_default="true")
    # Raised by every change that must end the user's access tokens at once (delete,
    # deactivate, role or password change); tokens carry it, see accounts/revocation.py.
    auth_version: Mapped[int] = mapped_column(BigInteger, server_default="0")
    # TOTP (accounts/mfa.py): the secret AES-GCM encrypted with the member key ring, on
    # once `mfa_enabled_at` is set (a secret without it is an unconfirmed enrolment), and
    # the last time step accepted (each code works once).
    mfa_secret: Mapped[bytes | None] = mapped_column()
    mfa_enabled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    mfa_last_step: Mapped[int | None] = mapped_column(BigInteger)
    last_login_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _created_at()

    @property
    def mfa_enabled(self) -> bool:
        return self.mfa_enabled_at is not None


class MfaRecoveryCode(Base):
    """Single-use recovery codes, stored as a keyed hash (accounts/mfa.py)."""

    __tablename__ = "mfa_recovery_codes"
    __table_args__ = (UniqueConstraint("user_id", "code_hash"),)

    id: Mapped[uuid.UUID] = _uuid_pk()
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    code_hash: Mapped[bytes] = mapped_column()
    used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _created_at()


class ApiKey(Base):
    __tablename__ = "api_keys"
    __table_args__ = (CheckConstraint("role IN ('admin', 'staff')", name="role"),)

    id: Mapped[uuid.UUID] = _uuid_pk()
    church_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("churches.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(16), unique=True)  # public, shown in lists
    key_hash: Mapped[bytes] = mapped_column()  # SHA-256 of the whole (high-entropy) key
    role: Mapped[str] = mapped_column(String(10), server_default="admin")
    created_by: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _created_at()


class RefreshToken(Base):
    __tablename__ = "refresh_tokens"

    id: Mapped[uuid.UUID] = _uuid_pk()
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    church_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("churches.id", ondelete="CASCADE"))
    family_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), index=True)
    token_hash: Mapped[bytes] = mapped_column(unique=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _created_at()
