"""Workers sending a broadcast's dispatch batch.

A batch job claims its queued recipients a chunk at a time (`FOR UPDATE SKIP LOCKED`,
committed as `sending` before anything goes out), sends the chunk concurrently within
the number's rate, and writes the results back in one statement. It gives its worker
slot back after a time slice, when the number's rate or the circuit asks it to wait, or
when only later retries remain, by deferring itself again: waiting is never failing.

A worker killed mid-chunk leaves rows `sending`: receipts (which name the row through
the webhook reference) settle those that went out, and the reconciler re-queues the
rest once no receipt can still come — so no phone gets a broadcast twice and none is
silently dropped.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter as Tally
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog
from procrastinate import App
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.accounts.tables import Church
from koinonia.db import Database
from koinonia.jobs import defer
from koinonia.messaging import refs
from koinonia.messaging.broadcasts import BATCH_TASK, SEND_QUEUE, refund
from koinonia.messaging.counters import apply_transitions
from koinonia.messaging.delivery import Result, SendContext, attempt, report_to_breaker
from koinonia.messaging.replay import record_failed_send
from koinonia.messaging.tables import Message
from koinonia.retry import in_transaction
from koinonia.templates.rendering import render

log = structlog.get_logger(__name__)

CLAIM_SQL = """
WITH picked AS (
  SELECT id FROM message_recipients
  WHERE message_id = :message_id AND created_at = :created_at AND batch_no = :batch_no
    AND status = 'queued' AND (next_attempt_at IS NULL OR next_attempt_at <= now())
  ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED
)
UPDATE message_recipients r
SET status = 'sending', claimed_at = now(), attempts = r.attempts + 1, updated_at = now()
FROM picked WHERE r.id = picked.id AND r.created_at = :created_at
RETURNING r.id, r.member_id, r.attempts, r.segments
"""

WRITE_BACK_SQL = """
WITH res AS (
  SELECT * FROM unnest(
    CAST(:ids AS bigint[]), CAST(:statuses AS text[]), CAST(:reasons AS text[]),
    CAST(:provider_ids AS text[]), CAST(:parts AS int[]), CAST(:codes AS text[]),
    CAST(:details AS text[]), CAST(:next_at AS timestamptz[]), CAST(:doubt AS bool[]),
    CAST(:uncounted AS bool[])
  ) AS t(id, status, reason, provider_id, parts, code, detail, next_at, doubt, uncounted)
),
old AS (
  SELECT r.id, r.status FROM message_recipients r JOIN res ON res.id = r.id
  WHERE r.created_at = :created_at AND r.message_id = :message_id
  FOR UPDATE OF r
)
UPDATE message_recipients r SET
  status = res.status,
  skip_reason = res.reason,
  provider_message_id = coalesce(res.provider_id, r.provider_message_id),
  segments = CASE WHEN res.status IN ('skipped', 'failed') THEN 0
                  ELSE coalesce(res.parts, r.segments) END,
  error_code = res.code,
  error_detail = res.detail,
  next_attempt_at = res.next_at,
  attempts = CASE WHEN res.uncounted THEN greatest(r.attempts - 1, 0) ELSE r.attempts END,
  in_doubt_since = CASE WHEN res.doubt THEN now() END,
  sent_at = CASE WHEN res.status = 'sent' THEN now() ELSE r.sent_at END,
  finalized_at = CASE WHEN res.status IN ('skipped', 'failed') THEN now()
                      ELSE r.finalized_at END,
  updated_at = now()
FROM res, old
WHERE r.id = res.id AND r.created_at = :created_at AND old.id = r.id AND old.status = 'sending'
RETURNING r.id, old.status AS old_status, r.status AS new_status
"""


@dataclass
class Claimed:
    id: int
    member_id: uuid.UUID
    attempts: int
    reserved: int


@dataclass
class BatchReport:
    sent: int = 0
    other: int = 0
    deferred_for: float | None = None  # seconds, when the job continues later


async def run_batch(
    context: SendContext,
    database: Database,
    job_app: App,
    message_id: uuid.UUID,
    created_at: datetime,
    batch_no: int,
) -> BatchReport:
    report = BatchReport()
    deadline = time.monotonic() + context.settings.send_time_slice_seconds
    async with database.unit_of_work() as session:
        message = await session.get(Message, message_id)
        if message is None or message.status not in ("scheduled", "queued", "sending"):
            return report
        church = await session.get_one(Church, message.church_id)
        if message.status != "sending":
            message.status = "sending"
            message.started_at = message.started_at or datetime.now(UTC)
    sender, profile = church.phone_number, church.messaging_profile_id
    if sender is None:  # the number was released since the broadcast was accepted
        log.warning("no_sending_number", church_id=str(church.id))
        return report
    while True:
        breaker = await context.breaker.allow()
        if breaker.state == "open":
            return await _continue_later(job_app, message, batch_no, breaker.retry_after, report)
        wanted = 1 if breaker.state == "half_open" else context.settings.send_concurrency
        granted, wait = await context.throughput.take(sender, wanted)
        if granted == 0:
            return await _continue_later(job_app, message, batch_no, wait, report)
        claimed = await _claim(database, message, batch_no, granted)
        if not claimed:
            later = await _next_retry_in(database, message, batch_no)
            if later is not None:
                return await _continue_later(job_app, message, batch_no, later, report)
            return report
        results = await _send_chunk(context, database, church, message, claimed, sender, profile)
        if breaker.state == "half_open":
            # A failed probe tells about Telnyx, not about this recipient: it does not use
            # up one of the recipient's retries.
            for result in results:
                result.uncounted = result.breaker_failure
        await report_to_breaker(context, results)
        await write_back(database, message, claimed, results)
        report.sent += sum(r.status == "sent" for r in results)
        report.other += sum(r.status != "sent" for r in results)
        if time.monotonic() > deadline:
            return await _continue_later(job_app, message, batch_no, 0, report)


async def _claim(database: Database, message: Message, batch_no: int, limit: int) -> list[Claimed]:
    async with database.unit_of_work() as session:
        rows = await session.execute(
            text(CLAIM_SQL),
            {
                "message_id": message.id,
                "created_at": message.created_at,
                "batch_no": batch_no,
                "limit": limit,
            },
        )
        return [Claimed(int(r.id), r.member_id, int(r.attempts), int(r.segments)) for r in rows]


async def _next_retry_in(database: Database, message: Message, batch_no: int) -> float | None:
    async with database.unit_of_work() as session:
        when = await session.scalar(
            text(
                "SELECT min(coalesce(next_attempt_at, now())) FROM message_recipients "
                "WHERE message_id = :m AND created_at = :c AND batch_no = :b AND status = 'queued'"
            ),
            {"m": message.id, "c": message.created_at, "b": batch_no},
        )
    if not isinstance(when, datetime):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


async def _continue_later(
    job_app: App, message: Message, batch_no: int, seconds: float, report: BatchReport
) -> BatchReport:
    await defer(
        job_app,
        BATCH_TASK,
        queue=SEND_QUEUE,
        priority=-batch_no,
        lock=f"sms:{message.church_id}",
        schedule_in_seconds=seconds,
        message_id=str(message.id),
        created_at=message.created_at.isoformat(),
        batch_no=batch_no,
    )
    report.deferred_for = seconds
    return report


async def _send_chunk(
    context: SendContext,
    database: Database,
    church: Church,
    message: Message,
    claimed: list[Claimed],
    sender: str,
    profile: str | None,
) -> list[Result]:
    async with database.unit_of_work() as session:
        members = {
            row.id: row
            for row in await session.execute(
                text(
                    "SELECT id, phone_ct, first_name, last_name, opted_out, deleted_at "
                    "FROM members WHERE id = ANY(:ids)"
                ),
                {"ids": [c.member_id for c in claimed]},
            )
        }

    async def one(row: Claimed) -> Result:
        member = members.get(row.member_id)
        if member is None or member.deleted_at is not None:
            return Result(row.id, "skipped", skip_reason="invalid", error_detail="member deleted")
        if member.opted_out:  # opted out after the broadcast was accepted
            return Result(row.id, "skipped", skip_reason="opted_out")
        body = render(
            message.body,
            {
                "first_name": member.first_name,
                "last_name": member.last_name,
                "church_name": church.name,
            },
        )
        return await attempt(
            context,
            kind="broadcast",
            row_id=row.id,
            attempts=row.attempts,
            sender=sender,
            to=context.cipher.decrypt(member.phone_ct, church.id),
            text=body,
            ref=refs.RowRef("r", row.id, message.created_at),
            messaging_profile_id=profile,
        )

    return list(await asyncio.gather(*(one(row) for row in claimed)))


async def write_back(
    database: Database, message: Message, claimed: list[Claimed], results: list[Result]
) -> None:
    """All results of a chunk in one transaction: statuses, counters, refunds, opt-outs
    and dead letters."""

    async def work(session: AsyncSession) -> None:
        await _write_back_in(session, message, claimed, results)

    # The texts have gone out: a deadlock or a lost connection here must not leave the
    # rows `sending` until the lease runs out, so the whole write-back is retried.
    await in_transaction(database, "READ COMMITTED", work, operation="sms_write_back")


async def _write_back_in(
    session: AsyncSession, message: Message, claimed: list[Claimed], results: list[Result]
) -> None:
    reserved = {c.id: c.reserved for c in claimed}
    members = {c.id: c.member_id for c in claimed}
    attempts = {c.id: c.attempts for c in claimed}
    changed = await session.execute(
        text(WRITE_BACK_SQL),
        {
            "message_id": message.id,
            "created_at": message.created_at,
            "ids": [r.row_id for r in results],
            "statuses": [r.status for r in results],
            "reasons": [r.skip_reason for r in results],
            "provider_ids": [r.provider_id for r in results],
            "parts": [r.parts for r in results],
            "codes": [r.error_code for r in results],
            "details": [r.error_detail for r in results],
            "next_at": [r.next_attempt_at for r in results],
            "doubt": [r.in_doubt for r in results],
            "uncounted": [r.uncounted for r in results],
        },
    )
    applied = {int(row.id): (row.old_status, row.new_status) for row in changed}
    tally = Tally(applied.values())
    await apply_transitions(session, [(message.id, o, n, k) for (o, n), k in tally.items()])
    unused = 0
    for result in results:
        if result.row_id not in applied:
            continue  # a receipt got there first
        if result.status in ("skipped", "failed"):
            unused += reserved[result.row_id]
        elif result.status == "sent" and result.parts is not None:
            unused += max(0, reserved[result.row_id] - result.parts)
    await refund(session, message, unused, "unsent")
    opted_out = [members[r.row_id] for r in results if r.opted_out and r.row_id in applied]
    if opted_out:
        await _opt_out(session, opted_out)
    for result in results:
        if result.exhausted and result.row_id in applied:
            await record_failed_send(
                session,
                church_id=message.church_id,
                message_id=message.id,
                created_at=message.created_at,
                recipient_id=result.row_id,
                error=result.error_detail or "send failed",
                error_code=result.error_code,
                attempts=attempts[result.row_id],
            )


async def _opt_out(session: AsyncSession, member_ids: list[uuid.UUID]) -> None:
    """Telnyx refused with 40300: the phone texted STOP at the carrier; we record it too."""
    await session.execute(
        text(
            "UPDATE members SET opted_out = true, opted_out_at = now(), "
            "opted_out_source = 'provider', updated_at = now() "
            "WHERE id = ANY(:ids) AND NOT opted_out"
        ),
        {"ids": member_ids},
    )
