"""Settling what the send path could not: sends in doubt, texts without a final receipt,
and broadcast work that nothing is scheduled to do.

A send is in doubt after a timeout or 5xx once the request left, or when the worker that
claimed it died mid-chunk. Before such a row is sent again, everything that could show it
went out is consulted: stored receipts (applied or not yet applied) that name it, and —
when Telnyx gave it an id — Telnyx itself. A row with a Telnyx id is never sent again; a
failed lookup keeps it in doubt for the next pass; a lookup that says Telnyx has no such
message, or no final state a day after sending, settles it as `unconfirmed`. Only a row
with no id and no receipt after `SEND_RECONCILE_AFTER_SECONDS` (Telnyx answers `message.sent`
within seconds of accepting) is queued again.

No row lock is held across a provider call: candidates are read, looked up, and then
changed by conditional updates that lose to anything that moved the row meanwhile.
"""

from __future__ import annotations

from collections import Counter as Tally
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from procrastinate import App
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.billing import ledger
from koinonia.conversations.sending import defer_again
from koinonia.conversations.service import reply_debit_reference
from koinonia.db import Database
from koinonia.messaging import receipts, refs
from koinonia.messaging.broadcasts import (
    BATCH_TASK,
    START_TASK,
    WAKE_TASK,
    defer_batch_of,
    defer_start,
    refund,
)
from koinonia.messaging.counters import apply_transitions, complete_finished
from koinonia.messaging.delivery import SendContext
from koinonia.messaging.replay import record_failed_send
from koinonia.messaging.tables import Message
from koinonia.telnyx.client import TelnyxError

log = structlog.get_logger(__name__)

IN_DOUBT_SQL = """
SELECT r.id, r.created_at, r.message_id, r.church_id, r.batch_no, r.provider_message_id,
       r.attempts, r.claimed_at, r.segments
FROM message_recipients r
WHERE r.status = 'sending' AND r.claimed_at < :cutoff
  AND coalesce(r.in_doubt_since, r.claimed_at + make_interval(secs => :lease)) < :cutoff
ORDER BY r.claimed_at LIMIT :limit
"""

UNSETTLED_SQL = """
SELECT r.id, r.created_at, r.provider_message_id, r.sent_at, r.message_id
FROM message_recipients r
WHERE r.status = 'sent' AND r.finalized_at IS NULL AND r.sent_at < :cutoff
  AND (r.next_attempt_at IS NULL OR r.next_attempt_at < now())
ORDER BY r.sent_at LIMIT :limit
"""

# Stored receipts not applied yet that name any of the rows, by our reference or by id.
PENDING_RECEIPTS_SQL = """
SELECT payload->>'koinonia_ref' AS ref, payload->'data'->'payload'->>'id' AS provider_id
FROM webhook_events
WHERE provider = 'telnyx' AND processed_at IS NULL
  AND (payload->>'koinonia_ref' = ANY(:refs)
       OR payload->'data'->'payload'->>'id' = ANY(:provider_ids))
"""

# Broadcast batches with queued recipients and no job to send them (a job that failed
# for good, a worker that died before deferring its continuation).
STRANDED_SQL = """
SELECT DISTINCT r.message_id, r.created_at, r.batch_no, r.church_id
FROM messages m
JOIN message_recipients r ON r.message_id = m.id AND r.created_at = m.created_at
WHERE m.status IN ('queued', 'sending') AND m.updated_at < now() - make_interval(secs => :grace)
  AND r.status = 'queued'
  AND NOT EXISTS (
    SELECT 1 FROM procrastinate_jobs j
    WHERE j.status IN ('todo', 'doing') AND j.task_name = ANY(:tasks)
      AND j.args->>'message_id' = m.id::text
      AND (j.args->>'batch_no')::int = r.batch_no)
LIMIT 500
"""

UNSTARTED_SQL = """
SELECT m.id FROM messages m
WHERE m.status = 'scheduled' AND coalesce(m.starts_at, m.scheduled_at) < now()
  AND m.updated_at < now() - make_interval(secs => :grace)
  AND NOT EXISTS (
    SELECT 1 FROM procrastinate_jobs j
    WHERE j.status IN ('todo', 'doing') AND j.task_name = :task
      AND j.args->>'message_id' = m.id::text)
LIMIT 500
"""
SWEEP_GRACE_SECONDS = 5.0


@dataclass
class Reconciled:
    confirmed: int = 0  # settled by a receipt found in a lookup
    requeued: int = 0
    failed: int = 0  # gave up: no id, no receipt, out of retries
    unconfirmed: int = 0  # Telnyx had it (or no answer in a day): never sent again
    kept_in_doubt: int = 0  # a lookup failed or a stored receipt waits to be applied
    swept: int = 0  # stranded batches and held broadcasts deferred again


@dataclass
class _Plan:
    receipts: list[receipts.Receipt]
    requeue: list[Any]
    give_up: list[Any]
    unconfirmed: list[Any]
    not_final: list[Any]


async def reconcile(
    context: SendContext, database: Database, job_app: App, *, limit: int = 1000
) -> Reconciled:
    settings = context.settings
    outcome = Reconciled()
    now = datetime.now(UTC)
    cutoff = now - timedelta(seconds=settings.send_reconcile_after_seconds)
    async with database.unit_of_work() as session:
        rows = list(
            await session.execute(
                text(IN_DOUBT_SQL),
                {"cutoff": cutoff, "lease": settings.send_lease_seconds, "limit": limit},
            )
        )
        waiting = await _with_pending_receipts(session, context.ref_key, rows)
    if rows:
        plan = await _plan_in_doubt(context, rows, waiting, outcome)
        await _settle(database, job_app, plan, outcome, from_status="sending")
    await _settle_unfinished(context, database, job_app, outcome)
    outcome.swept = await sweep(database, job_app)
    if any(vars(outcome).values()):
        log.info("sends_reconciled", **vars(outcome))
    await _reconcile_replies(context, database, job_app, cutoff, outcome)
    return outcome


async def _with_pending_receipts(
    session: AsyncSession, ref_key: bytes, rows: list[Any]
) -> set[int]:
    """Ids of rows that a stored, not yet applied receipt names: they wait for it."""
    if not rows:
        return set()
    ref_of = {
        refs.encode(ref_key, refs.RowRef("r", int(row.id), row.created_at)): int(row.id)
        for row in rows
    }
    id_of = {row.provider_message_id: int(row.id) for row in rows if row.provider_message_id}
    found = await session.execute(
        text(PENDING_RECEIPTS_SQL), {"refs": list(ref_of), "provider_ids": list(id_of)}
    )
    waiting: set[int] = set()
    for ref, provider_id in found:
        if ref in ref_of:
            waiting.add(ref_of[ref])
        if provider_id in id_of:
            waiting.add(id_of[provider_id])
    return waiting


async def _plan_in_doubt(
    context: SendContext, rows: list[Any], waiting: set[int], outcome: Reconciled
) -> _Plan:
    plan = _Plan([], [], [], [], [])
    for row in rows:
        if int(row.id) in waiting:
            outcome.kept_in_doubt += 1
            continue
        if row.provider_message_id:
            # Telnyx accepted it: never sent again, whatever the lookup says.
            looked_up = await _lookup(context, row.provider_message_id)
            if looked_up is _GONE:
                plan.unconfirmed.append(row)
            elif looked_up is None:
                outcome.kept_in_doubt += 1
            else:
                assert isinstance(looked_up, receipts.Receipt)
                plan.receipts.append(looked_up)
            continue
        if row.attempts > context.settings.telnyx_max_retries:
            plan.give_up.append(row)
        else:
            plan.requeue.append(row)
    return plan


_GONE = object()  # Telnyx answered 404 for the id


async def _lookup(context: SendContext, provider_id: str) -> receipts.Receipt | object | None:
    try:
        data = await context.telnyx.get_message(provider_id)
    except TelnyxError as error:
        return _GONE if error.status == 404 else None
    return receipts.parse({"data": {"payload": data}}, None)


async def _settle(
    database: Database, job_app: App, plan: _Plan, outcome: Reconciled, *, from_status: str
) -> None:
    async with database.unit_of_work() as session:
        if plan.receipts:
            outcome.confirmed += await receipts.apply_receipts(session, plan.receipts)
        if plan.requeue:
            requeued = await session.execute(
                text(
                    "UPDATE message_recipients SET status = 'queued', claimed_at = NULL, "
                    "in_doubt_since = NULL, next_attempt_at = NULL, updated_at = now() "
                    "WHERE (id, created_at, claimed_at) IN (SELECT * FROM unnest("
                    "CAST(:ids AS bigint[]), CAST(:created AS timestamptz[]), "
                    "CAST(:claimed AS timestamptz[]))) "
                    "AND status = 'sending' AND provider_message_id IS NULL "
                    "RETURNING message_id, created_at, batch_no, church_id"
                ),
                {
                    "ids": [r.id for r in plan.requeue],
                    "created": [r.created_at for r in plan.requeue],
                    "claimed": [r.claimed_at for r in plan.requeue],
                },
            )
            moved = [tuple(r) for r in requeued]
            outcome.requeued += len(moved)
            batches = set(moved)
            for message_id, created_at, batch_no, church_id in batches:
                await defer_batch_of(job_app, session, message_id, created_at, church_id, batch_no)
        if plan.unconfirmed:
            outcome.unconfirmed += await _mark_unconfirmed(session, plan.unconfirmed, from_status)
        if plan.give_up:
            outcome.failed += await _give_up(session, plan.give_up)


async def _mark_unconfirmed(session: AsyncSession, rows: list[Any], from_status: str) -> int:
    changed = await session.execute(
        text(
            "UPDATE message_recipients SET status = 'unconfirmed', finalized_at = now(), "
            "error_code = 'unconfirmed', next_attempt_at = NULL, in_doubt_since = NULL, "
            "error_detail = 'Telnyx accepted it but no final state came; not sent again', "
            "updated_at = now() "
            "WHERE (id, created_at) IN (SELECT * FROM unnest("
            "CAST(:ids AS bigint[]), CAST(:created AS timestamptz[]))) AND status = :old "
            "RETURNING message_id"
        ),
        {"ids": [r.id for r in rows], "created": [r.created_at for r in rows], "old": from_status},
    )
    tally = Tally(row.message_id for row in changed)
    await apply_transitions(session, [(m, from_status, "unconfirmed", n) for m, n in tally.items()])
    return sum(tally.values())


async def _give_up(session: AsyncSession, rows: list[Any]) -> int:
    """No Telnyx id, no receipt, out of retries: failed, refunded, dead-lettered — an
    operator decides whether to risk a second text."""
    changed = await session.execute(
        text(
            "UPDATE message_recipients SET status = 'failed', segments = 0, "
            "error_code = 'unconfirmed', finalized_at = now(), updated_at = now(), "
            "error_detail = 'no answer and no receipt; not resent automatically' "
            "WHERE (id, created_at, claimed_at) IN (SELECT * FROM unnest("
            "CAST(:ids AS bigint[]), CAST(:created AS timestamptz[]), "
            "CAST(:claimed AS timestamptz[]))) AND status = 'sending' "
            "RETURNING id"
        ),
        {
            "ids": [r.id for r in rows],
            "created": [r.created_at for r in rows],
            "claimed": [r.claimed_at for r in rows],
        },
    )
    done = {int(r.id) for r in changed}
    rows = [r for r in rows if int(r.id) in done]
    tally = Tally(r.message_id for r in rows)
    await apply_transitions(session, [(m, "sending", "failed", n) for m, n in tally.items()])
    for message_id in sorted(tally):
        message = await session.get_one(Message, message_id)
        segments = sum(int(r.segments) for r in rows if r.message_id == message_id)
        await refund(session, message, segments, "unconfirmed")
    for row in rows:
        await record_failed_send(
            session,
            church_id=row.church_id,
            message_id=row.message_id,
            created_at=row.created_at,
            recipient_id=row.id,
            error="sent without an answer or a receipt; resending could text twice",
            error_code="unconfirmed",
            attempts=row.attempts,
        )
    return len(rows)


async def _settle_unfinished(
    context: SendContext, database: Database, job_app: App, outcome: Reconciled
) -> None:
    """`sent` rows whose final receipt never came (lost, or the provider restarted)."""
    settings = context.settings
    now = datetime.now(UTC)
    async with database.unit_of_work() as session:
        rows = list(
            await session.execute(
                text(UNSETTLED_SQL),
                {
                    "cutoff": now - timedelta(seconds=settings.send_settle_after_seconds),
                    "limit": 200,
                },
            )
        )
    if not rows:
        return
    plan = _Plan([], [], [], [], [])
    give_up_before = now - timedelta(seconds=settings.send_unconfirmed_after_seconds)
    for row in rows:
        found = (
            await _lookup(context, row.provider_message_id) if row.provider_message_id else _GONE
        )
        if found is _GONE:
            plan.unconfirmed.append(row)
        elif isinstance(found, receipts.Receipt) and found.final:
            plan.receipts.append(found)
        elif row.sent_at < give_up_before:
            plan.unconfirmed.append(row)
        else:
            plan.not_final.append(row)
    await _settle(database, job_app, plan, outcome, from_status="sent")
    if plan.not_final:
        async with database.unit_of_work() as session:
            await session.execute(
                text(
                    "UPDATE message_recipients SET next_attempt_at = now() + "
                    "make_interval(secs => :every) WHERE (id, created_at) IN (SELECT * FROM "
                    "unnest(CAST(:ids AS bigint[]), CAST(:created AS timestamptz[]))) "
                    "AND status = 'sent'"
                ),
                {
                    "every": settings.send_settle_after_seconds,
                    "ids": [r.id for r in plan.not_final],
                    "created": [r.created_at for r in plan.not_final],
                },
            )


async def sweep(database: Database, job_app: App) -> int:
    """Re-defer broadcast work that nothing is scheduled to do, and complete broadcasts
    whose counters say nothing is left."""
    swept = 0
    async with database.unit_of_work() as session:
        stranded = list(
            await session.execute(
                text(STRANDED_SQL),
                {"grace": SWEEP_GRACE_SECONDS, "tasks": [BATCH_TASK, WAKE_TASK]},
            )
        )
        for message_id, created_at, batch_no, church_id in stranded:
            await defer_batch_of(job_app, session, message_id, created_at, church_id, batch_no)
        unstarted = list(
            await session.scalars(
                text(UNSTARTED_SQL), {"grace": SWEEP_GRACE_SECONDS, "task": START_TASK}
            )
        )
        for message_id in unstarted:
            message = await session.get_one(Message, message_id)
            await defer_start(job_app, session, message, datetime.now(UTC))
        idle = list(
            await session.scalars(
                text(
                    "SELECT id FROM messages WHERE status IN ('queued', 'sending') "
                    "AND queued_count = 0 AND updated_at < now() - make_interval(secs => :g)"
                ),
                {"g": SWEEP_GRACE_SECONDS},
            )
        )
        await complete_finished(session, idle)
        swept = len(stranded) + len(unstarted)
    if swept:
        log.warning("stranded_work_deferred", batches=len(stranded), broadcasts=len(unstarted))
    return swept


async def _reconcile_replies(
    context: SendContext, database: Database, job_app: App, cutoff: datetime, outcome: Reconciled
) -> None:
    settings = context.settings
    async with database.unit_of_work() as session:
        rows = list(
            await session.execute(
                text(
                    "SELECT id, created_at, attempts, provider_message_id, kind, segments, "
                    "church_id FROM conversation_messages "
                    "WHERE status = 'sending' AND direction = 'outbound' "
                    "AND coalesce(in_doubt_since, updated_at + make_interval(secs => :lease)) "
                    "< :cutoff LIMIT 200"
                ),
                {"cutoff": cutoff, "lease": settings.send_lease_seconds},
            )
        )
        if not rows:
            return
        refs_of = {
            refs.encode(context.ref_key, refs.RowRef("c", int(r.id), r.created_at)): int(r.id)
            for r in rows
        }
        pending = await session.execute(
            text(PENDING_RECEIPTS_SQL),
            {
                "refs": list(refs_of),
                "provider_ids": [r.provider_message_id for r in rows if r.provider_message_id],
            },
        )
        waiting = {refs_of.get(ref) for ref, _ in pending}
        retried: list[Any] = []
        for row in rows:
            if int(row.id) in waiting:
                continue
            if row.provider_message_id:
                status, retry = "unconfirmed_reply", False
            else:
                retry = row.attempts <= settings.telnyx_max_retries
                status = "retry" if retry else "failed"
            changed = await session.execute(
                text(
                    "UPDATE conversation_messages SET status = :status, in_doubt_since = NULL, "
                    "error_code = CASE WHEN :retry THEN error_code ELSE 'unconfirmed' END, "
                    "updated_at = now() WHERE id = :id AND created_at = :created "
                    "AND status = 'sending'"
                ),
                {
                    "status": "queued" if retry else ("sent" if status != "failed" else "failed"),
                    "retry": retry,
                    "id": row.id,
                    "created": row.created_at,
                },
            )
            if changed.rowcount:  # type: ignore[attr-defined]
                if retry:
                    outcome.requeued += 1
                    retried.append(row)
                elif status == "failed":
                    outcome.failed += 1
                    if row.kind == "reply":  # not sent: its reservation goes back
                        debit = reply_debit_reference(row.id, row.created_at)
                        await ledger.refund(
                            session,
                            row.church_id,
                            int(row.segments),
                            debit_reference=debit,
                            credit_reference=f"{debit}:unconfirmed:{row.attempts}",
                        )
                else:
                    outcome.unconfirmed += 1
    for row in retried:
        await defer_again(job_app, row.id, row.created_at, 0)
