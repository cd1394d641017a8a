"""Replaying a dead-lettered broadcast send (`sms.send`): the recipient goes back to the
queue with fresh attempts, its segments are reserved again, and its batch is deferred.

An `unconfirmed` entry (sent, then no answer and no receipt) may already have reached
the phone; replaying it is the operator's explicit decision to risk a second text.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.billing import ledger
from koinonia.deadletters import service as dead_letters
from koinonia.deadletters.registry import ReplayContext, replayer
from koinonia.deadletters.tables import DeadLetter
from koinonia.errors import ConflictError
from koinonia.messaging.broadcasts import defer_batch_of
from koinonia.messaging.counters import apply_transitions
from koinonia.messaging.tables import Message


async def record_failed_send(
    session: AsyncSession,
    *,
    church_id: uuid.UUID,
    message_id: uuid.UUID,
    created_at: datetime,
    recipient_id: int,
    error: str,
    error_code: str | None,
    attempts: int,
) -> None:
    """Dead-letter one broadcast recipient (what `replay_send` reads back)."""
    await dead_letters.record(
        session,
        kind="sms.send",
        church_id=church_id,
        payload={
            "message_id": str(message_id),
            "created_at": created_at.isoformat(),
            "recipient_id": recipient_id,
        },
        error=error,
        error_code=error_code,
        attempts=attempts,
    )


@replayer("sms.send")
async def replay_send(session: AsyncSession, context: ReplayContext, entry: DeadLetter) -> None:
    message_id = uuid.UUID(entry.payload["message_id"])
    created_at = datetime.fromisoformat(entry.payload["created_at"])
    message = await session.get(Message, message_id, with_for_update=True)
    if message is None or message.church_id != entry.church_id:
        raise ConflictError("the broadcast no longer exists")
    if message.status == "cancelled":
        raise ConflictError("the broadcast was cancelled")
    requeued = await session.execute(
        text(
            "UPDATE message_recipients SET status = 'queued', attempts = 0, "
            "segments = :segments, error_code = NULL, error_detail = NULL, "
            "next_attempt_at = NULL, in_doubt_since = NULL, claimed_at = NULL, "
            "finalized_at = NULL, updated_at = now() "
            "WHERE id = :id AND created_at = :created AND message_id = :message "
            "AND status = 'failed' RETURNING batch_no"
        ),
        {
            "segments": message.segments,
            "id": int(entry.payload["recipient_id"]),
            "created": created_at,
            "message": message_id,
        },
    )
    batch_no = requeued.scalar()
    if batch_no is None:
        raise ConflictError("the recipient is no longer failed")
    # The failure gave its segments back; sending again needs them again (402 if the
    # allowance is spent, which rolls this replay back).
    await ledger.debit_in(
        session,
        context.settings,
        message.church_id,
        message.segments,
        f"message:{message_id}:replay:{entry.id}",
    )
    await session.execute(
        text(
            "UPDATE messages SET status = 'sending', completed_at = NULL, "
            "segments_reserved = segments_reserved + :segments, updated_at = now() "
            "WHERE id = :id"
        ),
        {"segments": message.segments, "id": message_id},
    )
    await apply_transitions(session, [(message_id, "failed", "queued", 1)])
    await defer_batch_of(
        context.job_app, session, message_id, created_at, message.church_id, int(batch_no)
    )
