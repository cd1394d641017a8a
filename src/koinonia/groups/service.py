"""Group rules: names unique per church, bulk membership in one statement, cached counts."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.cache import Cache, CachePolicy, group_counts_tag, invalidate_on_commit
from koinonia.db import Database
from koinonia.errors import FieldError, ValidationError
from koinonia.groups.tables import Group, GroupMember

COUNTS = CachePolicy("group_counts", ttl=300, stale_ttl=0)


def counts_tag(church_id: uuid.UUID) -> str:
    return group_counts_tag(church_id)


async def member_counts(database: Database, cache: Cache, church_id: uuid.UUID) -> dict[str, int]:
    """Member count of every group of the church; cached until membership changes.

    Loaded in a session of its own on the primary: a background refresh outlives the
    request, and a lagging replica would cache old counts for the whole TTL."""

    async def load() -> dict[str, int]:
        async with database.sessions() as session:
            return await _load_counts(session, church_id)

    return await cache.get_or_load(COUNTS, str(church_id), load, tags=[counts_tag(church_id)])


async def _load_counts(session: AsyncSession, church_id: uuid.UUID) -> dict[str, int]:
    rows = await session.execute(
        select(GroupMember.group_id, func.count())
        .join(Group, Group.id == GroupMember.group_id)
        .where(Group.church_id == church_id)
        .group_by(GroupMember.group_id)
    )
    return {str(group_id): int(count) for group_id, count in rows}


async def count_members(session: AsyncSession, group_id: uuid.UUID) -> int:
    return int(
        await session.scalar(
            select(func.count()).select_from(GroupMember).where(GroupMember.group_id == group_id)
        )
        or 0
    )


# One statement validates every id (live members of this church) and inserts all of
# them, or none when any id is unknown. Idempotent: repeated ids change nothing.
_ADD = text("""
WITH wanted AS (SELECT DISTINCT unnest(CAST(:ids AS uuid[])) AS id),
valid AS (
    SELECT m.id FROM members m JOIN wanted w ON w.id = m.id
    WHERE m.church_id = :church_id AND m.deleted_at IS NULL
),
added AS (
    INSERT INTO group_members (group_id, member_id)
    SELECT :group_id, id FROM valid
    WHERE (SELECT count(*) FROM valid) = (SELECT count(*) FROM wanted)
    ON CONFLICT DO NOTHING
    RETURNING member_id
)
SELECT (SELECT count(*) FROM added),
       ARRAY(SELECT id FROM wanted EXCEPT SELECT id FROM valid)
""")
_REMOVE = text("""
DELETE FROM group_members gm
USING members m
WHERE gm.group_id = :group_id AND gm.member_id = ANY(CAST(:ids AS uuid[]))
  AND m.id = gm.member_id AND m.church_id = :church_id
""")


async def add_members(
    session: AsyncSession, church_id: uuid.UUID, group_id: uuid.UUID, ids: list[uuid.UUID]
) -> int:
    params: dict[str, Any] = {"ids": ids, "church_id": church_id, "group_id": group_id}
    added, unknown = (await session.execute(_ADD, params)).one()
    if unknown:
        raise ValidationError(
            "Some member ids are not members of this church; nothing was added",
            errors=[FieldError("member_ids", f"no such member: {m}") for m in unknown[:100]],
        )
    if added:
        invalidate_on_commit(session, counts_tag(church_id))
    return int(added)


async def remove_members(
    session: AsyncSession, church_id: uuid.UUID, group_id: uuid.UUID, ids: list[uuid.UUID]
) -> int:
    params: dict[str, Any] = {"ids": ids, "church_id": church_id, "group_id": group_id}
    result = await session.execute(_REMOVE, params)
    removed = int(result.rowcount or 0)  # type: ignore[attr-defined]
    if removed:
        invalidate_on_commit(session, counts_tag(church_id))
    return removed
