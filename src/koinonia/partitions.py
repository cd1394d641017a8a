"""Monthly partitions of the partitioned tables, created ahead of time.

App-managed rather than pg_partman: it works on any managed PostgreSQL and is a handful
of idempotent statements. A periodic job and `koinonia partitions ensure` keep at least
`PARTITION_MONTHS_AHEAD` months ready; a row whose month has no partition fails loudly
(there is deliberately no default partition: it would have to be scanned and emptied
before every new partition could be attached).
"""

from __future__ import annotations

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
