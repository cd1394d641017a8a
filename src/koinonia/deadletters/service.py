"""The dead-letter queue: recording, replaying, cleaning up and measuring dead letters.

Everything here runs inside the caller's transaction and never commits: a dead letter is
recorded atomically with the state change that gave up on the work, and a replay is
published only if the operator's request commits.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import structlog
from prometheus_client import Counter, Gauge
from sqlalchemy import CursorResult, delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.audit import service as audit
from koinonia.deadletters.registry import ReplayContext, load_replayers
from koinonia.deadletters.tables import DeadLetter
from koinonia.errors import ConflictError

log = structlog.get_logger(__name__)
DEAD_LETTERS = Counter("koinonia_dead_letters_total", "Dead letters recorded", ["kind"])
REPLAYS = Counter(
    "koinonia_dlq_replays_total", "Dead-letter replays by operators", ["kind", "result"]
)
DLQ_SIZE = Gauge("koinonia_dlq_size", "Dead letters currently stored")
DLQ_ALERT = Gauge("koinonia_dlq_alert", "1 when the dead-letter queue is over its threshold")

PENDING, REPLAYING, REPLAYED, REPLAY_FAILED = "pending", "replaying", "replayed", "replay_failed"
REPLAY_STATES = (PENDING, REPLAYING, REPLAYED, REPLAY_FAILED)


async def record(
    session: AsyncSession,
    *,
    kind: str,
    church_id: uuid.UUID | None,
    payload: dict[str, Any],
    error: str,
    error_code: str | None,
    attempts: int,
) -> None:
    """Add a dead letter in the caller's transaction (flushed, never committed)."""
    session.add(
        DeadLetter(
            kind=kind,
            church_id=church_id,
            payload=payload,
            last_error=error[:2000],
            error_code=error_code,
            attempts=attempts,
        )
    )
    await session.flush()
    DEAD_LETTERS.labels(kind).inc()
    # Never the payload or the error text: either may carry phone numbers.
    log.warning("dead_lettered", kind=kind, error_code=error_code, attempts=attempts)


def check_replayable(entry: DeadLetter) -> None:
    """Raise `ConflictError` when `entry` cannot be replayed (unknown kind, already done)."""
    if entry.kind not in load_replayers():
        raise ConflictError(f"this kind cannot be replayed ({entry.kind})")
    if entry.replay_state == REPLAYED:
        raise ConflictError("this dead letter has already been replayed")


async def replay(
    session: AsyncSession,
    context: ReplayContext,
    entry: DeadLetter,
    *,
    actor_id: uuid.UUID | None = None,
) -> None:
    """Run the kind's replayer for `entry` in the caller's transaction and mark it replayed.

    Raises `ConflictError` when the kind has no replayer or the entry was replayed
    already; whatever the replayer raises propagates (the caller decides whether that
    rolls back a savepoint or the whole transaction).
    """
    check_replayable(entry)
    replayer = load_replayers()[entry.kind]
    entry.replay_state = REPLAYING
    await session.flush()
    await replayer(session, context, entry)
    entry.replay_state = REPLAYED
    entry.replayed_at = datetime.now(UTC)
    audit.record(
        session,
        action="dlq.replay",
        church_id=entry.church_id,
        actor_id=actor_id,
        actor_kind="operator",
        target_type="dead_letter",
        target_id=entry.id,
        details={"kind": entry.kind},
    )
    await session.flush()


async def replay_isolated(
    session: AsyncSession,
    context: ReplayContext,
    entry: DeadLetter,
    *,
    actor_id: uuid.UUID | None = None,
) -> str | None:
    """`replay` inside a SAVEPOINT: `None` when it worked, else why it did not.

    A failing replayer rolls back only its own savepoint; the entry is then marked
    `replay_failed` (its original `last_error` is kept) and the rest of the caller's
    transaction goes on.
    """
    try:
        check_replayable(entry)
    except ConflictError as error:
        return error.detail
    kind, entry_id = entry.kind, entry.id
    try:
        async with session.begin_nested():
            await replay(session, context, entry, actor_id=actor_id)
    except Exception as error:  # any replayer failure is reported, not raised
        REPLAYS.labels(kind, "failed").inc()
        detail = f"{type(error).__name__}: {error}"[:500]
        log.warning(
            "dlq_replay_failed", kind=kind, dead_letter_id=entry_id, error=type(error).__name__
        )
        # The savepoint rollback expired what it had changed: read the row again.
        await session.refresh(entry)
        entry.replay_state = REPLAY_FAILED
        await session.flush()
        return detail
    REPLAYS.labels(kind, "replayed").inc()
    log.info("dlq_replayed", kind=kind, dead_letter_id=entry_id)
    return None


async def cleanup(session: AsyncSession, retention_days: int) -> int:
    """Delete dead letters that were replayed more than `retention_days` ago (and created
    before that); how many went. Entries never replayed (`pending`), being replayed or
    whose replay failed stay until an operator replays or deletes them."""
    cutoff = datetime.now(UTC) - timedelta(days=retention_days)
    result = cast(
        "CursorResult[Any]",
        await session.execute(
            delete(DeadLetter).where(
                DeadLetter.replay_state == REPLAYED,
                DeadLetter.created_at < cutoff,
                func.coalesce(DeadLetter.replayed_at, DeadLetter.created_at) < cutoff,
            )
        ),
    )
    deleted = int(result.rowcount or 0)
    if deleted:
        log.info("dead_letters_cleaned", deleted=deleted, retention_days=retention_days)
    return deleted


async def refresh_size_metrics(session: AsyncSession, threshold: int) -> int:
    """Set `koinonia_dlq_size` and `koinonia_dlq_alert` (1 over `threshold`); the size."""
    size = int(await session.scalar(select(func.count()).select_from(DeadLetter)) or 0)
    DLQ_SIZE.set(size)
    over = size > threshold
    DLQ_ALERT.set(1 if over else 0)
    if over:
        log.warning("dlq_over_threshold", size=size, threshold=threshold)
    return size
