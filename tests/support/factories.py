"""Test data written straight to the database (features' own tests use their APIs)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.accounts.tables import Church, User
from koinonia.accounts.tokens import issue_access_token
from koinonia.settings import Settings


@dataclass(frozen=True)
class Tenant:
    church_id: uuid.UUID
    user_id: uuid.UUID
    token: str
    role: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


async def create_tenant(
    session: AsyncSession,
    settings: Settings,
    *,
    role: str = "owner",
    church_name: str | None = None,
    phone_number: str | None = None,
    church_id: uuid.UUID | None = None,
    is_operator: bool = False,
) -> Tenant:
    """A church (or a new user in `church_id`) and an access token for that user."""
    if church_id is None:
        church = Church(
            name=church_name or f"Church {uuid.uuid4().hex[:6]}", phone_number=phone_number
        )
        session.add(church)
        await session.flush()
        church_id = church.id
    user = User(
        church_id=church_id,
        email=f"{uuid.uuid4().hex[:12]}@example.org",
        name="Test User",
        password_hash="!unusable",
        role=role,
        is_operator=is_operator,
    )
    session.add(user)
    await session.flush()
    token = issue_access_token(
        settings, user_id=user.id, church_id=church_id, role=role, is_operator=is_operator
    )
    return Tenant(church_id, user.id, token, role)
