"""Monthly partitions: created ahead, idempotently, and pruned by month-bounded queries."""

from __future__ import annotations

from datetime import date

from fastapi import FastAPI
from sqlalchemy import text

from koinonia import partitions


def test_month_arithmetic() -> None:
    assert partitions.months_to_ensure(date(2026, 11, 25), 3) == [
        date(2026, 11, 1),
        date(2026, 12, 1),
        date(2027, 1, 1),
        date(2027, 2, 1),
    ]
    assert partitions.partition_name("message_recipients", date(2027, 1, 1)) == (
        "message_recipients_p202701"
    )


async def test_ensure_is_idempotent_and_creates_ahead(app: FastAPI) -> None:
    async with app.state.database.engine.begin() as connection:
        first = await partitions.ensure(connection, 5)
        again = await partitions.ensure(connection, 5)
        names = {p.name for p in await partitions.list_partitions(connection)}
    assert again == []
    assert len(first) <= 4  # the migration made this month and three ahead
    today = date.today()
    for table in partitions.PARTITIONED_TABLES:
        for month in partitions.months_to_ensure(today, 5):
            assert partitions.partition_name(table, month) in names


async def test_month_bounded_queries_prune_partitions(app: FastAPI) -> None:
    month = partitions.month_start(date.today())
    upper = partitions.add_months(month, 1)
    async with app.state.database.engine.begin() as connection:
        await partitions.ensure(connection, 3)
        for table, where in (
            ("message_recipients", "message_id = gen_random_uuid()"),
            ("conversation_messages", "conversation_id = gen_random_uuid()"),
        ):
            plan = "\n".join(
                row[0]
                for row in await connection.execute(
                    text(
                        f"EXPLAIN SELECT * FROM {table} WHERE {where} "  # noqa: S608
                        "AND created_at >= :lo AND created_at < :hi"
                    ),
                    {"lo": month, "hi": upper},
                )
            )
            this_month = partitions.partition_name(table, month)
            next_month = partitions.partition_name(table, upper)
            assert this_month in plan, plan
            assert next_month not in plan, plan
