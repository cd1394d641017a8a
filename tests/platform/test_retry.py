"""The shared retry policy: full-jitter backoff bounds, what counts as transient, and a
transaction retried whole (counted in metrics)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.observability import RETRIES
from koinonia.retry import backoff_seconds, in_transaction, is_transient_db_error


@pytest.mark.parametrize(
    ("attempt", "ceiling"), [(1, 1), (2, 2), (3, 4), (4, 8), (5, 16), (6, 32), (9, 32)]
)
def test_backoff_is_full_jitter_up_to_an_exponential_ceiling(attempt: int, ceiling: float) -> None:
    waits = [backoff_seconds(attempt) for _ in range(2000)]
    assert all(0 <= w <= ceiling for w in waits)
    # Full jitter spreads over the whole range, not just near the ceiling.
    assert min(waits) < ceiling * 0.1
    assert max(waits) > ceiling * 0.9
    assert ceiling * 0.4 < sum(waits) / len(waits) < ceiling * 0.6


class _DriverError(Exception):
    def __init__(self, sqlstate: str | None) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


def _db_error(sqlstate: str | None, *, invalidated: bool = False) -> DBAPIError:
    return DBAPIError("SELECT 1", None, _DriverError(sqlstate), connection_invalidated=invalidated)


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (_db_error("40001"), True),  # serialization failure
        (_db_error("40P01"), True),  # deadlock
        (_db_error(None, invalidated=True), True),  # lost connection
        (_db_error("23505"), False),  # unique violation: retrying cannot help
        (_db_error("22P02"), False),  # bad input
        (ValueError("not a database error"), False),
    ],
)
def test_transient_database_errors(error: BaseException, transient: bool) -> None:
    assert is_transient_db_error(error) is transient


async def test_a_transaction_is_retried_whole_and_counted(app: FastAPI) -> None:
    calls: list[int] = []

    async def work(session: AsyncSession) -> Any:
        calls.append(1)
        value = await session.scalar(text("SELECT 41 + 1"))
        if len(calls) < 3:
            raise _db_error("40001")
        return value

    before = RETRIES.labels("test_retry")._value.get()
    outcome = await in_transaction(app.state.database, "SERIALIZABLE", work, operation="test_retry")
    assert (outcome.value, outcome.retries, len(calls)) == (42, 2, 3)
    assert RETRIES.labels("test_retry")._value.get() == before + 2


async def test_a_permanent_error_is_not_retried(app: FastAPI) -> None:
    calls: list[int] = []

    async def work(session: AsyncSession) -> None:
        calls.append(1)
        raise _db_error("23505")

    with pytest.raises(DBAPIError):
        await in_transaction(app.state.database, "READ COMMITTED", work, operation="test_retry")
    assert len(calls) == 1
