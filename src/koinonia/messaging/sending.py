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
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from procrastinate import App
from sqlalchemy import func, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.accounts.tables import Church
from koinonia.db import Database
from koinonia.jobs import defer, draining
from koinonia.members import consent
from koinonia.messaging import pauses, refs, suppressions, window
from koinonia.messaging.billing import note_excess
from koinonia.messaging.broadcasts import (
    BATCH_TASK,
    SEND_QUEUE,
    WAKE_TASK,
    batch_run_pending,
    refund,
)
from koinonia.messaging.counters import apply_transitions
from koinonia.messaging.delivery import Result, SendContext, attempt, report_to_breaker
from koinonia.messaging.replay import record_failed_send
from koinonia.messaging.tables import Message, SenderPause
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
                  ELSE least(coalesce(res.parts, r.segments), r.segments) END,
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
        if message is None or message.status not in ("queued", "sending"):
            return report  # cancelled, completed, or not started yet: nothing to do
        church = await session.get_one(Church, message.church_id)
        if message.status == "queued":
            # Conditional: a cancel committed since the read above must stay final.
            await session.execute(
                update(Message)
                .where(Message.id == message.id, Message.status == "queued")
                .values(
                    status="sending",
                    started_at=func.coalesce(Message.started_at, func.now()),
                    updated_at=func.now(),
                )
            )
    sender, profile = church.phone_number, church.messaging_profile_id
    if sender is None:  # the number was released since the broadcast was accepted
        log.warning("no_sending_number", church_id=str(church.id))
        return report
    while True:
        closed_until = window_closed_until(church, message)
        if closed_until is not None:
            await _hold_for_window(database, message, closed_until)
            return await _continue_later(database, job_app, message, batch_no, closed_until, report)
        pause = await _pause_of(database, sender)
        probing = pause is not None
        if pause is not None and not pauses.probe_due(pause, datetime.now(UTC)):
            wait = pauses.wait_for_probe(pause, datetime.now(UTC))
            return await _continue_later(database, job_app, message, batch_no, wait, report)
        breaker = await context.breaker.allow()
        if breaker.state == "open":
            return await _continue_later(
                database, job_app, message, batch_no, breaker.retry_after, report
            )
        probing = probing or breaker.state == "half_open"
        wanted = 1 if probing else context.settings.send_concurrency
        granted, wait = await context.throughput.take(sender, wanted, segments=message.segments)
        if granted == 0:
            return await _continue_later(database, job_app, message, batch_no, wait, report)
        claimed = await _claim(database, message, batch_no, granted)
        if not claimed:
            later = await _next_retry_in(database, message, batch_no)
            if later is not None:
                return await _continue_later(database, job_app, message, batch_no, later, report)
            return report
        results = await _send_chunk(context, database, church, message, claimed, sender, profile)
        if breaker.state == "half_open":
            # A failed probe tells about Telnyx, not about this recipient: it does not use
            # up one of the recipient's retries.
            for result in results:
                result.uncounted = result.uncounted or result.breaker_failure
        await report_to_breaker(context, results)
        refused = next((r.pause for r in results if r.pause is not None), None)
        resumed = pause is not None and any(r.status == "sent" for r in results)
        await write_back(
            database, message, claimed, results, pause=refused, resumed=pause if resumed else None
        )
        report.sent += sum(r.status == "sent" for r in results)
        report.other += sum(r.status != "sent" for r in results)
        throttled = [r for r in results if r.throttled]
        if throttled:
            until = max(r.next_attempt_at or datetime.now(UTC) for r in throttled)
            pace = max(0.5, (until - datetime.now(UTC)).total_seconds())
            await context.throughput.cool_down(pace)
            return await _continue_later(database, job_app, message, batch_no, pace, report)
        if refused is not None:
            return await _continue_later(
                database, job_app, message, batch_no, pauses.FIRST_PROBE_SECONDS, report
            )
        if time.monotonic() > deadline or draining():  # draining: the worker is stopping
            return await _continue_later(database, job_app, message, batch_no, 0, report)


def window_closed_until(church: Church, message: Message) -> float | None:
    """Seconds until the church's sending window opens, when it is closed now and the
    broadcast is not urgent; None when it may send now."""
    if message.urgent:
        return None
    now = datetime.now(UTC)
    opening = window.next_opening(
        now, church.timezone, church.send_window_start, church.send_window_end
    )
    if opening is None:
        return None
    return max(0.0, (opening - now).total_seconds())


async def _hold_for_window(database: Database, message: Message, seconds: float) -> None:
    """A broadcast still running when the window closes shows when it resumes."""
    async with database.unit_of_work() as session:
        await session.execute(
            update(Message)
            .where(Message.id == message.id, Message.status.in_(("queued", "sending")))
            .values(starts_at=func.now() + timedelta(seconds=seconds), updated_at=func.now())
        )


async def _pause_of(database: Database, sender: str) -> SenderPause | None:
    async with database.unit_of_work() as session:
        return await pauses.active(session, sender)


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
    database: Database,
    job_app: App,
    message: Message,
    batch_no: int,
    seconds: float,
    report: BatchReport,
) -> BatchReport:
    # A broadcast that has sent nothing yet keeps its first-slice priority while it waits
    # for tokens: a church that has just sent gets its first text ahead of the rest.
    fresh = report.sent == 0 and message.sent_count == 0 and message.delivered_count == 0
    await continue_batch(
        database,
        job_app,
        message.id,
        message.created_at,
        message.church_id,
        batch_no,
        seconds,
        fresh=fresh,
    )
    report.deferred_for = seconds
    return report


async def continue_batch(
    database: Database,
    job_app: App,
    message_id: uuid.UUID,
    created_at: datetime,
    church_id: uuid.UUID,
    batch_no: int,
    seconds: float,
    *,
    fresh: bool = False,
) -> None:
    """Run the batch again now, or after `seconds` through a lock-free wake job — unless
    a run of it is queued already (a duplicate run would be harmless, only wasteful).

    A job waiting for a future time while holding the church's lock would block every
    later job with that lock (procrastinate #1599): a broadcast waiting for its window,
    a pause or a retry must never hold back the church's other sends.
    """
    async with database.unit_of_work() as session:
        if await batch_run_pending(session, message_id, batch_no):
            return
    # A continuation goes after every church's first slice of the same batch number: a
    # church that has just sent its broadcast starts ahead of those already sending.
    priority = -batch_no if fresh else -batch_no - 1
    args: dict[str, Any] = {
        "message_id": str(message_id),
        "created_at": created_at.isoformat(),
        "batch_no": batch_no,
    }
    if seconds <= 0:
        await defer(
            job_app,
            BATCH_TASK,
            queue=SEND_QUEUE,
            priority=priority,
            lock=f"sms:{church_id}",
            **args,
        )
    else:
        await defer(
            job_app,
            WAKE_TASK,
            queue=SEND_QUEUE,
            priority=priority,
            schedule_in_seconds=seconds,
            church_id=str(church_id),
            fresh=fresh,
            **args,
        )


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
        phones = {
            member_id: context.cipher.decrypt(row.phone_ct, church.id)
            for member_id, row in members.items()
        }
        # Checked just before sending: a STOP acknowledged by the webhook is a suppression
        # at once, whether or not a worker has applied it to the member yet.
        stopped = await suppressions.suppressed(
            session, context.settings, sender, list(phones.values())
        )

    async def one(row: Claimed) -> Result:
        member = members.get(row.member_id)
        if member is None or member.deleted_at is not None:
            return Result(row.id, "skipped", skip_reason="invalid", error_detail="member deleted")
        if member.opted_out or phones[row.member_id] in stopped:
            return Result(row.id, "skipped", skip_reason="opted_out")
        body = render(
            message.body,
            {
                "first_name": member.first_name,
                "last_name": member.last_name,
                "church_name": church.name,
            },
        )
        if not body.strip():
            return Result(row.id, "skipped", skip_reason="empty_body")
        return await attempt(
            context,
            kind="broadcast",
            row_id=row.id,
            attempts=row.attempts,
            sender=sender,
            to=phones[row.member_id],
            text=body,
            ref=refs.RowRef("r", row.id, message.created_at),
            messaging_profile_id=profile,
        )

    return list(await asyncio.gather(*(one(row) for row in claimed)))


async def write_back(
    database: Database,
    message: Message,
    claimed: list[Claimed],
    results: list[Result],
    *,
    pause: pauses.Scope | None = None,
    resumed: SenderPause | None = None,
) -> None:
    """All results of a chunk in one transaction: statuses, counters, refunds, opt-outs,
    dead letters, and a pause started or lifted by what the provider answered."""

    async def work(session: AsyncSession) -> None:
        await _write_back_in(session, message, claimed, results)
        if pause is not None:
            refusal = next(r for r in results if r.pause is not None)
            await pauses.pause(
                session,
                pause,
                code=refusal.error_code,
                reason=refusal.error_detail or "refused by the provider",
            )
        elif resumed is not None:
            await pauses.clear(session, resumed.scope, resumed.key)

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
    late: list[Result] = []
    for result in results:
        if result.row_id not in applied:
            if result.status == "sent" and result.parts is not None:
                late.append(result)  # its receipt got there first; the parts still count
            continue
        if result.status in ("skipped", "failed"):
            unused += reserved[result.row_id]
        elif result.status == "sent" and result.parts is not None:
            # Billed = Telnyx's parts capped at the reservation: a shortfall is refunded,
            # an excess is counted and logged, never debited.
            unused += max(0, reserved[result.row_id] - result.parts)
            if result.parts > reserved[result.row_id]:
                note_excess(message.church_id, result.parts - reserved[result.row_id])
    unused += await _settle_late_parts(session, message, late)
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


async def _settle_late_parts(session: AsyncSession, message: Message, late: list[Result]) -> int:
    """Rows a receipt settled before their send's answer was written still bill the parts
    Telnyx counted (capped at the reservation): the shortfall is refunded."""
    if not late:
        return 0
    freed = await session.execute(
        text(
            "WITH t AS (SELECT * FROM unnest(CAST(:ids AS bigint[]), CAST(:parts AS int[])) "
            "AS t(id, parts)), "
            "old AS (SELECT r.id, r.segments FROM message_recipients r JOIN t ON t.id = r.id "
            "WHERE r.created_at = :created AND r.segments > t.parts "
            "AND r.status IN ('sent', 'delivered', 'undelivered', 'unconfirmed') "
            "FOR UPDATE OF r) "
            "UPDATE message_recipients r SET segments = t.parts FROM t, old "
            "WHERE r.id = t.id AND old.id = r.id AND r.created_at = :created "
            "RETURNING old.segments - t.parts AS freed"
        ),
        {
            "ids": [r.row_id for r in late],
            "parts": [r.parts for r in late],
            "created": message.created_at,
        },
    )
    return sum(int(row.freed) for row in freed)


async def _opt_out(session: AsyncSession, member_ids: list[uuid.UUID]) -> None:
    """Telnyx refused with 40300: the phone texted STOP at the carrier; we record it too
    (with a consent-history event)."""
    await consent.opt_out_members(session, member_ids, source="provider")
