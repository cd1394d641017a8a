"""The consent history: every change of a member's opt-out state, with its time and source.

Each place that changes `members.opted_out` records the change here in the same
transaction: staff through the API (`api`, with the user or API key), an inbound keyword
(`keyword`), the provider refusing a send with 40300 (`provider`),
`members renormalize-phones` copying an opt-out between phone twins (`renormalize`) and an
erasure keeping the opt-out (`erase`). The rows hold no phone, name or text.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.cache import inbox_tag, invalidate_on_commit
from koinonia.members.tables import ConsentEvent, Member


def record(
    session: AsyncSession,
    member: Member,
    *,
    source: str,
    actor_id: uuid.UUID | None = None,
    at: datetime | None = None,
) -> None:
    """The member's current state, as changed by `source` (the member has an id)."""
    invalidate_on_commit(session, inbox_tag(member.church_id))  # the inbox shows opt-outs
    session.add(
        ConsentEvent(
            church_id=member.church_id,
            member_id=member.id,
            opted_out=member.opted_out,
            source=source,
            actor_id=actor_id,
            at=at or (member.opted_out_at if member.opted_out else None) or datetime.now(UTC),
        )
    )


async def opt_out_members(
    session: AsyncSession, member_ids: Sequence[uuid.UUID], *, source: str
) -> None:
    """Opt these members out (those not opted out already), with one history event each:
    one statement."""
    if not member_ids:
        return
    changed = await session.execute(
        text(
            "WITH changed AS ("
            " UPDATE members SET opted_out = true, opted_out_at = now(),"
            " opted_out_source = :source, updated_at = now()"
            " WHERE id = ANY(:ids) AND NOT opted_out"
            " RETURNING id, church_id, opted_out_at) "
            "INSERT INTO member_consent_events (church_id, member_id, opted_out, source, at) "
            "SELECT church_id, id, true, :source, opted_out_at FROM changed "
            "RETURNING church_id"
        ),
        {"ids": list(member_ids), "source": source},
    )
    churches = {church_id for (church_id,) in changed}
    invalidate_on_commit(session, *(inbox_tag(church_id) for church_id in churches))
