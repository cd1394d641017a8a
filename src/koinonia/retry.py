"""The shared retry policy (tenacity): what is retried, how long to wait, and counting.

Transactions are retried whole on serialization failures, deadlocks and lost
connections, so code under `SERIALIZABLE` or `REPEATABLE READ` never sees them.
Providers use `provider_wait` (exponential 1 s → 32 s, full jitter) with their own rules
about what is safe to retry.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Generic, TypeVar

import psycopg
import psycopg_pool
import structlog
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncSession
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from koinonia.cache import invalidate_committed, pending_tags
from koinonia.db import Database, IsolationLevel, set_isolation
from koinonia.errors import ServiceUnavailableError
from koinonia.observability import RETRIES

log = structlog.get_logger(__name__)
T = TypeVar("T")

RETRYABLE_SQLSTATES = frozenset(
    {
        "40001",  # serialization failure
        "40P01",  # deadlock
        "57P01",  # admin shutdown (a restart)
        "57P02",  # crash shutdown
        "57P03",  # cannot connect now (starting up)
        "53300",  # too many connections
    }
)


class CommitUnknownError(ServiceUnavailableError):
    """The connection died during COMMIT and the outcome could not be learnt: the client
    retries under its Idempotency-Key, which finds the first answer if it did commit."""

    code = "commit_unknown"
    title = "The outcome of the request is unknown"


def sqlstate(error: BaseException) -> str | None:
    orig = getattr(error, "orig", error)
    return getattr(orig, "sqlstate", None)


def _causes(error: BaseException) -> Iterator[BaseException]:
    """The error and what it wraps: procrastinate wraps driver errors in its own
    `ConnectorException`, SQLAlchemy in `DBAPIError`."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen and len(seen) < 8:
        seen.add(id(current))
        yield current
        if current.__cause__ is not None:
            current = current.__cause__
        else:
            current = None if current.__suppress_context__ else current.__context__


def _is_transient_one(error: BaseException) -> bool:
    if isinstance(error, PoolTimeoutError | psycopg_pool.PoolTimeout | ConnectionError):
        return True
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return True
    if isinstance(error, DBAPIError | psycopg.Error):
        state = sqlstate(error)
        if state is None:
            # No SQLSTATE: the driver could not talk to the server (refused, reset, closed).
            orig = getattr(error, "orig", error)
            return isinstance(orig, psycopg.OperationalError | psycopg.InterfaceError)
        return state in RETRYABLE_SQLSTATES or state.startswith("08")
    return False


def is_transient_db_error(error: BaseException) -> bool:
    """Serialization failures, deadlocks, lost or refused connections, a server restarting
    — from SQLAlchemy, psycopg or the job library, however wrapped."""
    return any(_is_transient_one(e) for e in _causes(error))


def provider_wait(max_seconds: float = 32) -> wait_random_exponential:
    """Full jitter: a random wait in [0, min(max, 1 s × 2^attempt)]."""
    return wait_random_exponential(multiplier=1, max=max_seconds)


def backoff_seconds(attempt: int, max_seconds: float = 32) -> float:
    """The wait before retry number `attempt` (1-based) under `provider_wait`, for work
    that is retried later by re-queueing rather than by sleeping in place."""
    state = SimpleNamespace(attempt_number=attempt)
    return float(provider_wait(max_seconds)(state))  # type: ignore[arg-type]


def _count(operation: str) -> Callable[[RetryCallState], None]:
    def before_sleep(state: RetryCallState) -> None:
        RETRIES.labels(operation).inc()
        error = state.outcome.exception() if state.outcome else None
        log.info(
            "retrying",
            operation=operation,
            attempt=state.attempt_number,
            error=type(error).__name__ if error else None,
            sqlstate=sqlstate(error) if error else None,
        )

    return before_sleep


@dataclass
class Outcome(Generic[T]):
    value: T
    retries: int


async def commit_status(database: Database, xid: str, *, within: float = 3.0) -> str | None:
    """'committed' or 'aborted' for a transaction id noted before its COMMIT, or None when
    that cannot be learnt (the database is still unreachable, or the answer stays
    'in progress' past `within` seconds)."""
    deadline = asyncio.get_running_loop().time() + within
    delay = 0.05
    while True:
        try:
            async with database.sessions() as session:
                status = await session.scalar(
                    text("SELECT pg_xact_status(CAST(:xid AS xid8))"), {"xid": xid}
                )
                await session.rollback()
        except Exception as error:  # any failure means "cannot be learnt yet"
            if not is_transient_db_error(error):
                return None
            status = None
        if status in ("committed", "aborted"):
            return str(status)
        if asyncio.get_running_loop().time() >= deadline:
            return None
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)


class _Committed(Exception):  # noqa: N818 - control flow, never escapes
    def __init__(self, value: object) -> None:
        self.value = value


async def _run_once(
    database: Database,
    isolation: IsolationLevel,
    work: Callable[[AsyncSession], Awaitable[T]],
    operation: str,
) -> T:
    xid: str | None = None
    async with database.sessions() as session:
        await set_isolation(session, isolation)
        try:
            value = await work(session)
            # Noted before COMMIT so that a connection lost during COMMIT can be settled:
            # re-running work whose COMMIT did land would do it twice (a second broadcast).
            xid = str(await session.scalar(text("SELECT pg_current_xact_id()")))
            await session.commit()
        except BaseException as error:
            tags = pending_tags(session)  # the rollback forgets them
            with contextlib.suppress(Exception):  # the connection may be gone
                await session.rollback()
            if xid is None or not is_transient_db_error(error):
                raise
            outcome = await commit_status(database, xid)
            log.warning("commit_outcome_checked", operation=operation, outcome=outcome)
            if outcome != "aborted" and database.cache is not None:
                await database.cache.invalidate(*sorted(tags))  # it landed, or may have
            if outcome == "committed":
                raise _Committed(value) from None
            if outcome is None:
                raise CommitUnknownError(
                    "The database connection was lost while saving; retry with the same "
                    "Idempotency-Key to learn whether it was saved",
                    headers={"Retry-After": "2"},
                ) from error
            raise
        await invalidate_committed(database.cache, session)
        return value


def _retry_whole(error: BaseException) -> bool:
    if isinstance(error, _Committed | CommitUnknownError):
        return False
    return is_transient_db_error(error)


async def in_transaction(
    database: Database,
    isolation: IsolationLevel,
    work: Callable[[AsyncSession], Awaitable[T]],
    *,
    operation: str,
    attempts: int = 10,
) -> Outcome[T]:
    """Run `work` in its own transaction at `isolation`, retrying it whole when transient.

    A COMMIT whose connection died is never re-run blindly: its transaction id, noted
    just before, tells whether it landed (then its value is returned); if that cannot be
    learnt, `CommitUnknownError` is raised instead of a retry.
    """
    retrying = AsyncRetrying(
        retry=retry_if_exception(_retry_whole),
        stop=stop_after_attempt(attempts),
        wait=wait_random_exponential(multiplier=0.01, max=0.5),
        before_sleep=_count(operation),
        reraise=True,
    )
    try:
        async for attempt in retrying:
            with attempt:
                value = await _run_once(database, isolation, work, operation)
    except _Committed as committed:
        value = committed.value  # type: ignore[assignment]
    return Outcome(value, retrying.statistics.get("attempt_number", 1) - 1)
