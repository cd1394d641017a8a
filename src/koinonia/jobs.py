"""Durable jobs on procrastinate (PostgreSQL-backed).

Each feature declares its tasks on a procrastinate `Blueprint` in its own `jobs.py`;
`build_job_app` gathers them into one `App` at start-up (so importing a feature never
needs settings). A job deferred during a request goes into the request's own transaction
(`defer_in_transaction`), so it is published only if the request commits. Every defer
here carries the deferring request's trace context and request id into the job
(`koinonia.job_telemetry`).
"""

from __future__ import annotations

import functools
import importlib
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, LiteralString

import structlog
from procrastinate import App, Blueprint, PsycopgConnector
from procrastinate import tasks as procrastinate_tasks
from procrastinate.jobs import Job
from procrastinate.retry import BaseRetryStrategy, RetryDecision
from prometheus_client import Counter
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.cache import Cache
from koinonia.db import Database, observe_statement, timeout_startup_options
from koinonia.job_telemetry import carried_context, job_middleware, with_carried_context
from koinonia.redis import create_redis
from koinonia.retry import is_transient_db_error
from koinonia.settings import Settings
from koinonia.telnyx.client import TelnyxClient

log = structlog.get_logger(__name__)

# Modules that expose `blueprint: procrastinate.Blueprint`; features append themselves here.
BLUEPRINT_MODULES: list[str] = [
    "koinonia.members.jobs",
    "koinonia.messaging.jobs",
    "koinonia.conversations.jobs",
    "koinonia.numbers.jobs",
    "koinonia.deadletters.jobs",
    "koinonia.retention",
]


JOB_GAVE_UP = Counter(
    "koinonia_job_failures_total",
    "Jobs that failed for good after their retries, by task (the sweeper re-defers "
    "broadcast work left behind)",
    ["task"],
)


class JobRetry(BaseRetryStrategy):
    """Every job kind's retry policy: transient database errors (however wrapped: a
    restart, a refused connection, a serialization failure) are retried with exponential
    backoff for minutes; anything else a few times.

    A retried job gets a lock of its own: waiting for its retry while holding its
    church's lock would block the church's other sends (procrastinate #1599).
    """

    def __init__(self, transient_attempts: int = 12, other_attempts: int = 3) -> None:
        self.transient_attempts = transient_attempts
        self.other_attempts = other_attempts

    def get_retry_decision(self, *, exception: BaseException, job: Job) -> RetryDecision | None:
        transient = is_transient_db_error(exception)
        limit = self.transient_attempts if transient else self.other_attempts
        if job.attempts >= limit:
            JOB_GAVE_UP.labels(job.task_name).inc()
            log.error(
                "job_failed_for_good",
                task=job.task_name,
                attempts=job.attempts,
                error=type(exception).__name__,
                transient=transient,
            )
            return None
        wait = min(60.0, 0.5 * 2**job.attempts) * (0.5 + random.random() / 2)  # noqa: S311
        log.warning(
            "job_retry_scheduled",
            task=job.task_name,
            attempt=job.attempts + 1,
            error=type(exception).__name__,
            wait_seconds=round(wait, 2),
        )
        lock = f"retry:{job.id}" if job.lock else None
        return RetryDecision(retry_in={"seconds": round(wait, 3)}, lock=lock)


JOB_RETRY = JobRetry()


@dataclass
class JobResources:
    """What tasks use: opened once per worker process, shared by all its jobs."""

    settings: Settings
    database: Database
    redis: Redis
    job_app: App
    telnyx: TelnyxClient


_resources: JobResources | None = None
_draining = False


def draining() -> bool:
    """Whether this worker process is stopping (SIGTERM): long jobs end their slice at
    the next safe point (results written back) and leave the rest to a continuation."""
    return _draining


def set_draining(value: bool) -> None:
    global _draining
    _draining = value


def resources() -> JobResources:
    if _resources is None:
        raise RuntimeError("job resources are not open in this process")
    return _resources


@asynccontextmanager
async def open_resources(settings: Settings, job_app: App) -> AsyncIterator[JobResources]:
    global _resources
    database = Database(settings)
    redis = create_redis(settings)
    # Jobs have no request: their transactions invalidate the cache tags they name
    # (`invalidate_on_commit`) after committing, through the worker's own Redis.
    database.cache = Cache(redis)
    telnyx = TelnyxClient(settings)
    _resources = JobResources(settings, database, redis, job_app, telnyx)
    try:
        yield _resources
    finally:
        _resources = None
        await telnyx.aclose()
        await redis.aclose()
        await database.dispose()


def psycopg_conninfo(sqlalchemy_url: str) -> str:
    return sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://", 1)


@functools.cache
def _task_registry() -> App:
    """Every feature's tasks, registered once per process.

    procrastinate renames a blueprint's tasks in place when it namespaces them, so they
    can be added to one App only; every real App is this one `with_connector(...)`.
    """
    # Every worker built from it restores the trace context and request id a job carries.
    registry = App(
        connector=PsycopgConnector(),  # never opened
        worker_defaults={"worker_middleware": [job_middleware]},
    )
    for module_name in BLUEPRINT_MODULES:
        blueprint: Blueprint = importlib.import_module(module_name).blueprint
        registry.add_tasks_from(blueprint, namespace=module_name.split(".")[1])
    return registry


class InstrumentedConnector(PsycopgConnector):
    """procrastinate's psycopg connector with the job queue's statements timed: slow ones
    are counted (`koinonia_db_slow_queries_total`) and logged like the engines' (pool
    `jobs`). Statements run inside a caller's transaction (`*_with_connection`) are not
    timed here; the LISTEN connection runs none worth timing."""

    def __init__(self, *, slow_query_ms: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._slow_query_ms = slow_query_ms

    def _observe(self, query: str, started: float) -> None:
        observe_statement("jobs", query, time.perf_counter() - started, self._slow_query_ms)

    async def execute_query_async(self, query: LiteralString, **arguments: Any) -> None:
        started = time.perf_counter()
        try:
            await super().execute_query_async(query, **arguments)
        finally:
            self._observe(query, started)

    async def execute_query_one_async(
        self, query: LiteralString, **arguments: Any
    ) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            row: dict[str, Any] = await super().execute_query_one_async(query, **arguments)
            return row
        finally:
            self._observe(query, started)

    async def execute_query_all_async(
        self, query: LiteralString, **arguments: Any
    ) -> list[dict[str, Any]]:
        started = time.perf_counter()
        try:
            rows: list[dict[str, Any]] = await super().execute_query_all_async(query, **arguments)
            return rows
        finally:
            self._observe(query, started)


def build_job_app(settings: Settings, *, pool_max: int = 4, direct: bool = False) -> App:
    """The procrastinate App on a connector of its own (opened by whoever runs jobs).

    `direct=True` — the worker's — connects to DATABASE_DIRECT_URL (PostgreSQL itself):
    procrastinate's LISTEN connection is opened from its pool's conninfo, and LISTEN is
    session state, which PgBouncer in transaction mode does not keep. Others (the API,
    which only defers inside its request transactions) use DATABASE_URL.
    """
    url = settings.direct_database_url if direct else settings.database_url
    connector = InstrumentedConnector(
        slow_query_ms=settings.slow_query_ms,
        conninfo=psycopg_conninfo(url),
        min_size=1,
        max_size=pool_max,
        # Same reason as the SQLAlchemy engines: PgBouncer in transaction mode. The pool
        # is autocommit (one statement per transaction): the timeouts go as startup
        # options (koinonia.db explains; behind PgBouncer the role's settings apply).
        kwargs={"prepare_threshold": None, "options": timeout_startup_options(settings)},
    )
    app = _task_registry().with_connector(connector)
    # Tasks link back to the App they were registered on (the never-opened registry);
    # the periodic deferrer and `task.defer` go through that link, so point it at the
    # App this process opens (one per process; deferrals made inside a transaction
    # pass their own connection and do not depend on it).
    for task in app.tasks.values():
        task.blueprint = app
    return app


async def raw_connection(session: AsyncSession) -> Any:
    """The psycopg connection under the session's current transaction."""
    connection = await session.connection()
    raw = await connection.get_raw_connection()
    return raw.driver_connection


def _set_options(**options: Any) -> dict[str, Any]:
    """Procrastinate's configure options that were given (`None` means its default)."""
    return {name: value for name, value in options.items() if value is not None}


async def defer_in_transaction(
    app: App,
    session: AsyncSession,
    task_name: str,
    *,
    queue: str | None = None,
    priority: int = 0,
    lock: str | None = None,
    queueing_lock: str | None = None,
    schedule_at: datetime | None = None,
    **task_kwargs: Any,
) -> int:
    """Defer a job inside the session's transaction; it exists only if that commits."""
    options = _set_options(
        connection=await raw_connection(session),
        priority=priority,
        queue=queue,
        lock=lock,
        queueing_lock=queueing_lock,
        schedule_at=schedule_at,
    )
    job_id: int = await app.configure_task(task_name, **options).defer_async(
        **with_carried_context(task_kwargs)
    )
    return job_id


async def defer_many_in_transaction(
    app: App,
    session: AsyncSession,
    task_name: str,
    jobs: Sequence[tuple[int, dict[str, Any]]],
    *,
    queue: str | None = None,
    lock: str | None = None,
    schedule_at: datetime | None = None,
    queueing_lock_of: Callable[[dict[str, Any]], str] | None = None,
) -> None:
    """Defer many jobs of one task, each `(priority, kwargs)`, in one round trip inside
    the session's transaction (a 100,000-recipient broadcast has 100 batch jobs)."""
    if not jobs:
        return
    connection = await raw_connection(session)
    options = _set_options(connection=connection, queue=queue, lock=lock, schedule_at=schedule_at)
    deferrer = app.configure_task(task_name, **options)
    carried = carried_context()
    batch = [
        deferrer.make_new_job(**with_carried_context(kwargs, carried)).evolve(
            priority=p, queueing_lock=queueing_lock_of(kwargs) if queueing_lock_of else None
        )
        for p, kwargs in jobs
    ]
    await deferrer.job_manager.batch_defer_jobs_async(jobs=batch, connection=connection)


async def defer(
    app: App,
    task_name: str,
    *,
    queue: str | None = None,
    priority: int = 0,
    lock: str | None = None,
    queueing_lock: str | None = None,
    schedule_in_seconds: float | None = None,
    **task_kwargs: Any,
) -> int:
    """Defer a job on `app`'s own connection (outside any transaction).

    Tasks are registered on the process-wide registry App, whose connector is never
    opened; `app.configure_task` would defer through it, so the deferrer is built on
    `app`'s job manager instead.
    """
    options = _set_options(priority=priority, queue=queue, lock=lock, queueing_lock=queueing_lock)
    if schedule_in_seconds is not None and schedule_in_seconds > 0:
        options["schedule_in"] = {"seconds": round(schedule_in_seconds, 3)}
    deferrer = procrastinate_tasks.configure_task(
        name=task_name, job_manager=app.job_manager, **options
    )
    job_id: int = await deferrer.defer_async(**with_carried_context(task_kwargs))
    return job_id
