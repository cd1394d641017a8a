"""The plans of hot queries, on realistic volumes, as the application issues them.

A scratch database of its own (the shared test database's statistics are whatever the
other tests left): one church with a broadcast of 20,000 recipients among 70 others of
2,000 (160,000 rows in the month's partition, the big one's ids in the middle), and a
ledger where one church has a year of periods — thousands of debits and credits — among
eleven smaller ones. `ANALYZE`d, no planner settings touched: the planner picks the
indexes on its own.

Each statement is the one the code builds (`broadcasts.recipients_page`,
`ledger.debited_total`, `ledger.refunded_total`, and whatever `ledger.refund` runs),
executed through the application's engine (psycopg, `prepare_threshold=None`: unnamed
statements, so every plan is a custom plan for the bound values, as in production) with
`EXPLAIN` put in front of it.

`test_figures_before_and_after` measures `EXPLAIN (ANALYZE, BUFFERS)` of the old recipients
query and of the ledger sums with their index dropped (inside a transaction, rolled back);
the figures are printed at the end of the run (docs/benchmarks.md, "Query plans").
"""

from __future__ import annotations

import statistics
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import psycopg
import pytest
from alembic import command
from fastapi import FastAPI
from sqlalchemy import Executable, event, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from koinonia.billing import ledger
from koinonia.cli.database import alembic_config
from koinonia.db import create_engine
from koinonia.messaging.broadcasts import recipients_page
from tests.conftest import (
    ADMIN_URL,
    create_scratch_database,
    direct_database_url,
    drop_database,
    make_settings,
)
from tests.support.api import Account
from tests.support.report import REPORTS

BIG = 20_000
PAGE = 50  # the API's default page; the query asks for one more row


def _church(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


# The current UTC month: its partition exists (the migrations create it and the next ones).
MONTH = "(date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')"

RECIPIENTS = f"""
INSERT INTO churches (id, name)
SELECT ('00000000-0000-4000-8000-' || lpad(g::text, 12, '0'))::uuid, 'Church ' || g
FROM generate_series(1, 12) g;

-- 71 broadcasts a minute apart, 12 churches; the 61st is church 1's big one.
CREATE TEMP TABLE plan_broadcasts AS
SELECT gen_random_uuid() AS id,
       ('00000000-0000-4000-8000-' || lpad((1 + n % 12)::text, 12, '0'))::uuid AS church_id,
       CASE WHEN n = 60 THEN {BIG} ELSE 2000 END AS size,
       {MONTH} + interval '1 hour' + make_interval(mins => n) AS created_at
FROM generate_series(0, 70) n;

INSERT INTO messages (id, church_id, body, encoding, segments, characters, status,
                      recipients_total, created_at)
SELECT id, church_id, 'Service at 10', 'GSM7', 1, 13, 'sending', size, created_at
FROM plan_broadcasts;

-- Mostly delivered, some sent, failed, undelivered, opted out; ids in creation order.
INSERT INTO message_recipients
  (created_at, church_id, message_id, member_id, batch_no, status, skip_reason, segments)
SELECT b.created_at, b.church_id, b.id, gen_random_uuid(), i / 500,
       CASE WHEN i % 33 = 5 THEN 'skipped' WHEN i % 100 = 7 THEN 'failed'
            WHEN i % 200 = 11 THEN 'undelivered' WHEN i % 25 = 1 THEN 'sent'
            ELSE 'delivered' END,
       CASE WHEN i % 33 = 5 THEN 'opted_out' END,
       CASE WHEN i % 33 = 5 THEN 0 ELSE 1 END
FROM plan_broadcasts b, generate_series(0, b.size - 1) i
ORDER BY b.created_at, i;
"""  # noqa: S608 (constants)

# Church 1: twelve monthly periods; the others: three. Per period: a grant, 40 broadcasts
# (a debit and six refunds each; one in ten replayed twice, each replay debited) and 300
# replies (a debit each, one in five refunded).
LEDGER = f"""
CREATE TEMP TABLE plan_periods AS
SELECT ('00000000-0000-4000-8000-' || lpad(g::text, 12, '0'))::uuid AS church_id, g,
       {MONTH} - make_interval(months => k) AS period_start, k
FROM generate_series(1, 12) g, generate_series(0, 11) k
WHERE g = 1 OR k < 3;

CREATE TEMP TABLE plan_debits AS
SELECT church_id, period_start, gen_random_uuid() AS message_id, b
FROM plan_periods, generate_series(1, 40) b;

INSERT INTO usage_ledger (church_id, period_start, kind, segments, reference)
SELECT church_id, period_start, 'grant', 20000, 'grant:' || period_start FROM plan_periods;

INSERT INTO usage_ledger (church_id, period_start, kind, segments, reference)
SELECT church_id, period_start, 'debit', -500, 'message:' || message_id FROM plan_debits;

INSERT INTO usage_ledger (church_id, period_start, kind, segments, reference)
SELECT church_id, period_start, 'debit', -1, 'message:' || message_id || ':replay:' || r
FROM plan_debits, generate_series(1, 2) r WHERE b % 10 = 0;

INSERT INTO usage_ledger (church_id, period_start, kind, segments, reference)
SELECT church_id, period_start, 'credit', 3,
       'message:' || message_id || ':' || (ARRAY['unsent', 'cancel', 'unconfirmed'])[1 + r % 3]
       || ':' || left(md5(message_id::text || r), 12)
FROM plan_debits, generate_series(1, 6) r;

INSERT INTO usage_ledger (church_id, period_start, kind, segments, reference)
SELECT church_id, period_start, 'debit', -1,
       'reply:' || (g * 1000000 + k * 1000 + r) || ':' || (period_start + make_interval(mins => r))
FROM plan_periods, generate_series(1, 300) r;

INSERT INTO usage_ledger (church_id, period_start, kind, segments, reference)
SELECT church_id, period_start, 'credit', 1,
       'reply:' || (g * 1000000 + k * 1000 + r) || ':' || (period_start + make_interval(mins => r))
       || ':failed:' || left(md5(r::text), 12)
FROM plan_periods, generate_series(1, 300, 5) r;
"""  # noqa: S608 (constants)

# The recipients query as the route issued it before `recipients_page` (for the figures).
OLD_RECIPIENTS_SQL = (
    "SELECT id, member_id, status, skip_reason, segments, attempts, "
    "provider_message_id, error_code, error_detail, sent_at, finalized_at, "
    "in_doubt_since IS NOT NULL OR (status = 'sending') AS in_doubt "
    "FROM message_recipients WHERE message_id = :id AND created_at = :created "
    "AND id > :after AND (CAST(:status AS text) IS NULL OR status = :status) "
    "ORDER BY id LIMIT :limit"
)


@dataclass(frozen=True)
class Volumes:
    database: str
    broadcast: uuid.UUID
    created_at: datetime
    middle: int  # the id after which the broadcast's 10,000th-and-on recipients come
    tail: int  # the id after which its last 10 come: the last page is short
    church: uuid.UUID
    debit_reference: str  # church 1's newest replayed broadcast
    debited: int
    refunded: int


def _connect(name: str) -> psycopg.Connection[Any]:
    return psycopg.connect(ADMIN_URL.rsplit("/", 1)[0] + "/" + name)


@pytest.fixture(scope="module")
def volumes() -> Iterator[Volumes]:
    name = create_scratch_database("koinonia_plans")
    try:
        command.upgrade(alembic_config(direct_database_url(name)), "heads")
        with _connect(name) as connection:
            connection.execute(RECIPIENTS)
            connection.execute(LEDGER)
            connection.commit()
            connection.autocommit = True
            connection.execute("ANALYZE")
            broadcast, created_at = connection.execute(
                "SELECT id, created_at FROM messages WHERE recipients_total = %s", (BIG,)
            ).fetchone() or (None, None)
            (middle,) = connection.execute(
                "SELECT id FROM message_recipients WHERE message_id = %s "
                "ORDER BY id OFFSET 9999 LIMIT 1",
                (broadcast,),
            ).fetchone() or (None,)
            (tail,) = connection.execute(
                "SELECT id FROM message_recipients WHERE message_id = %s "
                "ORDER BY id DESC OFFSET 10 LIMIT 1",
                (broadcast,),
            ).fetchone() or (None,)
            church = uuid.UUID(_church(1))
            (replayed,) = connection.execute(
                "SELECT reference FROM usage_ledger WHERE church_id = %s AND kind = 'debit' "
                "AND reference LIKE 'message:%%:replay:1' ORDER BY period_start DESC LIMIT 1",
                (church,),
            ).fetchone() or (None,)
            debit_reference = str(replayed).removesuffix(":replay:1")
            # The expected sums without LIKE: exact prefixes.
            debited, refunded = connection.execute(
                "SELECT -sum(segments) FILTER (WHERE kind = 'debit' AND (reference = %(r)s "
                "OR starts_with(reference, %(r)s || ':replay:'))), "
                "sum(segments) FILTER (WHERE kind = 'credit' "
                "AND starts_with(reference, %(r)s || ':')) "
                "FROM usage_ledger WHERE church_id = %(c)s",
                {"r": debit_reference, "c": church},
            ).fetchone() or (None, None)
        yield Volumes(
            name,
            broadcast,
            created_at,
            int(middle),
            int(tail),
            church,
            debit_reference,
            int(debited),
            int(refunded),
        )
    finally:
        drop_database(name)


@pytest.fixture(scope="module")
async def engine(volumes: Volumes) -> AsyncIterator[AsyncEngine]:
    url = direct_database_url(volumes.database)
    # The application's engine: same driver and connect arguments (no prepared statements).
    database_engine = create_engine(url, make_settings(database_url=url), name="plans")
    yield database_engine
    await database_engine.dispose()


@asynccontextmanager
async def session_of(engine: AsyncEngine) -> AsyncIterator[AsyncSession]:
    async with AsyncSession(engine) as session:
        try:
            yield session
        finally:
            await session.rollback()


async def explain(session: AsyncSession, statement: Executable, options: str = "") -> Any:
    """`EXPLAIN (FORMAT JSON[, options])` of `statement` exactly as SQLAlchemy and psycopg
    send it (same SQL text, same bound parameters): the plan's top node."""
    connection = await session.connection()
    sync = connection.sync_connection
    assert sync is not None

    def prefix(
        conn: Connection, cursor: Any, sql: str, parameters: Any, context: Any, many: bool
    ) -> tuple[str, Any]:
        return f"EXPLAIN (FORMAT JSON{', ' + options if options else ''}) {sql}", parameters

    event.listen(sync, "before_cursor_execute", prefix, retval=True)
    try:
        (document,) = (await session.execute(statement)).one()
    finally:
        event.remove(sync, "before_cursor_execute", prefix)
    return document[0]


@asynccontextmanager
async def plans_of_selects(session: AsyncSession) -> AsyncIterator[list[tuple[str, Any]]]:
    """Every SELECT the session runs meanwhile, with its plan (explained on the same
    cursor, with the same parameters, just before it runs)."""
    connection = await session.connection()
    sync = connection.sync_connection
    assert sync is not None
    seen: list[tuple[str, Any]] = []

    def capture(
        conn: Connection, cursor: Any, sql: str, parameters: Any, context: Any, many: bool
    ) -> None:
        if sql.lstrip().upper().startswith("SELECT"):
            cursor.execute(f"EXPLAIN (FORMAT JSON) {sql}", parameters)
            seen.append((sql, cursor.fetchone()[0][0]))

    event.listen(sync, "before_cursor_execute", capture)
    try:
        yield seen
    finally:
        event.remove(sync, "before_cursor_execute", capture)


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


def describe(plan: dict[str, Any], depth: int = 0) -> str:
    node = plan
    what = " ".join(
        str(node[key])
        for key in ("Node Type", "Index Name", "Relation Name", "Index Cond", "Filter")
        if key in node
    )
    lines = ["  " * depth + what]
    lines += [describe(child, depth + 1) for child in node.get("Plans", [])]
    return "\n".join(lines)


async def partition_indexes(session: AsyncSession, parent_index: str) -> set[str]:
    """The partitions' own indexes attached to `parent_index`."""
    rows = await session.execute(
        text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = CAST(:index AS regclass)"
        ),
        {"index": parent_index},
    )
    return set(rows.scalars())


# --- the recipients list ------------------------------------------------------------


@pytest.mark.parametrize("page", ["first", "middle", "last"])
@pytest.mark.parametrize(
    ("status", "index"),
    [
        (None, "ix_message_recipients_message_id"),
        ("failed", "ix_message_recipients_list"),  # 1 %
        ("delivered", "ix_message_recipients_list"),  # 86 %
    ],
)
async def test_a_recipients_page_reads_its_rows_in_id_order_from_the_index(
    engine: AsyncEngine, volumes: Volumes, status: str | None, page: str, index: str
) -> None:
    after = {"first": 0, "middle": volumes.middle, "last": volumes.tail}[page]
    statement = recipients_page(
        volumes.broadcast, volumes.created_at, after=after, status=status, limit=PAGE + 1
    )
    async with session_of(engine) as session:
        plan = (await explain(session, statement, "ANALYZE, BUFFERS"))["Plan"]
        expected_indexes = await partition_indexes(session, index)
        rows = (await session.execute(statement)).all()
        remaining = await session.scalar(
            text(
                "SELECT count(*) FROM message_recipients WHERE message_id = :id "
                "AND id > :after AND (CAST(:status AS text) IS NULL OR status = :status)"
            ),
            {"id": volumes.broadcast, "after": after, "status": status},
        )
    expected = min(PAGE + 1, int(remaining or 0))
    assert page == "last" or expected == PAGE + 1
    shape = describe(plan)
    every = list(nodes(plan))
    assert not [n for n in every if "Sort" in n["Node Type"]], shape
    scans = [n for n in every if "Relation Name" in n]
    # One partition, one ordered index scan that stops after the page.
    assert len(scans) == 1, shape
    (scan,) = scans
    assert scan["Node Type"] == "Index Scan", shape
    assert scan["Index Name"] in expected_indexes, shape
    assert scan["Actual Rows"] == expected, shape
    assert scan.get("Rows Removed by Filter", 0) == 0, shape
    # The page and the plan's last heap/index pages: a handful of buffers, whatever the page.
    assert plan["Shared Hit Blocks"] + plan.get("Shared Read Blocks", 0) <= 120, shape
    # And it is the right page.
    assert len(rows) == expected
    ids = [r.id for r in rows]
    assert ids == sorted(ids) and all(i > after for i in ids)
    assert status is None or {r.status for r in rows} <= {status}


async def test_the_api_pages_through_a_broadcast_once_in_id_order(
    client: httpx.AsyncClient, app: FastAPI, owner: Account
) -> None:
    """The route issues `recipients_page` with the cursor's id: every recipient once, in
    order, with and without a status filter (the test database, through the API)."""
    message_id = uuid.uuid4()
    async with app.state.database.unit_of_work() as session:
        await session.execute(
            text(
                "INSERT INTO messages (id, church_id, body, encoding, segments, characters, "
                "status, recipients_total) "
                "VALUES (:id, :church, 'Choir at 7', 'GSM7', 1, 10, 'sending', 40)"
            ),
            {"id": message_id, "church": uuid.UUID(owner.church_id)},
        )
        await session.execute(
            text(
                "INSERT INTO message_recipients (created_at, church_id, message_id, member_id, "
                "batch_no, status, segments) "
                "SELECT m.created_at, m.church_id, m.id, gen_random_uuid(), 0, "
                "CASE WHEN i % 3 = 0 THEN 'failed' ELSE 'delivered' END, 1 "
                "FROM messages m, generate_series(1, 40) i WHERE m.id = :id ORDER BY i"
            ),
            {"id": message_id},
        )
    async with app.state.database.unit_of_work() as session:
        rows = (
            await session.execute(
                text("SELECT id, status FROM message_recipients WHERE message_id = :id"),
                {"id": message_id},
            )
        ).all()
    for status in (None, "failed"):
        seen: list[str] = []
        cursor: str | None = None
        while True:
            params = {"limit": "7", **({"status": status} if status else {})}
            if cursor:
                params["cursor"] = cursor
            answer = await client.get(
                f"/api/v1/messages/{message_id}/recipients", params=params, headers=owner.headers
            )
            assert answer.status_code == 200, answer.text
            seen += [r["id"] for r in answer.json()["data"]]
            cursor = answer.json()["next_cursor"]
            if cursor is None:
                break
        expected = sorted(r.id for r in rows if status is None or r.status == status)
        assert seen == [str(i) for i in expected]


async def test_the_page_after_the_last_is_empty_and_the_statement_stays_in_one_partition(
    engine: AsyncEngine, volumes: Volumes
) -> None:
    async with session_of(engine) as session:
        last = await session.scalar(
            text("SELECT max(id) FROM message_recipients WHERE message_id = :id"),
            {"id": volumes.broadcast},
        )
        statement = recipients_page(
            volumes.broadcast, volumes.created_at, after=int(last), status=None, limit=PAGE + 1
        )
        plan = (await explain(session, statement))["Plan"]
        assert (await session.execute(statement)).all() == []
    relations = {n["Relation Name"] for n in nodes(plan) if "Relation Name" in n}
    assert relations == {f"message_recipients_p{volumes.created_at:%Y%m}"}, describe(plan)


# --- the refund cap ---------------------------------------------------------------


def assert_index_ranges(plan: dict[str, Any], index: str) -> None:
    """Only index ranges of `index` on `reference` find the rows: no Seq Scan, no
    walk over the church's rows (`ix_usage_ledger_church_period`), no row read and
    thrown away."""
    shape = describe(plan)
    every = list(nodes(plan))
    assert not [n for n in every if n["Node Type"] == "Seq Scan"], shape
    index_scans = [n for n in every if "Index Name" in n]
    assert index_scans, shape
    for node in index_scans:
        assert node["Index Name"] == index, shape
        assert "reference" in node["Index Cond"], shape
        if "~~" in node.get("Filter", "") or "~>=~" in node["Index Cond"]:
            assert "~>=~" in node["Index Cond"] and "~<~" in node["Index Cond"], shape
    for node in every:
        assert node.get("Rows Removed by Filter", 0) == 0, shape
        assert node.get("Rows Removed by Index Recheck", 0) == 0, shape


async def test_the_refund_cap_sums_are_index_ranges(engine: AsyncEngine, volumes: Volumes) -> None:
    debited = ledger.debited_total(volumes.church, volumes.debit_reference)
    refunded = ledger.refunded_total(volumes.church, volumes.debit_reference)
    async with session_of(engine) as session:
        debited_plan = (await explain(session, debited, "ANALYZE"))["Plan"]
        refunded_plan = (await explain(session, refunded, "ANALYZE"))["Plan"]
        assert await session.scalar(debited) == volumes.debited == 502
        assert await session.scalar(refunded) == volumes.refunded == 18
    assert_index_ranges(debited_plan, "ix_usage_ledger_debit_reference")
    # Both arms: the debit itself (equality) and its replays (a prefix range).
    conditions = [n["Index Cond"] for n in nodes(debited_plan) if "Index Cond" in n]
    assert any("~>=~" in c for c in conditions), describe(debited_plan)
    assert any("~>=~" not in c for c in conditions), describe(debited_plan)
    assert_index_ranges(refunded_plan, "ix_usage_ledger_credit_reference")


async def test_every_select_refund_runs_is_an_index_lookup(
    engine: AsyncEngine, volumes: Volumes
) -> None:
    async with session_of(engine) as session:
        async with plans_of_selects(session) as seen:
            amount = await ledger.refund(
                session,
                volumes.church,
                10_000,
                debit_reference=volumes.debit_reference,
                credit_reference=f"{volumes.debit_reference}:cancel:plans",
            )
        assert amount == volumes.debited - volumes.refunded
    ledger_selects = [(sql, plan) for sql, plan in seen if "usage_ledger" in sql]
    assert len(ledger_selects) == 3  # the debit, what was debited, what was refunded
    for _, plan in ledger_selects:
        every = list(nodes(plan["Plan"]))
        assert not [n for n in every if n["Node Type"] == "Seq Scan"], describe(plan["Plan"])
        for node in every:
            if "Index Name" in node:
                assert node["Index Name"] != "ix_usage_ledger_church_period"
                assert "reference" in node["Index Cond"], describe(plan["Plan"])


async def test_like_wildcards_in_a_reference_match_only_themselves(
    engine: AsyncEngine, volumes: Volumes
) -> None:
    """References are built by the code (`message:<uuid>`, `reply:<id>:<time>`), not
    typed by users, but the prefix is escaped anyway: `_` and `%` are literal."""
    wild = "test:a_b%c"
    rows = [
        ("debit", -10, wild),
        ("debit", -2, f"{wild}:replay:1"),
        ("credit", 3, f"{wild}:cancel:1"),
        # Look-alikes an unescaped `LIKE 'test:a_b%c:…%'` would count.
        ("debit", -100, "test:aXbYYc:replay:1"),
        ("credit", 50, "test:aXbYYc:cancel:1"),
        ("credit", 40, "test:a_b%cZ:cancel:1"),
    ]
    async with session_of(engine) as session:
        await session.execute(
            text(
                "INSERT INTO usage_ledger (church_id, period_start, kind, segments, reference) "
                "VALUES (:church, now(), :kind, :segments, :reference)"
            ),
            [
                {"church": volumes.church, "kind": k, "segments": s, "reference": r}
                for k, s, r in rows
            ],
        )
        assert await session.scalar(ledger.debited_total(volumes.church, wild)) == 12
        assert await session.scalar(ledger.refunded_total(volumes.church, wild)) == 3
        plan = (await explain(session, ledger.refunded_total(volumes.church, wild)))["Plan"]
        # The escaped prefix is still a range, the whole of it: no wildcard cut it short.
        assert "'test:a_b%c:'" in str(
            [n.get("Index Cond") for n in nodes(plan) if "Index Cond" in n]
        ), describe(plan)
        refunded = await ledger.refund(
            session, volumes.church, 100, debit_reference=wild, credit_reference=f"{wild}:x:1"
        )
        assert refunded == 12 - 3


# --- figures ------------------------------------------------------------------------


async def _measure(session: AsyncSession, statement: Executable) -> tuple[float, int, str]:
    """Median execution time (ms) of 7 `EXPLAIN (ANALYZE, BUFFERS)` runs, the buffers
    touched, and the plan's shape."""
    times = []
    for _ in range(7):
        document = await explain(session, statement, "ANALYZE, BUFFERS")
        times.append(float(document["Execution Time"]))
    top = document["Plan"]
    buffers = int(top.get("Shared Hit Blocks", 0)) + int(top.get("Shared Read Blocks", 0))
    return statistics.median(times), buffers, describe(top).replace("\n", " /")


async def test_figures_before_and_after(engine: AsyncEngine, volumes: Volumes) -> None:
    figures: list[tuple[str, tuple[float, int, str], tuple[float, int, str]]] = []
    for label, after in (
        ("first page", 0),
        ("page from the middle", volumes.middle),
        ("last page (10 rows)", volumes.tail),
    ):
        old = text(OLD_RECIPIENTS_SQL).bindparams(
            id=volumes.broadcast,
            created=volumes.created_at,
            after=after,
            status=None,
            limit=PAGE + 1,
        )
        new = recipients_page(
            volumes.broadcast, volumes.created_at, after=after, status=None, limit=PAGE + 1
        )
        async with session_of(engine) as session:
            figures.append(
                (f"recipients, {label}", await _measure(session, old), await _measure(session, new))
            )
    for label, statement, index in (
        (
            "refund cap: debited",
            ledger.debited_total(volumes.church, volumes.debit_reference),
            "ix_usage_ledger_debit_reference",
        ),
        (
            "refund cap: refunded",
            ledger.refunded_total(volumes.church, volumes.debit_reference),
            "ix_usage_ledger_credit_reference",
        ),
    ):
        async with session_of(engine) as session:
            after_figures = await _measure(session, statement)
            await session.execute(text(f"DROP INDEX {index}"))
            before_figures = await _measure(session, statement)
            # (rolled back by session_of)
        figures.append((f"{label} (without {index})", before_figures, after_figures))
    for label, before, after in figures:
        REPORTS.append(
            f"query plans — {label}: before {before[0]:.3f} ms, {before[1]} buffers "
            f"[{before[2]}]; after {after[0]:.3f} ms, {after[1]} buffers [{after[2]}]"
        )
    # Here a middle page happens to be cheap either way (the old plan walks the primary key
    # from the cursor, and this broadcast's ids are contiguous); the others are not.
    assert all(after[1] <= max(before[1], 10) for _, before, after in figures)
    assert all(
        after[1] * 10 < before[1] for label, before, after in figures if "middle" not in label
    )
