"""A broadcast's counters follow its recipients' status changes.

Every bulk status change returns (message, old status, new status, rows); the counters
move by those deltas in one statement per broadcast, so a 100,000-recipient broadcast
is never re-counted, and `completed` is set when nothing is queued or in flight.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

COUNTER_OF = {
    "queued": "queued_count",
    "sending": "queued_count",  # in flight still counts as queued for clients
    "sent": "sent_count",
    "delivered": "delivered_count",
    "failed": "failed_count",
    "undelivered": "failed_count",
    "skipped": "skipped_count",
    "unconfirmed": "sent_count",  # Telnyx had it; no final state ever came
}
COUNTERS = ("queued_count", "sent_count", "delivered_count", "failed_count", "skipped_count")

# Order of recipient states: a receipt or a result only ever moves a row forward.
# `unconfirmed` ranks with `sent`: a late final receipt still settles it.
RANK_SQL = (
    "CASE {col} WHEN 'queued' THEN 0 WHEN 'sending' THEN 1 WHEN 'sent' THEN 2 "
    "WHEN 'unconfirmed' THEN 2 ELSE 3 END"
)

Transition = tuple[uuid.UUID, str, str, int]  # message id, old status, new status, rows


async def apply_transitions(session: AsyncSession, transitions: Iterable[Transition]) -> None:
    deltas: dict[uuid.UUID, dict[str, int]] = defaultdict(lambda: dict.fromkeys(COUNTERS, 0))
    for message_id, old, new, rows in transitions:
        before, after = COUNTER_OF[old], COUNTER_OF[new]
        if before != after:
            deltas[message_id][before] -= rows
            deltas[message_id][after] += rows
    # Always in id order: two transactions touching the same broadcasts cannot deadlock.
    for message_id, delta in sorted(deltas.items()):
        if not any(delta.values()):
            continue
        assignments = ", ".join(f"{c} = {c} + :{c}" for c in COUNTERS)
        await session.execute(
            text(f"UPDATE messages SET {assignments}, updated_at = now() WHERE id = :id"),  # noqa: S608 - fixed column names
            {"id": message_id, **delta},
        )
    await complete_finished(session, list(deltas))


async def complete_finished(session: AsyncSession, message_ids: list[uuid.UUID]) -> None:
    if not message_ids:
        return
    await session.execute(
        text(
            "UPDATE messages SET status = 'completed', completed_at = now(), updated_at = now() "
            "WHERE id = ANY(:ids) AND status IN ('queued', 'sending') AND queued_count = 0"
        ),
        {"ids": message_ids},
    )
