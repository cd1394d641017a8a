"""Church scoping: every tenant query goes through these helpers.

Another church's row is indistinguishable from a missing one (404, never 403).
"""

from __future__ import annotations

import uuid
from typing import Any, TypeVar

from sqlalchemy import Select
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.errors import NotFoundError

T = TypeVar("T")


def scoped(statement: Select[Any], model: Any, church_id: uuid.UUID) -> Select[Any]:
    return statement.where(model.church_id == church_id)


async def get_owned(
    session: AsyncSession,
    model: type[T],
    object_id: uuid.UUID | str,
    church_id: uuid.UUID,
    *,
    what: str | None = None,
    for_update: bool = False,
) -> T:
    try:
        key = object_id if isinstance(object_id, uuid.UUID) else uuid.UUID(str(object_id))
    except ValueError:
        raise NotFoundError(f"No such {what or model.__name__.lower()}") from None
    row = await session.get(model, key, with_for_update=for_update)
    if row is None or getattr(row, "church_id", None) != church_id:
        raise NotFoundError(f"No such {what or model.__name__.lower()}")
    return row
