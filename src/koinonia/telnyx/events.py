"""Workers apply stored Telnyx events in batches (claimed with SKIP LOCKED, so any
number of workers share the inbox). An event that keeps failing is dead-lettered after
`MAX_ATTEMPTS` instead of blocking the ones behind it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog
from procrastinate import App
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.conversations.service import apply_reply_receipts, handle_inbound, parse_inbound
from koinonia.db import Database
from koinonia.deadletters import service as dead_letters
from koinonia.members.crypto import ContactCipher
from koinonia.messaging import receipts as broadcast_receipts
from koinonia.messaging import refs

log = structlog.get_logger(__name__)
MAX_ATTEMPTS = 5
RECEIPT_TYPES = frozenset({"message.sent", "message.finalized"})

CLAIM_SQL = """
SELECT id, event_type, payload, attempts FROM webhook_events
WHERE provider = 'telnyx' AND processed_at IS NULL
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


async def apply_pending(
    database: Database, cipher: ContactCipher, job_app: App, ref_key: bytes, limit: int
) -> Applied:
    """Apply one batch; answers how many events were applied (0: the inbox is empty)."""
    try:
        async with database.unit_of_work() as session:
            rows = [EventRow(*r) for r in await session.execute(text(CLAIM_SQL), {"limit": limit})]
            if not rows:
                return Applied()
            await _apply(session, rows, cipher, job_app, ref_key)
            await _mark(session, [r.id for r in rows])
            return Applied(events=len(rows))
    except Exception as error:
        log.warning("event_batch_failed", error=type(error).__name__)
    return await _one_by_one(database, cipher, job_app, ref_key, limit)


async def _apply(
    session: AsyncSession,
    rows: list[EventRow],
    cipher: ContactCipher,
    job_app: App,
    ref_key: bytes,
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
        elif row.event_type == "message.received":
            inbound = parse_inbound(row.payload)
            if inbound is not None:
                outcome = await handle_inbound(session, job_app, cipher, inbound)
                log.info("inbound_applied", outcome=outcome)
    if to_broadcasts:
        await broadcast_receipts.apply_receipts(session, to_broadcasts)
    if to_replies:
        await apply_reply_receipts(session, to_replies)


async def _mark(session: AsyncSession, ids: list[int]) -> None:
    await session.execute(
        text("UPDATE webhook_events SET processed_at = now() WHERE id = ANY(:ids)"),
        {"ids": ids},
    )


async def _one_by_one(
    database: Database, cipher: ContactCipher, job_app: App, ref_key: bytes, limit: int
) -> Applied:
    applied = Applied()
    async with database.unit_of_work() as session:
        rows = [EventRow(*r) for r in await session.execute(text(CLAIM_SQL), {"limit": limit})]
        for row in rows:
            try:
                async with session.begin_nested():
                    await _apply(session, [row], cipher, job_app, ref_key)
                await _mark(session, [row.id])
                applied.events += 1
            except Exception as error:
                applied.failed += 1
                await _failed(session, row, error)
    return applied


async def _failed(session: AsyncSession, row: EventRow, error: Exception) -> None:
    attempts = row.attempts + 1
    message = f"{type(error).__name__}: {str(error)[:200]}"
    gave_up = attempts >= MAX_ATTEMPTS
    await session.execute(
        text(
            "UPDATE webhook_events SET attempts = :attempts, last_error = :error, "
            "processed_at = CASE WHEN :gave_up THEN now() END WHERE id = :id"
        ),
        {"attempts": attempts, "error": message, "gave_up": gave_up, "id": row.id},
    )
    if gave_up:
        await dead_letters.record(
            session,
            kind="webhook.telnyx",
            church_id=None,
            payload={"webhook_event_id": row.id, "event_type": row.event_type},
            error=message,
            error_code=None,
            attempts=attempts,
        )
