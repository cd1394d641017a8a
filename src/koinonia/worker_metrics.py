"""The worker's `/metrics`: its own port, its own registry, and the gauges it refreshes.

Each `koinonia worker` process serves Prometheus text on `WORKER_METRICS_HOST` and the first
free port from `WORKER_METRICS_PORT` (the next 15 are tried, so several workers fit on one
host) — one scrape target per process, like the API. prometheus-client's multiprocess mode
was not used: it leaves the files of dead processes behind (a worker killed by SIGKILL, a
restart after `worker_giving_up`), its gauges need a per-metric aggregation mode, and a
per-process target tells Prometheus (`up`) which worker died.

The server (prometheus-client's, on a daemon thread) outlives the worker's attempts, so
`koinonia_worker_restarts_total` can be read while the database is away. Beside what the
jobs count as they run (sends, receipts, Telnyx calls, job durations and failures, retries,
dead letters), every `REFRESH_SECONDS` it sets gauges from shared state — the same in every
worker, so alert on `max` of them:

- `koinonia_queue_jobs{queue,state}` and `koinonia_queue_oldest_ready_age_seconds{queue}`
  (procrastinate_jobs);
- `koinonia_dlq_size` / `koinonia_dlq_alert` (dead_letters, against `DLQ_ALERT_THRESHOLD`);
- `koinonia_circuit_state{provider}` (the breakers' shared state in Redis);
- `koinonia_partitions_months_ahead{table}`;
- `koinonia_db_replication_lag_bytes{standby}` (pg_stat_replication on the primary).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from wsgiref.simple_server import WSGIServer

import psycopg
import structlog
from prometheus_client import Counter, Gauge, start_http_server
from redis.asyncio import Redis

from koinonia import partitions
from koinonia.breaker import CIRCUIT_STATE, CircuitBreaker
from koinonia.deadletters.service import DLQ_ALERT, DLQ_SIZE
from koinonia.redis import create_redis
from koinonia.settings import Settings

log = structlog.get_logger("koinonia.worker_metrics")

PORTS_TRIED = 16
REFRESH_SECONDS = 15.0
REFRESH_TIMEOUT_SECONDS = 10.0
KNOWN_QUEUES = ("sms", "numbers", "imports", "maintenance")
BREAKER_PROVIDERS = ("telnyx", "stripe")
_STATE_VALUE = {"closed": 0, "half_open": 1, "open": 2}

QUEUE_JOBS = Gauge(
    "koinonia_queue_jobs",
    "Jobs by queue and state: ready (due, waiting for a worker), scheduled (due later), running",
    ["queue", "state"],
)
QUEUE_AGE = Gauge(
    "koinonia_queue_oldest_ready_age_seconds",
    "How long the oldest job that could run now (due, its lock free) has waited, by queue",
    ["queue"],
)
PARTITIONS_AHEAD = Gauge(
    "koinonia_partitions_months_ahead",
    "Consecutive months after the current one that have a partition (-1: not even the "
    "current month)",
    ["table"],
)
REPLICATION_LAG_BYTES = Gauge(
    "koinonia_db_replication_lag_bytes",
    "WAL bytes each standby has not replayed yet, from pg_stat_replication on the primary",
    ["standby"],
)
REFRESHED_AT = Gauge(
    "koinonia_worker_metrics_refreshed_timestamp_seconds",
    "When the worker last refreshed its gauges from the database and Redis (Unix time)",
)
REFRESH_FAILURES = Counter(
    "koinonia_worker_metrics_refresh_failures_total",
    "Gauge refreshes that failed, by part (queues, dlq, breakers, partitions, replication)",
    ["part"],
)

QUEUE_SQL = """
SELECT queue_name,
       count(*) FILTER (WHERE status = 'todo'
                          AND (scheduled_at IS NULL OR scheduled_at <= now())) AS ready,
       count(*) FILTER (WHERE status = 'todo' AND scheduled_at > now()) AS scheduled,
       count(*) FILTER (WHERE status = 'doing') AS running
FROM procrastinate_jobs
WHERE status IN ('todo', 'doing')
GROUP BY queue_name
"""

# A job waits for its due time (scheduled_at, set by schedules and retries) or, unscheduled,
# since it was deferred (the oldest such is the lowest id). Jobs whose lock a running job
# holds are waiting by design (one church's batches run one at a time): not counted.
QUEUE_AGE_SQL = """
WITH ready AS (
  SELECT j.queue_name,
         min(j.id) FILTER (WHERE j.scheduled_at IS NULL) AS first_id,
         min(j.scheduled_at) AS first_due
  FROM procrastinate_jobs j
  WHERE j.status = 'todo' AND (j.scheduled_at IS NULL OR j.scheduled_at <= now())
    AND (j.lock IS NULL OR NOT EXISTS (
      SELECT 1 FROM procrastinate_jobs d WHERE d.status = 'doing' AND d.lock = j.lock))
  GROUP BY j.queue_name)
SELECT r.queue_name,
       coalesce(extract(epoch FROM now() - least(r.first_due, (
         SELECT min(e.at) FROM procrastinate_events e
         WHERE e.job_id = r.first_id AND e.type = 'deferred'))), 0)::float8
FROM ready r
"""

REPLICATION_SQL = """
SELECT coalesce(nullif(application_name, ''), 'standby') || '@'
         || coalesce(host(client_addr), 'local'),
       pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::float8
FROM pg_stat_replication
WHERE replay_lsn IS NOT NULL
"""


def months_ahead(names: set[str], table: str, today: datetime) -> int:
    """Consecutive months after `today`'s that have a partition of `table`."""
    month = partitions.month_start(today.date())
    if partitions.partition_name(table, month) not in names:
        return -1
    ahead = 0
    while partitions.partition_name(table, partitions.add_months(month, ahead + 1)) in names:
        ahead += 1
    return ahead


@dataclass
class Refresher:
    """Sets the gauges from PostgreSQL (one connection of its own) and Redis."""

    settings: Settings
    redis: Redis
    _connection: psycopg.AsyncConnection[Any] | None = None
    _seen: dict[str, set[tuple[str, ...]]] = field(default_factory=dict)

    async def _db(self) -> psycopg.AsyncConnection[Any]:
        from koinonia.jobs import psycopg_conninfo

        if self._connection is None or self._connection.closed or self._connection.broken:
            self._connection = await psycopg.AsyncConnection.connect(
                psycopg_conninfo(self.settings.database_url),
                autocommit=True,
                connect_timeout=max(1, int(self.settings.database_connect_timeout)),
                prepare_threshold=None,
                application_name="koinonia-worker-metrics",
            )
        return self._connection

    async def _rows(self, sql: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        connection = await self._db()
        cursor = await connection.execute(sql, params)
        return list(await cursor.fetchall())

    def _set(self, gauge: Gauge, name: str, values: dict[tuple[str, ...], float]) -> None:
        """Set labelled values; label sets seen before and gone now go back to 0."""
        previous = self._seen.get(name, set())
        for labels in previous - values.keys():
            gauge.labels(*labels).set(0)
        for labels, value in values.items():
            gauge.labels(*labels).set(value)
        self._seen[name] = previous | values.keys()

    async def queues(self) -> None:
        depth: dict[tuple[str, ...], float] = {
            (queue, state): 0
            for queue in KNOWN_QUEUES
            for state in ("ready", "scheduled", "running")
        }
        for queue, ready, scheduled, running in await self._rows(QUEUE_SQL):
            depth[(queue, "ready")] = ready
            depth[(queue, "scheduled")] = scheduled
            depth[(queue, "running")] = running
        self._set(QUEUE_JOBS, "queue_jobs", depth)
        ages: dict[tuple[str, ...], float] = {(queue,): 0 for queue in KNOWN_QUEUES}
        for queue, age in await self._rows(QUEUE_AGE_SQL):
            ages[(queue,)] = max(0.0, float(age))
        self._set(QUEUE_AGE, "queue_age", ages)

    async def dlq(self) -> None:
        ((size,),) = await self._rows("SELECT count(*) FROM dead_letters")
        DLQ_SIZE.set(size)
        DLQ_ALERT.set(1 if size > self.settings.dlq_alert_threshold else 0)

    async def breakers(self) -> None:
        for provider in BREAKER_PROVIDERS:
            status = await CircuitBreaker(self.redis, provider).status()
            if status.state in _STATE_VALUE:
                CIRCUIT_STATE.labels(provider).set(_STATE_VALUE[status.state])

    async def partitions(self) -> None:
        rows = await self._rows(
            "SELECT child.relname FROM pg_inherits "
            "JOIN pg_class parent ON parent.oid = pg_inherits.inhparent "
            "JOIN pg_class child ON child.oid = pg_inherits.inhrelid "
            "WHERE parent.relname = ANY(%(tables)s)",
            {"tables": list(partitions.PARTITIONED_TABLES)},
        )
        names = {str(name) for (name,) in rows}
        now = datetime.now(UTC)
        for table in partitions.PARTITIONED_TABLES:
            PARTITIONS_AHEAD.labels(table).set(months_ahead(names, table, now))

    async def replication(self) -> None:
        lags: dict[tuple[str, ...], float] = {
            (str(name),): float(lag) for name, lag in await self._rows(REPLICATION_SQL)
        }
        self._set(REPLICATION_LAG_BYTES, "replication", lags)

    async def refresh(self) -> None:
        parts = {
            "queues": self.queues,
            "dlq": self.dlq,
            "breakers": self.breakers,
            "partitions": self.partitions,
            "replication": self.replication,
        }
        failed = False
        for part, refresh in parts.items():
            try:
                async with asyncio.timeout(REFRESH_TIMEOUT_SECONDS):
                    await refresh()
            except Exception as error:  # never let one part (or the database) stop the rest
                failed = True
                REFRESH_FAILURES.labels(part).inc()
                log.warning("worker_metrics_refresh_failed", part=part, error=repr(error)[:200])
                if self._connection is not None and part != "breakers":
                    await self.close_db()
        if not failed:
            REFRESHED_AT.set(time.time())

    async def close_db(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(psycopg.Error):
                await connection.close()

    async def run_forever(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(REFRESH_SECONDS)


def serve(host: str, first_port: int) -> tuple[WSGIServer, threading.Thread, int] | None:
    """prometheus-client's HTTP server on the first free port from `first_port`."""
    for port in range(first_port, min(first_port + PORTS_TRIED, 65536)):
        try:
            server, thread = start_http_server(port, addr=host)
        except OSError:
            continue
        return server, thread, port
    return None


class WorkerMetrics:
    """The metrics server and the refresh loop of one worker process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port: int | None = None
        self._server: tuple[WSGIServer, threading.Thread] | None = None
        self._redis: Redis | None = None
        self._refresher: Refresher | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.settings.worker_metrics_port == 0:
            log.info("worker_metrics_off")
            return
        served = serve(self.settings.worker_metrics_host, self.settings.worker_metrics_port)
        if served is None:
            # Metrics are not worth refusing to send texts over.
            log.error(
                "worker_metrics_no_free_port",
                host=self.settings.worker_metrics_host,
                first_port=self.settings.worker_metrics_port,
                tried=PORTS_TRIED,
            )
            return
        server, thread, self.port = served
        self._server = (server, thread)
        log.info("worker_metrics_listening", host=self.settings.worker_metrics_host, port=self.port)
        self._redis = create_redis(self.settings)
        self._refresher = Refresher(self.settings, self._redis)
        self._task = asyncio.create_task(self._refresher.run_forever(), name="worker-metrics")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._refresher is not None:
            await self._refresher.close_db()
        if self._redis is not None:
            await self._redis.aclose()
        if self._server is not None:
            server, thread = self._server
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
