"""Database timeouts on every pool and slow-statement logging.

Runs in both passes (not `nopgbouncer`): through PgBouncer in transaction mode the
timeouts must still be in force, since PgBouncer drops startup `options` and hands each
transaction any server connection — the database's defaults (set by `koinonia migrate`,
and by the test fixture the same way) and the optional per-transaction mode both hold.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import psycopg
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from koinonia.db import Database, role_timeouts_sql
from koinonia.jobs import build_job_app
from koinonia.settings import Settings
from koinonia.telnyx.event_writer import EventWriter
from tests.conftest import APP_DB_HOSTPORT

THROUGH_PGBOUNCER = not APP_DB_HOSTPORT.endswith(":5432")
SHOW = (
    "SELECT current_setting('statement_timeout'), current_setting('lock_timeout'), "
    "current_setting('idle_in_transaction_session_timeout')"
)


def _slow_count() -> float:
    return REGISTRY.get_sample_value("koinonia_db_slow_queries_total") or 0.0


async def test_the_app_engine_has_the_timeouts_in_every_transaction(app: FastAPI) -> None:
    database: Database = app.state.database
    for isolation in (None, "REPEATABLE READ", "SERIALIZABLE"):
        async with database.unit_of_work(isolation) as session:  # type: ignore[arg-type]
            assert tuple((await session.execute(text(SHOW))).one()) == ("30s", "5s", "1min")
    # Many transactions, so through PgBouncer they land on different server connections.
    for _ in range(20):
        async with database.engine.begin() as connection:
            assert (await connection.execute(text(SHOW))).one()[0] == "30s"


async def test_a_statement_over_the_timeout_is_cancelled(settings: Settings) -> None:
    # Other values than the database's defaults: only the per-transaction mode sets them.
    short = settings.model_copy(
        update={
            "database_statement_timeout_ms": 300,
            "database_lock_timeout_ms": 200,
            "database_timeouts_per_transaction": True,
        }
    )
    database = Database(short)
    try:
        started = time.monotonic()
        with pytest.raises(DBAPIError) as cancelled:
            async with database.unit_of_work() as session:
                await session.execute(text("SELECT pg_sleep(5)"))
        assert isinstance(cancelled.value.orig, psycopg.errors.QueryCanceled)
        assert time.monotonic() - started < 4
        # The pool's next transaction works and still has the timeout.
        async with database.unit_of_work() as session:
            assert (await session.execute(text(SHOW))).one()[0] == "300ms"
    finally:
        await database.dispose()


async def test_a_lock_wait_over_lock_timeout_gives_up(settings: Settings) -> None:
    short = settings.model_copy(
        update={"database_lock_timeout_ms": 200, "database_timeouts_per_transaction": True}
    )
    database = Database(short)
    name = f"lock_probe_{uuid.uuid4().hex[:8]}"
    try:
        async with database.engine.begin() as connection:
            await connection.execute(text(f"CREATE TABLE {name} (id int)"))
        async with database.engine.connect() as holder:
            await holder.execute(text(f"LOCK TABLE {name} IN ACCESS EXCLUSIVE MODE"))
            with pytest.raises(DBAPIError) as refused:
                async with database.unit_of_work() as session:
                    await session.execute(text(f"SELECT * FROM {name}"))  # noqa: S608
            assert isinstance(refused.value.orig, psycopg.errors.LockNotAvailable)
            await holder.rollback()
    finally:
        async with database.engine.begin() as connection:
            await connection.execute(text(f"DROP TABLE IF EXISTS {name}"))
        await database.dispose()


async def test_slow_statements_are_counted_and_logged_on_the_engine(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    database = Database(settings.model_copy(update={"slow_query_ms": 50}))
    try:
        before = _slow_count()
        async with database.unit_of_work() as session:
            await session.execute(text("SELECT pg_sleep(0.1)"))
        assert _slow_count() >= before + 1
        out = capsys.readouterr().out
        assert '"slow_query"' in out and "pg_sleep" in out and '"pool": "primary"' in out
    finally:
        await database.dispose()


async def test_slow_statements_are_counted_and_logged_on_the_job_queue(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    job_app = build_job_app(settings.model_copy(update={"slow_query_ms": 50}))
    async with job_app.open_async():
        before = _slow_count()
        connector: Any = job_app.connector
        await connector.execute_query_one_async("SELECT pg_sleep(0.1) AS slept")
        assert _slow_count() >= before + 1
        timeouts = await connector.execute_query_one_async(
            "SELECT current_setting('statement_timeout') AS s"
        )
    out = capsys.readouterr().out
    assert '"slow_query"' in out and '"pool": "jobs"' in out
    if not THROUGH_PGBOUNCER:  # startup options reach PostgreSQL directly only
        assert timeouts["s"] == "30s"


async def test_slow_flushes_of_the_webhook_writer_are_counted_and_logged(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """A flush made slow for real: its event's row is locked by an open transaction that
    inserted the same event, so the writer's INSERT waits until that one ends."""
    event_id = f"slow-{uuid.uuid4()}"
    direct = settings.database_url.replace("postgresql+psycopg://", "postgresql://")
    writer = EventWriter(settings.database_url, "telnyx", slow_query_ms=1, timeout=10)
    await writer.open()
    blocker = await psycopg.AsyncConnection.connect(direct, prepare_threshold=None)
    try:
        await blocker.execute(
            "INSERT INTO webhook_events (provider, event_id, event_type, payload) "
            "VALUES ('telnyx', %s, 't', '{}')",
            (event_id,),
        )
        before = _slow_count()
        store = asyncio.create_task(writer.store(event_id, "t", {"id": event_id}))
        deadline = time.monotonic() + 10
        async with await psycopg.AsyncConnection.connect(
            direct, autocommit=True, prepare_threshold=None
        ) as observer:
            while True:  # until the writer's INSERT is waiting on the blocker's lock
                row = await (
                    await observer.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND query LIKE '%%INSERT INTO webhook_events%%'"
                    )
                ).fetchone()
                if row and row[0]:
                    break
                assert time.monotonic() < deadline, "the writer's INSERT never waited"
                await asyncio.sleep(0.02)
        await blocker.commit()
        assert await store is False  # the blocker stored it first: a redelivery
        assert _slow_count() >= before + 1
        out = capsys.readouterr().out
        assert '"slow_query"' in out and '"pool": "webhooks-telnyx"' in out
    finally:
        await blocker.close()
        await writer.close()


def test_role_statements_for_production(settings: Settings) -> None:
    assert role_timeouts_sql(settings, "koinonia") == [
        'ALTER ROLE "koinonia" SET statement_timeout = 30000',
        'ALTER ROLE "koinonia" SET lock_timeout = 5000',
        'ALTER ROLE "koinonia" SET idle_in_transaction_session_timeout = 60000',
    ]
