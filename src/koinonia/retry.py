"""The shared retry policy (tenacity): what is retried, how long to wait, and counting.

Transactions are retried whole on serialization failures, deadlocks and lost
connections, so code under `SERIALIZABLE` or `REPEATABLE READ` never sees them.
Providers use `provider_wait` (exponential 1 s → 32 s, full jitter) with their own rules
about what is safe to retry.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Generic, TypeVar

import structlog
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from koinonia.db import Database, IsolationLevel
from koinonia.observability import RETRIES

log = structlog.get_logger(__name__)
T = TypeVar("T")

RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})  # serialization failure, deadlock


def sqlstate(error: BaseException) -> str | None:
    orig = getattr(error, "orig", None)
    return getattr(orig, "sqlstate", None)


def is_transient_db_error(error: BaseException) -> bool:
    if not isinstance(error, DBAPIError):
        return False
    return sqlstate(error) in RETRYABLE_SQLSTATES or bool(error.connection_invalidated)


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


async def in_transaction(
    database: Database,
    isolation: IsolationLevel,
    work: Callable[[AsyncSession], Awaitable[T]],
    *,
    operation: str,
    attempts: int = 10,
) -> Outcome[T]:
    """Run `work` in its own transaction at `isolation`, retrying it whole when transient."""
    retrying = AsyncRetrying(
        retry=retry_if_exception(is_transient_db_error),
        stop=stop_after_attempt(attempts),
        wait=wait_random_exponential(multiplier=0.01, max=0.5),
        before_sleep=_count(operation),
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            async with database.unit_of_work(isolation) as session:
                value = await work(session)
    return Outcome(value, retrying.statistics.get("attempt_number", 1) - 1)
