"""Sending one inbox text: the broadcast path's client, breaker, number rate and retry
rules, on a job of higher priority than any broadcast batch."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from procrastinate import App
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.accounts.tables import Church
from koinonia.billing import ledger
from koinonia.conversations.service import REPLY_PRIORITY, REPLY_QUEUE, REPLY_TASK, reply_debit
from koinonia.conversations.tables import ConversationMessage
from koinonia.db import Database
from koinonia.deadletters import service as dead_letters
from koinonia.jobs import defer
from koinonia.members import consent
from koinonia.members.tables import Member
from koinonia.messaging import refs, suppressions
from koinonia.messaging.billing import note_excess
from koinonia.messaging.delivery import Result, SendContext, attempt, report_to_breaker


async def defer_again(job_app: App, message_id: int, created_at: datetime, seconds: float) -> None:
    await defer(
        job_app,
        REPLY_TASK,
        queue=REPLY_QUEUE,
        priority=REPLY_PRIORITY,
        schedule_in_seconds=seconds,
        message_id=message_id,
        created_at=created_at.isoformat(),
    )


async def run_reply(
    context: SendContext,
    database: Database,
    job_app: App,
    message_id: int,
    created_at: datetime,
) -> str:
    async with database.unit_of_work() as session:
        message = await session.get(ConversationMessage, (message_id, created_at))
        if message is None or message.status != "queued":
            return "nothing_to_do"
        church = await session.get_one(Church, message.church_id)
        member = await session.scalar(
            text("SELECT member_id FROM conversations WHERE id = :id").bindparams(
                id=message.conversation_id
            )
        )
        person = await session.get_one(Member, member)
        phone = context.cipher.decrypt(person.phone_ct, church.id)
        stopped = bool(
            church.phone_number
            and message.kind == "reply"
            and await suppressions.suppressed(
                session, context.settings, church.phone_number, [phone]
            )
        )
    sender = church.phone_number
    if sender is None:
        return "no_number"
    # Compliance confirmations (`auto`) go even to a phone that just texted STOP.
    # An erased member (members/rights.py) has no phone left: nothing can go to them.
    if not phone or (message.kind == "reply" and (person.opted_out or stopped)):
        code = "member_opted_out" if phone else "member_erased"
        await _finish(database, message, Result(message_id, "failed", error_code=code))
        return "opted_out"
    breaker = await context.breaker.allow()
    if breaker.state == "open":
        await defer_again(job_app, message_id, created_at, breaker.retry_after)
        return "circuit_open"
    granted, wait = await context.throughput.take(sender, 1, bulk=False, segments=message.segments)
    if not granted:
        await defer_again(job_app, message_id, created_at, wait)
        return "rate_limited"
    async with database.unit_of_work() as session:
        claimed = await session.execute(
            text(
                "UPDATE conversation_messages SET status = 'sending', attempts = attempts + 1, "
                "updated_at = now() WHERE id = :id AND created_at = :created "
                "AND status = 'queued' RETURNING attempts"
            ),
            {"id": message_id, "created": created_at},
        )
        attempts = claimed.scalar()
    if attempts is None:
        return "taken"
    result = await attempt(
        context,
        kind="reply",
        row_id=message_id,
        attempts=int(attempts),
        sender=sender,
        to=phone,
        text=message.body,
        ref=refs.RowRef("c", message_id, created_at),
        messaging_profile_id=church.messaging_profile_id,
    )
    await report_to_breaker(context, [result])
    await _finish(database, message, result, member_id=person.id)
    if result.status == "queued" and result.next_attempt_at is not None:
        await defer_again(
            job_app,
            message_id,
            created_at,
            (result.next_attempt_at - datetime.now(UTC)).total_seconds(),
        )
    return result.status


async def _finish(
    database: Database,
    message: ConversationMessage,
    result: Result,
    member_id: object | None = None,
) -> None:
    status = {"skipped": "failed"}.get(result.status, result.status)
    async with database.unit_of_work() as session:
        await session.execute(
            text(
                "UPDATE conversation_messages SET status = :status, "
                "provider_message_id = coalesce(:provider_id, provider_message_id), "
                "segments = least(coalesce(:parts, segments), segments), error_code = :code, "
                "error_detail = :detail, "
                "in_doubt_since = CASE WHEN :doubt THEN now() END, updated_at = now() "
                "WHERE id = :id AND created_at = :created "
                "AND status IN ('queued', 'sending')"
            ),
            {
                "status": status,
                "provider_id": result.provider_id,
                "parts": result.parts,
                "code": result.error_code or result.skip_reason,
                "detail": result.error_detail,
                "doubt": result.in_doubt,
                "id": message.id,
                "created": message.created_at,
            },
        )
        if isinstance(member_id, uuid.UUID) and result.opted_out:
            await consent.opt_out_members(session, [member_id], source="provider")
        if message.kind == "reply":
            await _settle_bill(session, message, result)
        if result.exhausted:
            await dead_letters.record(
                session,
                kind="sms.reply",
                church_id=message.church_id,
                payload={"message_id": message.id, "created_at": message.created_at.isoformat()},
                error=result.error_detail or "send failed",
                error_code=result.error_code,
                attempts=message.attempts + 1,
            )


async def _settle_bill(session: AsyncSession, message: ConversationMessage, result: Result) -> None:
    """A reply's reservation: all of it back when it will not go out, the shortfall when
    Telnyx counted fewer parts; more parts than reserved are logged, never debited."""
    unused = 0
    if result.status in ("failed", "skipped"):
        unused = message.segments
    elif result.status == "sent" and result.parts is not None:
        unused = max(0, message.segments - result.parts)
        note_excess(message.church_id, result.parts - message.segments)
    if unused:
        await ledger.refund(
            session,
            message.church_id,
            unused,
            debit_reference=reply_debit(message),
            credit_reference=f"{reply_debit(message)}:{result.status}:{uuid.uuid4().hex[:12]}",
        )
