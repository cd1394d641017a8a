"""Settling sends in doubt: a timeout or 5xx after the request left, or a row claimed by
a worker that died mid-chunk.

Receipts settle most of them (they carry our row reference even when no Telnyx id came
back). What has a Telnyx id is looked up. What still has neither after
`SEND_RECONCILE_AFTER_SECONDS` was not accepted — Telnyx sends `message.sent` within
seconds of accepting — and is queued again; past the retry limit it fails and is
dead-lettered for an operator instead.
"""

from __future__ import annotations

import uuid
from collections import Counter as Tally
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog
from procrastinate import App
from sqlalchemy import text

from koinonia.conversations.sending import defer_again
from koinonia.db import Database
from koinonia.messaging import receipts
from koinonia.messaging.broadcasts import defer_batch_of
from koinonia.messaging.counters import apply_transitions
from koinonia.messaging.delivery import SendContext
from koinonia.messaging.replay import record_failed_send
from koinonia.telnyx.client import TelnyxError

log = structlog.get_logger(__name__)

IN_DOUBT_SQL = """
SELECT r.id, r.created_at, r.message_id, r.church_id, r.batch_no, r.provider_message_id,
       r.attempts
FROM message_recipients r
WHERE r.status = 'sending' AND r.claimed_at < :cutoff
  AND coalesce(r.in_doubt_since, r.claimed_at + make_interval(secs => :lease)) < :cutoff
ORDER BY r.claimed_at LIMIT :limit FOR UPDATE SKIP LOCKED
"""


@dataclass
class Reconciled:
    confirmed: int = 0  # settled by a lookup
    requeued: int = 0
    failed: int = 0


async def reconcile(
    context: SendContext, database: Database, job_app: App, *, limit: int = 1000
) -> Reconciled:
    settings = context.settings
    now = datetime.now(UTC)
    cutoff = now - timedelta(seconds=settings.send_reconcile_after_seconds)
    outcome = Reconciled()
    async with database.unit_of_work() as session:
        rows = list(
            await session.execute(
                text(IN_DOUBT_SQL),
                {"cutoff": cutoff, "lease": settings.send_lease_seconds, "limit": limit},
            )
        )
        if not rows:
            return await _reconcile_replies(context, database, job_app, cutoff, outcome)
        looked_up: list[receipts.Receipt] = []
        requeue: list[tuple[int, datetime, uuid.UUID, int, uuid.UUID]] = []
        give_up = []
        for row in rows:
            if row.provider_message_id:
                found = await _lookup(context, row.provider_message_id)
                if found is not None:
                    looked_up.append(found)
                    continue
            if row.attempts > settings.telnyx_max_retries:
                give_up.append(row)
            else:
                requeue.append(
                    (row.id, row.created_at, row.message_id, row.batch_no, row.church_id)
                )
        if looked_up:
            outcome.confirmed = await receipts.apply_receipts(session, looked_up)
        if requeue:
            await session.execute(
                text(
                    "UPDATE message_recipients SET status = 'queued', claimed_at = NULL, "
                    "in_doubt_since = NULL, next_attempt_at = NULL, updated_at = now() "
                    "WHERE (id, created_at) IN (SELECT * FROM unnest("
                    "CAST(:ids AS bigint[]), CAST(:created AS timestamptz[]))) "
                    "AND status = 'sending'"
                ),
                {"ids": [r[0] for r in requeue], "created": [r[1] for r in requeue]},
            )
            outcome.requeued = len(requeue)
            batches = {(r[2], r[1], r[3], r[4]) for r in requeue}
            for message_id, created_at, batch_no, church_id in batches:
                await defer_batch_of(job_app, session, message_id, created_at, church_id, batch_no)
        if give_up:
            await session.execute(
                text(
                    "UPDATE message_recipients SET status = 'failed', "
                    "error_code = 'unconfirmed', finalized_at = now(), updated_at = now(), "
                    "error_detail = 'no answer and no receipt; not resent automatically' "
                    "WHERE (id, created_at) IN (SELECT * FROM unnest("
                    "CAST(:ids AS bigint[]), CAST(:created AS timestamptz[])))"
                ),
                {"ids": [r.id for r in give_up], "created": [r.created_at for r in give_up]},
            )
            tally = Tally(r.message_id for r in give_up)
            await apply_transitions(
                session, [(m, "sending", "failed", n) for m, n in tally.items()]
            )
            for row in give_up:
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
            outcome.failed = len(give_up)
    if outcome.requeued or outcome.failed or outcome.confirmed:
        log.info(
            "sends_reconciled",
            confirmed=outcome.confirmed,
            requeued=outcome.requeued,
            failed=outcome.failed,
        )
    return await _reconcile_replies(context, database, job_app, cutoff, outcome)


async def _lookup(context: SendContext, provider_id: str) -> receipts.Receipt | None:
    try:
        data = await context.telnyx.get_message(provider_id)
    except TelnyxError:
        return None
    return receipts.parse({"data": {"payload": data}}, None)


async def _reconcile_replies(
    context: SendContext, database: Database, job_app: App, cutoff: datetime, outcome: Reconciled
) -> Reconciled:
    settings = context.settings
    async with database.unit_of_work() as session:
        rows = list(
            await session.execute(
                text(
                    "SELECT id, created_at, attempts FROM conversation_messages "
                    "WHERE status = 'sending' AND direction = 'outbound' "
                    "AND coalesce(in_doubt_since, updated_at + make_interval(secs => :lease)) "
                    "< :cutoff LIMIT 200 FOR UPDATE SKIP LOCKED"
                ),
                {"cutoff": cutoff, "lease": settings.send_lease_seconds},
            )
        )
        for row in rows:
            retry = row.attempts <= settings.telnyx_max_retries
            await session.execute(
                text(
                    "UPDATE conversation_messages SET status = :status, in_doubt_since = NULL, "
                    "error_code = CASE WHEN :retry THEN error_code ELSE 'unconfirmed' END, "
                    "updated_at = now() WHERE id = :id AND created_at = :created"
                ),
                {
                    "status": "queued" if retry else "failed",
                    "retry": retry,
                    "id": row.id,
                    "created": row.created_at,
                },
            )
            if retry:
                outcome.requeued += 1
            else:
                outcome.failed += 1
    for row in rows:
        if row.attempts <= settings.telnyx_max_retries:
            await defer_again(job_app, row.id, row.created_at, 0)
    return outcome
