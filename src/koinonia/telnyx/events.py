"""Workers apply stored Telnyx events in batches (claimed with SKIP LOCKED, so any
number of workers share the inbox). An event that fails to apply is retried with
exponential backoff over minutes (`RETRY`: its `next_attempt_at` keeps it out of the claim
meanwhile, so events behind it go on) and dead-lettered only after `RETRY.max_attempts`,
with an `inbound_event_dead_lettered` error log and a counter for alerts. An inbound STOP
is already suppressed when its event was stored (event_writer.py); an opt-in lifts an
older suppression here, by event time, so a later STOP always wins.

A signed event whose payload has the wrong shape (`malformed`) is dead-lettered at once
(error code `malformed_event`) instead of being retried. Once an event is applied or
dead-lettered, its phone numbers and text are sealed (privacy.py): encrypted, with only
non-personal fields, `koinonia_ref` and `data.payload.id` readable; a replayed event is
unsealed before it is applied again."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from procrastinate import App
from prometheus_client import Counter
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.conversations.service import apply_reply_receipts, handle_inbound, parse_inbound
from koinonia.db import Database
from koinonia.deadletters import service as dead_letters
from koinonia.members.crypto import ContactCipher
from koinonia.messaging import receipts as broadcast_receipts
from koinonia.messaging import refs
from koinonia.messaging import suppressions as suppression_list
from koinonia.telnyx import privacy

log = structlog.get_logger(__name__)
RECEIPT_TYPES = frozenset({"message.sent", "message.finalized"})
INBOUND_TYPE = "message.received"
EVENTS_DEAD_LETTERED = Counter(
    "koinonia_webhook_events_dead_lettered_total",
    "Telnyx events dead-lettered after every retry failed (inbound: an alert)",
    ["kind"],  # inbound | receipt | other
)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with equal jitter: attempt n waits between half and all of
    `min(cap, base * 2**(n-1))`. The defaults retry for about 20 minutes in all.
    Candidate settings: WEBHOOK_APPLY_MAX_ATTEMPTS, WEBHOOK_APPLY_RETRY_BASE_SECONDS,
    WEBHOOK_APPLY_RETRY_CAP_SECONDS."""

    max_attempts: int = 10
    base_seconds: float = 5.0
    cap_seconds: float = 300.0

    def delay(self, attempts: int) -> float:
        ceiling = min(self.cap_seconds, self.base_seconds * 2 ** max(0, attempts - 1))
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not security


RETRY = RetryPolicy()
MAX_ATTEMPTS = RETRY.max_attempts

CLAIM_SQL = """
SELECT id, event_type, payload, attempts, received_at FROM webhook_events
WHERE provider = 'telnyx' AND processed_at IS NULL
  AND (next_attempt_at IS NULL OR next_attempt_at <= now())
ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED
"""


@dataclass
class Applied:
    events: int = 0
    failed: int = 0


@dataclass(frozen=True)
class EventRow:
    id: int
    event_type: str
    payload: dict[str, Any]
    attempts: int
    received_at: datetime


def malformed(event_type: str, event: dict[str, Any]) -> str | None:
    """Why a stored event cannot be applied whatever the retries (None: it can)."""
    data = event.get("data")
    if not isinstance(data, dict):
        return "data is not an object"
    if event_type not in RECEIPT_TYPES and event_type != INBOUND_TYPE:
        return None
    message = data.get("payload")
    if not isinstance(message, dict):
        return "data.payload is not an object"
    for name in ("to", "errors", "media"):
        value = message.get(name)
        if value is not None and not (
            isinstance(value, list) and all(isinstance(item, dict) for item in value)
        ):
            return f"data.payload.{name} is not a list of objects"
    if message.get("from") is not None and not isinstance(message["from"], dict):
        return "data.payload.from is not an object"
    for name in ("id", "text"):
        if message.get(name) is not None and not isinstance(message[name], str):
            return f"data.payload.{name} is not a string"
    return None


class MalformedEvent(ValueError):  # noqa: N818 - a reason, raised to dead-letter at once
    pass


async def _claim(
    session: AsyncSession, cipher: ContactCipher, limit: int, retry: RetryPolicy
) -> list[EventRow]:
    """Claim a batch, unsealed; events that can never apply are dead-lettered here."""
    rows = []
    for raw in await session.execute(text(CLAIM_SQL), {"limit": limit}):
        row = EventRow(*raw)
        try:
            payload = privacy.unseal(cipher, row.id, row.payload)
            reason = malformed(row.event_type, payload)
            if reason is not None:
                raise MalformedEvent(reason)
        except ValueError as error:  # malformed, or sealed under a key no longer held
            await _failed(session, row, error, retry, cipher, permanent=True)
            continue
        rows.append(EventRow(row.id, row.event_type, payload, row.attempts, row.received_at))
    return rows


async def apply_pending(
    database: Database,
    cipher: ContactCipher,
    job_app: App,
    ref_key: bytes,
    limit: int,
    *,
    retry: RetryPolicy | None = None,
    suppression_key: bytes | None = None,
) -> Applied:
    """Apply one batch; answers how many events were applied (0: the inbox is empty).

    `suppression_key` is the member HMAC key (`suppressions.suppression_key(settings)`);
    by default the one `cipher` was built with, which is the same key."""
    key = suppression_key if suppression_key is not None else cipher._hmac_key
    try:
        async with database.unit_of_work() as session:
            rows = await _claim(session, cipher, limit, retry or RETRY)
            if not rows:
                return Applied()
            await _apply(session, rows, cipher, job_app, ref_key, key)
            await _mark(session, rows, cipher)
            return Applied(events=len(rows))
    except Exception as error:
        log.warning("event_batch_failed", error=type(error).__name__)
    return await _one_by_one(database, cipher, job_app, ref_key, key, limit, retry or RETRY)


async def _apply(
    session: AsyncSession,
    rows: list[EventRow],
    cipher: ContactCipher,
    job_app: App,
    ref_key: bytes,
    suppression_key: bytes,
) -> None:
    to_broadcasts: list[broadcast_receipts.Receipt] = []
    to_replies: list[broadcast_receipts.Receipt] = []
    for row in rows:
        if row.event_type in RECEIPT_TYPES:
            ref = refs.decode(ref_key, row.payload.get("koinonia_ref"))
            receipt = broadcast_receipts.parse(row.payload, ref)
            if receipt is None:
                continue
            if ref is None:  # no reference: it may be either kind; the id finds it
                to_broadcasts.append(receipt)
                to_replies.append(receipt)
            elif ref.kind == "r":
                to_broadcasts.append(receipt)
            else:
                to_replies.append(receipt)
        elif row.event_type == INBOUND_TYPE:
            await _lift_on_opt_in(session, row, suppression_key)
            inbound = parse_inbound(row.payload)
            if inbound is not None:
                outcome = await handle_inbound(session, job_app, cipher, inbound)
                log.info("inbound_applied", outcome=outcome)
    if to_broadcasts:
        await broadcast_receipts.apply_receipts(session, to_broadcasts)
    if to_replies:
        await apply_reply_receipts(session, to_replies)


async def _lift_on_opt_in(session: AsyncSession, row: EventRow, key: bytes) -> None:
    """START/UNSTOP/YES lifts the sender's suppression, unless an opt-out is newer."""
    keyword = suppression_list.inbound_keyword(row.payload, key)
    if keyword is None or keyword.keyword != "opt_in":
        return
    at = keyword.at or row.received_at
    if await suppression_list.lift(session, keyword.sender, keyword.phone_hmac, at):
        log.info("suppression_lifted", webhook_event_id=row.id)


async def _mark(session: AsyncSession, rows: list[EventRow], cipher: ContactCipher) -> None:
    """Applied: processed, and sealed (no plain-text phone or body is kept)."""
    await session.execute(
        text(
            "UPDATE webhook_events w SET processed_at = now(), payload = CAST(u.p AS jsonb) "
            "FROM unnest(CAST(:ids AS bigint[]), CAST(:payloads AS text[])) AS u(i, p) "
            "WHERE w.id = u.i"
        ),
        {
            "ids": [row.id for row in rows],
            "payloads": [json.dumps(privacy.seal(cipher, row.id, row.payload)) for row in rows],
        },
    )


async def _one_by_one(
    database: Database,
    cipher: ContactCipher,
    job_app: App,
    ref_key: bytes,
    suppression_key: bytes,
    limit: int,
    retry: RetryPolicy,
) -> Applied:
    applied = Applied()
    async with database.unit_of_work() as session:
        rows = await _claim(session, cipher, limit, retry)
        for row in rows:
            try:
                async with session.begin_nested():
                    await _apply(session, [row], cipher, job_app, ref_key, suppression_key)
                await _mark(session, [row], cipher)
                applied.events += 1
            except Exception as error:
                applied.failed += 1
                await _failed(session, row, error, retry, cipher)
    return applied


async def _failed(
    session: AsyncSession,
    row: EventRow,
    error: Exception,
    retry: RetryPolicy,
    cipher: ContactCipher,
    *,
    permanent: bool = False,
) -> None:
    attempts = row.attempts + 1
    message = f"{type(error).__name__}: {str(error)[:200]}"
    gave_up = permanent or attempts >= retry.max_attempts
    delay = 0.0 if gave_up else retry.delay(attempts)
    # Dead-lettered: sealed too (a replay unseals it). Still pending: kept as received,
    # so the reconciler and the next attempt read it as they always have.
    payload = privacy.seal(cipher, row.id, row.payload) if gave_up else row.payload
    await session.execute(
        text(
            "UPDATE webhook_events SET attempts = :attempts, last_error = :error, "
            "processed_at = CASE WHEN :gave_up THEN now() END, "
            "payload = CAST(:payload AS jsonb), "
            "next_attempt_at = CASE WHEN :gave_up THEN NULL "
            "ELSE now() + make_interval(secs => :delay) END WHERE id = :id"
        ),
        {
            "attempts": attempts,
            "error": message,
            "gave_up": gave_up,
            "delay": delay,
            "payload": json.dumps(payload),
            "id": row.id,
        },
    )
    if not gave_up:
        log.warning(
            "event_apply_retry_scheduled",
            webhook_event_id=row.id,
            event_type=row.event_type,
            attempts=attempts,
            retry_in_seconds=round(delay, 1),
            error=type(error).__name__,
        )
        return
    kind = (
        "inbound"
        if row.event_type == INBOUND_TYPE
        else "receipt"
        if row.event_type in RECEIPT_TYPES
        else "other"
    )
    EVENTS_DEAD_LETTERED.labels(kind).inc()
    # Never the payload or the error text: either may carry phone numbers. A fresh logger
    # (not the module's cached one): this alert always goes through the logging set up
    # now, even if an app configured later than the module logger was first used.
    structlog.get_logger(__name__).error(
        "inbound_event_dead_lettered" if kind == "inbound" else "webhook_event_dead_lettered",
        webhook_event_id=row.id,
        event_type=row.event_type,
        attempts=attempts,
        error=type(error).__name__,
    )
    await dead_letters.record(
        session,
        kind="webhook.telnyx",
        church_id=None,
        payload={"webhook_event_id": row.id, "event_type": row.event_type},
        error=message,
        error_code="malformed_event" if isinstance(error, MalformedEvent) else None,
        attempts=attempts,
    )
