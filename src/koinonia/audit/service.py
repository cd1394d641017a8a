"""Writing audit entries inside the caller's unit of work."""

from __future__ import annotations

import uuid
from typing import Any

from asgi_correlation_id import correlation_id
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.audit.tables import AuditEntry


def record(
    session: AsyncSession,
    *,
    action: str,
    church_id: uuid.UUID | None,
    actor_id: uuid.UUID | None,
    actor_kind: str = "user",
    target_type: str | None = None,
    target_id: object | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    session.add(
        AuditEntry(
            church_id=church_id,
            actor_id=actor_id,
            actor_kind=actor_kind,
            action=action,
            target_type=target_type,
            target_id=str(target_id) if target_id is not None else None,
            details=details or {},
            request_id=correlation_id.get(),
        )
    )
