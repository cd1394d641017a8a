"""Replaying a dead-lettered inbox text (`sms.reply`): queued again with fresh attempts
and its send job deferred with the inbox's priority."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.billing import ledger
from koinonia.conversations.service import (
    REPLY_PRIORITY,
    REPLY_QUEUE,
    REPLY_TASK,
    reply_debit_reference,
)
from koinonia.deadletters.registry import ReplayContext, replayer
from koinonia.deadletters.tables import DeadLetter
from koinonia.errors import ConflictError
from koinonia.jobs import defer_in_transaction


@replayer("sms.reply")
async def replay_reply(session: AsyncSession, context: ReplayContext, entry: DeadLetter) -> None:
    message_id = int(entry.payload["message_id"])
    created_at = datetime.fromisoformat(entry.payload["created_at"])
    requeued = await session.execute(
        text(
            "UPDATE conversation_messages SET status = 'queued', attempts = 0, "
            "error_code = NULL, error_detail = NULL, in_doubt_since = NULL, updated_at = now() "
            "WHERE id = :id AND created_at = :created AND church_id = :church "
            "AND status = 'failed' RETURNING id, kind, segments"
        ),
        {"id": message_id, "created": created_at, "church": entry.church_id},
    )
    row = requeued.first()
    if row is None:
        raise ConflictError("the text is no longer failed")
    if row.kind == "reply" and entry.church_id is not None:
        # Its failure gave the segments back; sending again needs them again (402 rolls
        # the replay back).
        await ledger.debit_in(
            session,
            context.settings,
            entry.church_id,
            int(row.segments),
            f"{reply_debit_reference(message_id, created_at)}:replay:{entry.id}",
        )
    await defer_in_transaction(
        context.job_app,
        session,
        REPLY_TASK,
        queue=REPLY_QUEUE,
        priority=REPLY_PRIORITY,
        message_id=message_id,
        created_at=created_at.isoformat(),
    )
