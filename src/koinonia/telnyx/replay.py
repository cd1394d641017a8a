"""Replaying a Telnyx event that failed to apply (`webhook.telnyx`): it becomes pending
again and the event loop applies it (receipts never move a status backwards, so an event
applied in the meantime changes nothing twice)."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.deadletters.registry import ReplayContext, replayer
from koinonia.deadletters.tables import DeadLetter
from koinonia.errors import ConflictError


@replayer("webhook.telnyx")
async def replay_event(session: AsyncSession, context: ReplayContext, entry: DeadLetter) -> None:
    del context
    reopened = await session.execute(
        text(
            "UPDATE webhook_events SET processed_at = NULL, attempts = 0, last_error = NULL, "
            "next_attempt_at = NULL "
            "WHERE id = :id AND provider = 'telnyx' RETURNING id"
        ),
        {"id": int(entry.payload["webhook_event_id"])},
    )
    if reopened.scalar() is None:
        raise ConflictError("the event is no longer stored")
