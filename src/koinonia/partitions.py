"""Monthly partitions of the partitioned tables, created ahead of time.

App-managed rather than pg_partman: it works on any managed PostgreSQL and is a handful
of idempotent statements. A periodic job and `koinonia partitions ensure` keep at least
`PARTITION_MONTHS_AHEAD` months ready; a row whose month has no partition fails loudly
(there is deliberately no default partition: it would have to be scanned and emptied
before every new partition could be attached).

At the other end, partitions whose whole month is older than `PARTITION_RETENTION_MONTHS`
are detached and dropped (`expired`, `drop_partition`; the retention job), never the
current month or a later one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

PARTITIONED_TABLES = ("message_recipients", "conversation_messages")


def month_start(day: date) -> date:
    return day.replace(day=1)


def add_months(month: date, count: int) -> date:
    index = month.year * 12 + month.month - 1 + count
    return date(index // 12, index % 12 + 1, 1)


def partition_name(table: str, month: date) -> str:
    return f"{table}_p{month:%Y%m}"


def partition_ddl(table: str, month: date) -> str:
    """Idempotent DDL for `table`'s partition holding `month` (UTC month bounds)."""
    upper = add_months(month, 1)
    return (
        f"CREATE TABLE IF NOT EXISTS {partition_name(table, month)} PARTITION OF {table} "
        f"FOR VALUES FROM ('{month.isoformat()} 00:00:00+00') "
        f"TO ('{upper.isoformat()} 00:00:00+00')"
    )


def month_bounds(at: datetime) -> tuple[datetime, datetime]:
    """The range `[start, end)` of the monthly partition holding `at` (UTC month bounds,
    as `partition_ddl` creates them)."""
    month = month_start(at.astimezone(UTC).date())
    upper = add_months(month, 1)
    return (
        datetime(month.year, month.month, 1, tzinfo=UTC),
        datetime(upper.year, upper.month, 1, tzinfo=UTC),
    )


def months_to_ensure(today: date, ahead: int) -> list[date]:
    """The current month and `ahead` months after it."""
    first = month_start(today)
    return [add_months(first, offset) for offset in range(ahead + 1)]


@dataclass(frozen=True)
class PartitionInfo:
    table: str
    name: str
    bounds: str
    rows_estimate: int


async def ensure(
    connection: AsyncConnection, months_ahead: int, today: date | None = None
) -> list[str]:
    """Create the missing partitions; answers the names that were created."""
    today = today or datetime.now(UTC).date()
    existing = {info.name for info in await list_partitions(connection)}
    created: list[str] = []
    for table in PARTITIONED_TABLES:
        for month in months_to_ensure(today, months_ahead):
            name = partition_name(table, month)
            if name not in existing:
                await connection.execute(text(partition_ddl(table, month)))
                created.append(name)
    return created


_UPPER_BOUND = re.compile(r"TO \('(\d{4})-(\d{2})-(\d{2})")


def upper_bound(info: PartitionInfo) -> date | None:
    """The first day after `info`'s range (its `TO` bound), or None if unreadable."""
    match = _UPPER_BOUND.search(info.bounds)
    if match is None:
        return None
    year, month, day = (int(part) for part in match.groups())
    return date(year, month, day)


def expired(
    partitions: list[PartitionInfo], today: date, retention_months: int
) -> list[PartitionInfo]:
    """The partitions whose whole range ends at or before the first day of the month
    `retention_months` before `today`'s. Never one that reaches into the current month
    (or later), whatever `retention_months` is; unreadable bounds are kept."""
    if retention_months < 1:
        raise ValueError("retention_months must be at least 1")
    current = month_start(today)
    cutoff = add_months(current, -retention_months)
    chosen = []
    for info in partitions:
        upper = upper_bound(info)
        if upper is not None and upper <= cutoff and upper <= current:
            chosen.append(info)
    return chosen


async def drop_partition(connection: AsyncConnection, info: PartitionInfo) -> None:
    """Detach `info` from its table and drop it, in the connection's transaction.

    `DETACH PARTITION` takes an exclusive lock on the parent for a moment: a short
    `lock_timeout` makes it give up (and the next run try again) rather than queue the
    table's traffic behind a long transaction. (`DETACH … CONCURRENTLY` cannot run in a
    transaction block nor be bounded by `statement_timeout` through PgBouncer.)
    """
    if info.table not in PARTITIONED_TABLES or not re.fullmatch(r"[a-z0-9_]+", info.name):
        raise ValueError(f"not one of our partitions: {info.table}.{info.name}")
    await connection.execute(text("SELECT set_config('lock_timeout', '2s', true)"))
    await connection.execute(text(f"ALTER TABLE {info.table} DETACH PARTITION {info.name}"))
    await connection.execute(text(f"DROP TABLE {info.name}"))


async def list_partitions(connection: AsyncConnection) -> list[PartitionInfo]:
    rows = await connection.execute(
        text(
            "SELECT parent.relname, child.relname, pg_get_expr(child.relpartbound, child.oid), "
            "greatest(child.reltuples, 0)::bigint "
            "FROM pg_inherits JOIN pg_class parent ON parent.oid = pg_inherits.inhparent "
            "JOIN pg_class child ON child.oid = pg_inherits.inhrelid "
            "WHERE parent.relname = ANY(:tables) ORDER BY parent.relname, child.relname"
        ),
        {"tables": list(PARTITIONED_TABLES)},
    )
    return [PartitionInfo(str(a), str(b), str(c), int(d)) for a, b, c, d in rows]
