"""Refresh tokens: opaque, stored hashed, rotated on every use.

Each login starts a family; refreshing marks the presented token used and issues the
next one in the family. Presenting a token that was already used means it was copied:
the whole family is revoked, so the thief and the user both have to log in again.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.accounts.tables import RefreshToken, User


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True, slots=True)
class Rotation:
    user: User | None
    token: str | None
    reused: bool = False


async def issue(
    session: AsyncSession,
    user: User,
    ttl_seconds: int,
    family_id: uuid.UUID | None = None,
) -> str:
    token = secrets.token_urlsafe(48)
    session.add(
        RefreshToken(
            user_id=user.id,
            church_id=user.church_id,
            family_id=family_id or uuid.uuid4(),
            token_hash=_hash(token),
            expires_at=datetime.now(UTC) + timedelta(seconds=ttl_seconds),
        )
    )
    await session.flush()
    return token


async def rotate(session: AsyncSession, token: str, ttl_seconds: int) -> Rotation:
    """Use `token` once. On reuse the family is revoked (the caller must commit that)."""
    row = (
        await session.execute(
            select(RefreshToken).where(RefreshToken.token_hash == _hash(token)).with_for_update()
        )
    ).scalar_one_or_none()
    now = datetime.now(UTC)
    if row is None:
        return Rotation(None, None)
    if row.used_at is not None or row.revoked_at is not None:
        await revoke_family(session, row.family_id)
        return Rotation(None, None, reused=row.used_at is not None)
    if row.expires_at <= now:
        return Rotation(None, None)
    user = await session.get(User, row.user_id)
    if user is None or not user.is_active:
        await revoke_family(session, row.family_id)
        return Rotation(None, None)
    row.used_at = now
    return Rotation(user, await issue(session, user, ttl_seconds, row.family_id))


async def revoke_family(session: AsyncSession, family_id: uuid.UUID) -> None:
    await session.execute(
        update(RefreshToken)
        .where(RefreshToken.family_id == family_id, RefreshToken.revoked_at.is_(None))
        .values(revoked_at=datetime.now(UTC))
    )


async def revoke_token_family(session: AsyncSession, token: str, user_id: uuid.UUID) -> bool:
    row = (
        await session.execute(
            select(RefreshToken).where(
                RefreshToken.token_hash == _hash(token), RefreshToken.user_id == user_id
            )
        )
    ).scalar_one_or_none()
    if row is None:
        return False
    await revoke_family(session, row.family_id)
    return True


async def revoke_user(session: AsyncSession, user_id: uuid.UUID) -> None:
    await session.execute(
        update(RefreshToken)
        .where(RefreshToken.user_id == user_id, RefreshToken.revoked_at.is_(None))
        .values(revoked_at=datetime.now(UTC))
    )
