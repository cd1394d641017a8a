"""Database engines, the unit of work, isolation levels and slow-statement detection.

Driver: psycopg 3 (async). It is what procrastinate's in-transaction enqueue works with,
and with `prepare_threshold=None` it runs through PgBouncer 1.18 in transaction mode.

Database timeouts (`statement_timeout`, `lock_timeout`,
`idle_in_transaction_session_timeout`) must survive PgBouncer in transaction mode, which
drops startup `options` and hands each transaction any server connection. On the
database they are the database's own defaults (`ALTER DATABASE … SET`, applied by
`koinonia migrate`): every new server session starts with them, whichever pool or proxy
opened it, at no cost per request. Where the database cannot be altered,
`DATABASE_TIMEOUTS_PER_TRANSACTION=true` sets them per transaction on the SQLAlchemy
engines (`set_config(…, true)`, i.e. `SET LOCAL`, by a `begin` event: one round trip per
transaction, since psycopg sends `BEGIN [ISOLATION LEVEL …]` on its own).
The autocommit psycopg pools (the job queue's, the webhook writer's) run one statement
per transaction, where `SET LOCAL` has nothing to attach to: they send the timeouts as
startup `options` (honoured by PostgreSQL directly; PgBouncer must list `options` in
`ignore_startup_parameters`, and behind it the role's settings apply).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import structlog
from sqlalchemy import MetaData, event
from sqlalchemy.engine import Connection, ExecutionContext
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.pool import NullPool

from koinonia.cache import Cache, invalidate_committed
from koinonia.observability import DB_POOL_IN_USE, DB_QUERY_LATENCY, DB_SLOW_QUERIES
from koinonia.settings import Settings

IsolationLevel = Literal["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"]

log = structlog.get_logger("koinonia.db")

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def timeout_values(settings: Settings) -> dict[str, str]:
    """The three session timeouts as PostgreSQL settings (milliseconds; 0 = off)."""
    return {
        "statement_timeout": str(settings.database_statement_timeout_ms),
        "lock_timeout": str(settings.database_lock_timeout_ms),
        "idle_in_transaction_session_timeout": str(
            settings.database_idle_in_transaction_timeout_ms
        ),
    }


def set_local_timeouts_sql(settings: Settings) -> str:
    """One statement setting the timeouts for the current transaction only."""
    calls = ", ".join(
        f"set_config('{name}', '{value}', true)" for name, value in timeout_values(settings).items()
    )
    return f"SELECT {calls}"


def timeout_startup_options(settings: Settings) -> str:
    """libpq `options` for connections outside a transaction block (autocommit pools)."""
    return " ".join(f"-c {name}={value}" for name, value in timeout_values(settings).items())


def role_timeouts_sql(settings: Settings, role: str) -> list[str]:
    """`ALTER ROLE` statements giving `role` the timeouts in every session (production)."""
    quoted = '"' + role.replace('"', '""') + '"'
    return [
        f"ALTER ROLE {quoted} SET {name} = {value}"
        for name, value in timeout_values(settings).items()
    ]


def observe_statement(pool: str, statement: str, elapsed: float, slow_ms: int) -> None:
    """Count a statement's latency; log and count it when slower than `slow_ms`."""
    DB_QUERY_LATENCY.observe(elapsed)
    if elapsed * 1000 >= slow_ms:
        DB_SLOW_QUERIES.inc()
        # The statement text carries placeholders only; parameters are never logged.
        log.warning(
            "slow_query",
            duration_ms=round(elapsed * 1000, 1),
            statement=" ".join(statement.split())[:500],
            pool=pool,
        )


def create_engine(
    url: str, settings: Settings, *, name: str, autocommit: bool = False
) -> AsyncEngine:
    """An engine with our pool, timeouts and statement metrics.

    `autocommit=True` is for read-only sessions: each statement is its own transaction,
    so a one-query read costs one round trip instead of three (BEGIN, the query, COMMIT or
    the pool's ROLLBACK on return) — most of a list read's database time through
    PgBouncer. Nothing is reset on return: there is never a transaction to undo.
    """
    connect_args: dict[str, Any] = {
        # No server-side prepared statements: PgBouncer 1.18 in transaction mode cannot
        # keep them (shared/reference/python-stack.md).
        "prepare_threshold": None,
        "connect_timeout": max(1, int(settings.database_connect_timeout)),
        "application_name": f"koinonia-{name}",
    }
    pool_args: dict[str, Any]
    if settings.database_use_null_pool:
        pool_args = {"poolclass": NullPool}
    else:
        pool_args = {
            "pool_size": settings.database_pool_size,
            "max_overflow": settings.database_max_overflow,
            "pool_timeout": settings.database_pool_timeout,
            "pool_recycle": 1800,
        }
    if autocommit:
        pool_args |= {"isolation_level": "AUTOCOMMIT", "pool_reset_on_return": None}
    elif not settings.database_use_null_pool:
        # Writes keep SQLAlchemy's ping on every checkout: the exactly-once paths (claims,
        # write-backs, lost-commit settling) are proven with it under database restarts.
        pool_args["pool_pre_ping"] = True
    engine = create_async_engine(url, connect_args=connect_args, **pool_args)
    _instrument(engine, settings.slow_query_ms, name)
    if autocommit and not settings.database_use_null_pool:
        _ping_after_idle(engine, settings.database_ping_after_idle_seconds)
    if settings.database_timeouts_per_transaction:
        _set_timeouts_per_transaction(engine, set_local_timeouts_sql(settings))
    return engine


def _set_timeouts_per_transaction(engine: AsyncEngine, statement: str) -> None:
    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: Connection) -> None:
        # Runs as the transaction's first statement, after psycopg's BEGIN (which carries
        # the isolation level), so it holds on whichever server connection PgBouncer gives.
        conn.exec_driver_sql(statement)


def _ping_after_idle(engine: AsyncEngine, idle_seconds: float) -> None:
    """Check a pooled connection before use only when it sat idle for `idle_seconds`.

    SQLAlchemy's `pool_pre_ping` pings on every checkout: a round trip per request, the
    same cost as the query itself. A connection used a moment ago is alive; one that sat
    idle may have been closed by a database or PgBouncer restart, so it is pinged, and a
    failed ping makes the pool replace it (`DisconnectionError`) before anyone uses it.
    """

    @event.listens_for(engine.sync_engine.pool, "checkin")
    def _idle_from(dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine.sync_engine.pool, "checkout")
    def _ping_if_idle(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < idle_seconds:
            return
        try:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute("SELECT 1")
            finally:
                cursor.close()
            if not dbapi_connection.autocommit:
                dbapi_connection.rollback()  # the ping opened a transaction
        except Exception as error:
            raise DisconnectionError("pooled connection failed its idle check") from error


def _instrument(engine: AsyncEngine, slow_ms: int, name: str) -> None:
    sync_engine = engine.sync_engine
    pool_gauge = DB_POOL_IN_USE.labels(pool=name)

    @event.listens_for(sync_engine, "before_cursor_execute")
    def _start(
        conn: Connection,
        cursor: Any,
        statement: str,
        params: Any,
        context: ExecutionContext | None,
        executemany: bool,
    ) -> None:
        conn.info.setdefault("query_start", []).append(time.perf_counter())

    @event.listens_for(sync_engine, "after_cursor_execute")
    def _end(
        conn: Connection,
        cursor: Any,
        statement: str,
        params: Any,
        context: ExecutionContext | None,
        executemany: bool,
    ) -> None:
        started = conn.info["query_start"].pop()
        observe_statement(name, statement, time.perf_counter() - started, slow_ms)

    @event.listens_for(sync_engine.pool, "checkout")
    def _checkout(*_: Any) -> None:
        pool_gauge.inc()

    @event.listens_for(sync_engine.pool, "checkin")
    def _checkin(*_: Any) -> None:
        pool_gauge.dec()


class Database:
    """The primary engine and its session factory (replicas join in `replicas`)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Set by whoever owns a Redis client (the API, the worker, the CLI): cache tags
        # named with `invalidate_on_commit` are invalidated after `unit_of_work` commits.
        self.cache: Cache | None = None
        self.engine = create_engine(settings.database_url, settings, name="primary")
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False, autoflush=False)
        # Read-only sessions on the primary (`koinonia.replicas.ReadSession` when no replica
        # fits): autocommit, one round trip per statement.
        self.read_engine = create_engine(
            settings.database_url, settings, name="primary-reads", autocommit=True
        )
        self.read_sessions = async_sessionmaker(
            self.read_engine, expire_on_commit=False, autoflush=False
        )
        self.replica_engines = [
            create_engine(url, settings, name=f"replica{i}", autocommit=True)
            for i, url in enumerate(settings.database_replica_urls)
        ]
        self.replica_sessions = [
            async_sessionmaker(engine, expire_on_commit=False, autoflush=False)
            for engine in self.replica_engines
        ]

    async def dispose(self) -> None:
        await self.engine.dispose()
        await self.read_engine.dispose()
        for engine in self.replica_engines:
            await engine.dispose()

    @asynccontextmanager
    async def unit_of_work(
        self, isolation_level: IsolationLevel | None = None
    ) -> AsyncIterator[AsyncSession]:
        """One transaction: commits when the block ends, rolls back when it raises; then
        invalidates the cache tags its committed work named (`invalidate_on_commit`)."""
        async with self.sessions() as session:
            if isolation_level is not None:
                await set_isolation(session, isolation_level)
            try:
                yield session
                await session.commit()
            except BaseException:
                await session.rollback()
                raise
            finally:
                await invalidate_committed(self.cache, session)


async def set_isolation(session: AsyncSession, level: IsolationLevel) -> None:
    """Set the isolation level of the session's current transaction.

    Must be the first thing the transaction does; `SET TRANSACTION` is transaction-scoped,
    so it is safe behind PgBouncer in transaction mode.
    """
    await session.connection(execution_options={"isolation_level": level})
