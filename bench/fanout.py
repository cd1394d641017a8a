"""Fan-out of one broadcast to 100,000 members against a raw INSERT … SELECT, in one run.

    uv run python -m bench.fanout [--members 100000] [--runs 3] [--warmup 1] [--explain]
    .venv/bin/python -m bench.fanout --members 5000        # quick check

Setup (not timed): a scratch database migrated to head, Redis DB 14 (flushed at start;
the tests use 15), the real app (`create_app`) run in-process with its lifespan and
driven through `httpx.ASGITransport`, a church registered through the API, an assigned
sending number and a segment grant, N members COPYed into one group (distinct valid
E.164 phones, encrypted and blind-indexed with `ContactCipher`), then ANALYZE.

Timed, alternately (baseline, koinonia, baseline, koinonia, …), a fresh message each time:

* baseline: plain psycopg, one transaction (READ COMMITTED) holding one
  `INSERT INTO message_recipients (…) SELECT … FROM group_members JOIN members …` that
  writes the same N rows (same columns, same `batch_no` numbering, current month's
  partition of the same partitioned table and its indexes), then COMMIT;
* koinonia: `POST /api/v1/messages {"body": …, "group_ids": [group]}` (202), the
  whole broadcast creation: authentication, audience checks, segment estimate, the
  message row, the fan-out INSERT … SELECT (`FAN_OUT_SQL`) in a SERIALIZABLE
  transaction, the ledger debit, one procrastinate `send_batch` job per 1,000
  recipients, COMMIT, the JSON answer.

Each Koinonia run is checked: N recipient rows for the message, ceil(N / batch size)
`send_batch` jobs in `procrastinate_jobs`. The medians are compared (target: fan-out
<= 3x the raw INSERT … SELECT). A client-side breakdown of the Koinonia request (time in
the fan-out statement, in other SQLAlchemy statements, and the rest: job deferrals,
COMMIT, HTTP) and the server's top statements from pg_stat_statements (when the server
preloads it) show where the time goes; `--explain` adds EXPLAIN (ANALYZE, BUFFERS) of
both statements, each in a rolled-back transaction.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import httpx
import psycopg
from redis import Redis

from bench.common import (
    copy_members,
    give_number,
    phone_of,
    plain_url,
    scratch_database,
    settings_for,
)

TARGET = 3.0  # fan-out / raw INSERT … SELECT
REDIS_URL = "redis://127.0.0.1:6379/14"  # tests use 15, bench.send_throughput 13
AREA = "614"
BODY = "Service starts at 10am this Sunday; the potluck follows in the hall. See you there!"
BATCH_TASK = "messaging:send_batch"

BASELINE_SQL = """
INSERT INTO message_recipients
  (created_at, church_id, message_id, member_id, batch_no, status, segments)
SELECT now(), m.church_id, %(message_id)s, m.id,
       (row_number() OVER (ORDER BY m.id) - 1) / %(batch_size)s, 'queued', %(segments)s
FROM group_members gm JOIN members m ON m.id = gm.member_id
WHERE gm.group_id = %(group_id)s AND m.church_id = %(church_id)s
  AND m.deleted_at IS NULL AND NOT m.opted_out
"""


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Breakdown:
    """Client-side seconds per kind of SQLAlchemy statement, for the current request."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def reset(self) -> None:
        self.seconds.clear()
        self.counts.clear()


def statement_kind(statement: str) -> str:
    if "INSERT INTO message_recipients" in statement:
        return "fan-out INSERT…SELECT"
    if "FROM members m" in statement:
        return "audience / estimate"
    return "other SQL"


def instrument(engine: Any, breakdown: Breakdown) -> None:
    """Times every statement the app's primary engine runs (procrastinate's deferrals go
    through the raw psycopg connection and are not seen here)."""
    from sqlalchemy import event

    starts: list[float] = []

    def before(*args: Any) -> None:
        starts.append(time.perf_counter())

    def after(_conn: Any, _cursor: Any, statement: str, *rest: Any) -> None:
        kind = statement_kind(statement)
        breakdown.seconds[kind] += time.perf_counter() - starts.pop()
        breakdown.counts[kind] += 1

    event.listen(engine.sync_engine, "before_cursor_execute", before)
    event.listen(engine.sync_engine, "after_cursor_execute", after)


# --- setup ------------------------------------------------------------------------------


async def stat_statements(url: str) -> bool:
    """pg_stat_statements in the scratch database, reset for it; False if unavailable."""
    async with await psycopg.AsyncConnection.connect(plain_url(url), autocommit=True) as c:
        try:
            await c.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            await c.execute(
                "SELECT pg_stat_statements_reset(0, "
                "(SELECT oid FROM pg_database WHERE datname = current_database()), 0)"
            )
            await c.execute("SELECT count(*) FROM pg_stat_statements")
        except psycopg.Error:
            return False
    return True


# --- the two sides ----------------------------------------------------------------------


@dataclass
class Shared:
    url: str
    church_id: uuid.UUID
    group_id: uuid.UUID
    members: int
    batch_size: int


async def baseline(shared: Shared, segments: int) -> tuple[float, int, int]:
    """Seconds for one raw INSERT … SELECT (and its COMMIT); rows and batches written."""
    message_id = uuid.uuid4()
    async with await psycopg.AsyncConnection.connect(plain_url(shared.url)) as connection:
        await connection.execute("SELECT 1")  # connected and idle before the clock starts
        await connection.commit()
        start = time.perf_counter()
        async with connection.transaction():
            cursor = await connection.execute(
                BASELINE_SQL,
                {
                    "message_id": message_id,
                    "batch_size": shared.batch_size,
                    "segments": segments,
                    "group_id": shared.group_id,
                    "church_id": shared.church_id,
                },
            )
            rows = cursor.rowcount
        elapsed = time.perf_counter() - start
        found = await (
            await connection.execute(
                "SELECT count(*), count(DISTINCT batch_no) FROM message_recipients "
                "WHERE message_id = %s",
                (message_id,),
            )
        ).fetchone()
        await connection.commit()
    assert found is not None and found[0] == rows == shared.members, (found, rows)
    return elapsed, int(found[0]), int(found[1])


@dataclass
class Created:
    seconds: float
    message_id: uuid.UUID
    recipients: int
    batches: int
    jobs: int
    segments: int
    breakdown: dict[str, float]
    statements: dict[str, int]


async def koinonia(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    shared: Shared,
    body: str,
    breakdown: Breakdown,
) -> Created:
    payload = {"body": body, "group_ids": [str(shared.group_id)]}
    breakdown.reset()
    start = time.perf_counter()
    response = await client.post("/api/v1/messages", json=payload, headers=headers)
    elapsed = time.perf_counter() - start
    assert response.status_code == 202, response.text
    answer = response.json()
    message_id = uuid.UUID(answer["id"])
    async with await psycopg.AsyncConnection.connect(plain_url(shared.url)) as connection:
        found = await (
            await connection.execute(
                "SELECT count(*), count(DISTINCT r.batch_no) FROM message_recipients r "
                "JOIN messages m ON m.id = r.message_id AND m.created_at = r.created_at "
                "WHERE r.message_id = %s AND r.status = 'queued'",
                (message_id,),
            )
        ).fetchone()
        jobs = await (
            await connection.execute(
                "SELECT count(*) FROM procrastinate_jobs "
                "WHERE task_name = %s AND args->>'message_id' = %s",
                (BATCH_TASK, str(message_id)),
            )
        ).fetchone()
    assert found is not None and jobs is not None
    expected_batches = -(-shared.members // shared.batch_size)
    assert found[0] == answer["recipients_total"] == shared.members, (found, answer)
    assert found[1] == jobs[0] == expected_batches, (found, jobs, expected_batches)
    return Created(
        elapsed,
        message_id,
        int(found[0]),
        int(found[1]),
        int(jobs[0]),
        int(answer["segments"]),
        dict(breakdown.seconds),
        dict(breakdown.counts),
    )


# --- diagnosis --------------------------------------------------------------------------


async def top_statements(url: str, limit: int = 8) -> list[tuple[str, int, float, float]]:
    async with await psycopg.AsyncConnection.connect(plain_url(url), autocommit=True) as c:
        cursor = await c.execute(
            "SELECT query, calls, total_exec_time, mean_exec_time FROM pg_stat_statements "
            "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND query NOT ILIKE '%%pg_stat_statements%%' "
            "ORDER BY total_exec_time DESC LIMIT %s",
            (limit,),
        )
        return [
            (str(q), int(n), float(total), float(mean))
            for q, n, total, mean in await cursor.fetchall()
        ]


async def explain(app: Any, shared: Shared, segments: int) -> tuple[str, str]:
    """EXPLAIN (ANALYZE, BUFFERS) of Koinonia's fan-out statement (SERIALIZABLE, through
    the app's engine, as `create` runs it) and of the baseline, both rolled back."""
    from sqlalchemy import text

    from koinonia.messaging.broadcasts import FAN_OUT_SQL

    message_id = uuid.uuid4()
    async with app.state.database.sessions() as session:
        await session.connection(execution_options={"isolation_level": "SERIALIZABLE"})
        created_at = (await session.execute(text("SELECT now()"))).scalar_one()
        result = await session.execute(
            text("EXPLAIN (ANALYZE, BUFFERS) " + FAN_OUT_SQL),
            {
                "church_id": shared.church_id,
                "member_ids": [],
                "group_ids": [shared.group_id],
                "created_at": created_at,
                "message_id": message_id,
                "batch_size": shared.batch_size,
                "segments": segments,
            },
        )
        fan_out = "\n".join(str(line) for (line,) in result)
        await session.rollback()
    async with await psycopg.AsyncConnection.connect(plain_url(shared.url)) as connection:
        cursor = await connection.execute(
            "EXPLAIN (ANALYZE, BUFFERS) " + BASELINE_SQL,
            {
                "message_id": uuid.uuid4(),
                "batch_size": shared.batch_size,
                "segments": segments,
                "group_id": shared.group_id,
                "church_id": shared.church_id,
            },
        )
        raw = "\n".join(str(line) for (line,) in await cursor.fetchall())
        await connection.rollback()
    return fan_out, raw


# --- the run ----------------------------------------------------------------------------


@dataclass
class Results:
    baseline: list[float] = field(default_factory=list)
    koinonia: list[Created] = field(default_factory=list)
    warmup: list[tuple[float, float]] = field(default_factory=list)
    baseline_batches: int = 0
    statements: list[tuple[str, int, float, float]] = field(default_factory=list)
    plans: tuple[str, str] | None = None
    setup_seconds: float = 0.0
    load_before: float = 0.0  # 1-minute load average around the timed runs
    load_after: float = 0.0


async def run(url: str, args: argparse.Namespace) -> Results:
    from koinonia.app import create_app

    results = Results()
    started = time.perf_counter()
    redis: Redis = Redis.from_url(REDIS_URL)
    try:
        redis.flushdb()
    finally:
        redis.close()
    # The fan-out takes far longer than the slow-statement threshold; keep its log quiet.
    settings = settings_for(url, redis_url=REDIS_URL, slow_query_ms=3_600_000)
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver", timeout=600
        ) as client,
    ):
        registered = await client.post(
            "/api/v1/auth/register",
            json={
                "church_name": "Bench Fan-out Church",
                "name": "Ruth Miller",
                "email": f"bench-{uuid.uuid4().hex[:8]}@example.org",
                "password": "correct horse battery",
            },
        )
        assert registered.status_code == 201, registered.text
        church_id = uuid.UUID(registered.json()["church"]["id"])
        headers = {"Authorization": f"Bearer {registered.json()['access_token']}"}
        total_runs = args.runs + args.warmup
        await give_number(
            app.state.database,
            settings,
            church_id,
            "+12025550142",
            args.members * total_runs * 2,
        )
        group_id = copy_members(
            url, settings, church_id, [phone_of(i, AREA) for i in range(args.members)]
        )
        async with await psycopg.AsyncConnection.connect(plain_url(url), autocommit=True) as c:
            await c.execute("ANALYZE message_recipients")
        shared = Shared(url, church_id, group_id, args.members, settings.dispatch_batch_size)
        breakdown = Breakdown()
        instrument(app.state.database.engine, breakdown)
        have_stats = await stat_statements(url)
        results.setup_seconds = time.perf_counter() - started
        print(
            f"setup (not timed): church, number, {args.members:,} members in one group "
            f"in {results.setup_seconds:.1f} s"
        )

        for i in range(args.warmup):
            raw_seconds, _, _ = await baseline(shared, 1)
            created = await koinonia(client, headers, shared, args.body, breakdown)
            results.warmup.append((raw_seconds, created.seconds))
            print(
                f"warm-up {i + 1}: baseline {raw_seconds:.3f} s, koinonia {created.seconds:.3f} s "
                "(not counted)"
            )
        if have_stats:
            await stat_statements(url)
        results.load_before = os.getloadavg()[0]
        for i in range(args.runs):
            raw_seconds, _, results.baseline_batches = await baseline(shared, 1)
            results.baseline.append(raw_seconds)
            created = await koinonia(client, headers, shared, args.body, breakdown)
            results.koinonia.append(created)
            print(
                f"run {i + 1}/{args.runs}: baseline {raw_seconds:.3f} s, "
                f"koinonia {created.seconds:.3f} s ({created.seconds / raw_seconds:.2f}x)"
            )
        results.load_after = os.getloadavg()[0]
        if have_stats:
            results.statements = await top_statements(url)
        if args.explain:
            results.plans = await explain(app, shared, 1)
    return results


def print_results(results: Results, args: argparse.Namespace) -> None:
    n = args.members
    raw = median(results.baseline)
    fan = median([c.seconds for c in results.koinonia])
    last = results.koinonia[-1]
    print()
    print(
        f"each Koinonia run: {last.recipients:,} recipient rows, {last.batches} batches, "
        f"{last.jobs} {BATCH_TASK} jobs, {last.segments} segment(s) per recipient "
        f"(baseline: {n:,} rows, {results.baseline_batches} batch numbers)"
    )
    print(
        f"1-minute load average: {results.load_before:.2f} before the timed runs, "
        f"{results.load_after:.2f} after ({os.cpu_count()} cores; other processes add noise)"
    )
    print()
    header = f"{'figure (median of ' + str(args.runs) + ')':<44} {'koinonia':>10} "
    header += f"{'baseline':>10} {'ratio':>7}  target"
    print(header)
    print("-" * len(header))
    print(
        f"{'broadcast to ' + f'{n:,}' + ' (POST /messages, 202)':<44} {fan:>9.3f}s "
        f"{raw:>9.3f}s {fan / raw:>6.2f}x  <= {TARGET:g}x "
        f"{'(met)' if fan / raw <= TARGET else '(MISSED)'}"
    )
    print(
        f"{'  recipients per second':<44} {n / fan:>10,.0f} {n / raw:>10,.0f} "
        f"{(n / fan) / (n / raw):>6.2f}x"
    )
    fan_sql = median([c.breakdown.get("fan-out INSERT…SELECT", 0.0) for c in results.koinonia])
    print(
        f"{'  fan-out statement alone (client side)':<44} {fan_sql:>9.3f}s "
        f"{raw:>9.3f}s {fan_sql / raw:>6.2f}x"
    )
    print()
    print("where the Koinonia request's time goes (median seconds, client side):")
    kinds = sorted({k for c in results.koinonia for k in c.breakdown})
    accounted = 0.0
    for kind in kinds:
        seconds = median([c.breakdown.get(kind, 0.0) for c in results.koinonia])
        calls = max(c.statements.get(kind, 0) for c in results.koinonia)
        accounted += seconds
        print(f"  {kind:<40} {seconds:8.3f} s  ({calls} statements)")
    print(f"  {'rest: job deferrals, COMMIT, HTTP, auth':<40} {max(fan - accounted, 0.0):8.3f} s")
    if results.statements:
        print()
        print("top statements on the server over the timed runs (pg_stat_statements):")
        for query, calls, total, mean in results.statements:
            text = " ".join(query.split())
            print(f"  {total / 1000:8.3f} s  {calls:5d} calls  {mean:9.2f} ms  {text[:90]}")
    if results.plans is not None:
        fan_plan, raw_plan = results.plans
        print()
        print("EXPLAIN (ANALYZE, BUFFERS) of FAN_OUT_SQL (SERIALIZABLE, rolled back):")
        print(fan_plan)
        print()
        print("EXPLAIN (ANALYZE, BUFFERS) of the baseline (rolled back):")
        print(raw_plan)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--members", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each side")
    parser.add_argument("--body", default=BODY, help="the broadcast's text")
    parser.add_argument("--explain", action="store_true", help="EXPLAIN ANALYZE both")
    args = parser.parse_args()
    if args.members < 1 or args.runs < 1 or args.warmup < 0:
        parser.error("--members and --runs must be positive, --warmup not negative")
    with scratch_database("koinonia_bench_fanout") as url:
        results = asyncio.run(run(url, args))
    print_results(results, args)


if __name__ == "__main__":
    main()
