"""Who is calling: a staff user (access token) or an API key, always within one church."""

from __future__ import annotations

import uuid
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Principal:
    church_id: uuid.UUID
    role: str  # owner | admin | staff
    user_id: uuid.UUID | None = None
    api_key_id: uuid.UUID | None = None
    is_operator: bool = False
    # The user's `auth_version` the access token was issued with (see revocation.py).
    auth_version: int = 0
    # The user an API key acts for (its creator); the key never has more rights than they.
    key_creator_id: uuid.UUID | None = None

    @property
    def actor_id(self) -> uuid.UUID | None:
        return self.user_id or self.api_key_id

    @property
    def actor_kind(self) -> str:
        return "user" if self.user_id else "api_key"

    @property
    def rate_limit_key(self) -> str:
        return f"user:{self.user_id}" if self.user_id else f"key:{self.api_key_id}"
