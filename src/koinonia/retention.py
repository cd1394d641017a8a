"""Data retention: periodic jobs that prune what is no longer needed.

Each job runs daily on queue `maintenance` (UTC):

- `retention:prune_finished_jobs` (03:11): procrastinate jobs finished (succeeded,
  failed, cancelled, aborted) more than `JOB_RETENTION_DAYS` ago;
- `retention:prune_webhook_events` (03:21): provider events applied more than
  `WEBHOOK_EVENT_RETENTION_DAYS` ago — never one not applied yet, nor one a dead letter
  refers to unless that dead letter was replayed;
- `retention:prune_refresh_tokens` (03:31): refresh tokens past their expiry;
- `retention:drop_old_partitions` (03:51): monthly partitions wholly older than
  `PARTITION_RETENTION_MONTHS` (never the current or a later month);
- `deadletters:cleanup_dead_letters` (03:41, its own module): dead letters replayed more
  than `DLQ_RETENTION_DAYS` ago; never-replayed ones wait for an operator.

Rows go in batches of `RETENTION_BATCH_SIZE`, each its own short transaction, so no run
holds locks or a snapshot for long; a run stops after `MAX_BATCHES` and the next one
carries on. Each counts what it removed in `koinonia_retention_deleted_total{kind}` and
sets `koinonia_retention_last_run_timestamp_seconds{kind}` when it finished.

Why not procrastinate's `delete_old_jobs` (or its `remove_old_jobs` builtin task): it
answers no count (the metric needs one), deletes in one statement however many rows
match, and would fail on a job still referenced by `procrastinate_periodic_defers`.
"""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta
from typing import Any

import structlog
from procrastinate import Blueprint
from prometheus_client import Counter, Gauge
from sqlalchemy import text

from koinonia import partitions
from koinonia.db import Database
from koinonia.jobs import JOB_RETRY, resources

blueprint = Blueprint()
log = structlog.get_logger(__name__)
MAINTENANCE_QUEUE = "maintenance"
MAX_BATCHES = 200  # per run: a backlog is worked off over several days' runs

RETENTION_DELETED = Counter(
    "koinonia_retention_deleted_total",
    "Rows (or partitions) removed by the retention jobs, by kind",
    ["kind"],
)
RETENTION_LAST_RUN = Gauge(
    "koinonia_retention_last_run_timestamp_seconds",
    "When each retention job last finished (Unix time), by kind",
    ["kind"],
)
RETENTION_KINDS = ("jobs", "webhook_events", "refresh_tokens", "partitions", "dead_letters")
for _kind in RETENTION_KINDS:  # every series exists from the start (0 until a run)
    RETENTION_DELETED.labels(_kind)
    RETENTION_LAST_RUN.labels(_kind)

FINISHED_STATES = ["succeeded", "failed", "cancelled", "aborted"]

PRUNE_JOBS_SQL = """
DELETE FROM procrastinate_jobs WHERE id IN (
    SELECT job.id FROM procrastinate_jobs job
    WHERE job.status::text = ANY(:states)
      AND NOT EXISTS (
          SELECT 1 FROM procrastinate_events event
          WHERE event.job_id = job.id AND event.at >= :cutoff
      )
      AND NOT EXISTS (
          SELECT 1 FROM procrastinate_periodic_defers defer WHERE defer.job_id = job.id
      )
    ORDER BY job.id
    LIMIT :batch
)
"""

# Only ids below the first event received since the cutoff are looked at, so a run scans
# the old end of the table, not all of it.
WEBHOOK_BOUNDARY_SQL = """
SELECT coalesce(
    (SELECT min(id) FROM webhook_events WHERE received_at >= :cutoff),
    (SELECT max(id) + 1 FROM webhook_events),
    0
)
"""
PRUNE_WEBHOOK_EVENTS_SQL = """
DELETE FROM webhook_events WHERE id IN (
    SELECT event.id FROM webhook_events event
    WHERE event.id < :boundary
      AND event.processed_at IS NOT NULL
      AND event.processed_at < :cutoff
      AND NOT EXISTS (
          SELECT 1 FROM dead_letters letter
          WHERE letter.payload ? 'webhook_event_id'
            AND letter.payload->>'webhook_event_id' = event.id::text
            AND letter.replay_state <> 'replayed'
      )
    ORDER BY event.id
    LIMIT :batch
)
"""

PRUNE_REFRESH_TOKENS_SQL = """
DELETE FROM refresh_tokens WHERE id IN (
    SELECT id FROM refresh_tokens WHERE expires_at < :now LIMIT :batch
)
"""


def record_run(kind: str, removed: int) -> None:
    """Count a retention run's removals and note when it finished."""
    RETENTION_DELETED.labels(kind).inc(removed)
    RETENTION_LAST_RUN.labels(kind).set(time.time())


async def _delete_in_batches(
    database: Database, statement: str, params: dict[str, Any], batch: int
) -> int:
    total = 0
    for _ in range(MAX_BATCHES):
        async with database.engine.begin() as connection:
            result = await connection.execute(text(statement), {**params, "batch": batch})
        deleted = int(result.rowcount or 0)
        total += deleted
        if deleted < batch:
            break
    return total


async def prune_finished_jobs(
    database: Database, retention_days: int, batch: int, now: datetime | None = None
) -> int:
    """Delete procrastinate jobs whose last event is older than `retention_days`."""
    cutoff = (now or datetime.now(UTC)) - timedelta(days=retention_days)
    return await _delete_in_batches(
        database, PRUNE_JOBS_SQL, {"states": FINISHED_STATES, "cutoff": cutoff}, batch
    )


async def prune_webhook_events(
    database: Database, retention_days: int, batch: int, now: datetime | None = None
) -> int:
    """Delete provider events applied (and received) more than `retention_days` ago,
    keeping every event not applied yet and every one a dead letter not yet replayed
    refers to (its replay needs it)."""
    cutoff = (now or datetime.now(UTC)) - timedelta(days=retention_days)
    async with database.engine.begin() as connection:
        boundary = int(
            (await connection.execute(text(WEBHOOK_BOUNDARY_SQL), {"cutoff": cutoff})).scalar_one()
        )
    return await _delete_in_batches(
        database, PRUNE_WEBHOOK_EVENTS_SQL, {"cutoff": cutoff, "boundary": boundary}, batch
    )


async def prune_refresh_tokens(database: Database, batch: int, now: datetime | None = None) -> int:
    """Delete refresh tokens past their expiry (they can no longer be used)."""
    return await _delete_in_batches(
        database, PRUNE_REFRESH_TOKENS_SQL, {"now": now or datetime.now(UTC)}, batch
    )


async def drop_old_partitions(
    database: Database, retention_months: int, today: date | None = None
) -> list[str]:
    """Detach and drop the partitions older than the retention, one per transaction;
    answers the names dropped. One that cannot get its lock now is left for the next
    run (logged)."""
    today = today or datetime.now(UTC).date()
    async with database.engine.connect() as connection:
        existing = await partitions.list_partitions(connection)
    dropped: list[str] = []
    for info in partitions.expired(existing, today, retention_months):
        try:
            async with database.engine.begin() as connection:
                await partitions.drop_partition(connection, info)
        except Exception as error:  # a lock not granted in time: the next run tries again
            log.warning("partition_drop_failed", partition=info.name, error=type(error).__name__)
            continue
        log.info("partition_dropped", table=info.table, partition=info.name)
        dropped.append(info.name)
    return dropped


@blueprint.periodic(cron="11 3 * * *")
@blueprint.task(
    name="prune_finished_jobs",
    queue=MAINTENANCE_QUEUE,
    queueing_lock="retention-jobs",
    retry=JOB_RETRY,
)
async def prune_finished_jobs_task(timestamp: int) -> int:
    job = resources()
    settings = job.settings
    deleted = await prune_finished_jobs(
        job.database, settings.job_retention_days, settings.retention_batch_size
    )
    record_run("jobs", deleted)
    log.info("retention_done", kind="jobs", deleted=deleted)
    return deleted


@blueprint.periodic(cron="21 3 * * *")
@blueprint.task(
    name="prune_webhook_events",
    queue=MAINTENANCE_QUEUE,
    queueing_lock="retention-webhook-events",
    retry=JOB_RETRY,
)
async def prune_webhook_events_task(timestamp: int) -> int:
    job = resources()
    settings = job.settings
    deleted = await prune_webhook_events(
        job.database, settings.webhook_event_retention_days, settings.retention_batch_size
    )
    record_run("webhook_events", deleted)
    log.info("retention_done", kind="webhook_events", deleted=deleted)
    return deleted


@blueprint.periodic(cron="31 3 * * *")
@blueprint.task(
    name="prune_refresh_tokens",
    queue=MAINTENANCE_QUEUE,
    queueing_lock="retention-refresh-tokens",
    retry=JOB_RETRY,
)
async def prune_refresh_tokens_task(timestamp: int) -> int:
    job = resources()
    deleted = await prune_refresh_tokens(job.database, job.settings.retention_batch_size)
    record_run("refresh_tokens", deleted)
    log.info("retention_done", kind="refresh_tokens", deleted=deleted)
    return deleted


@blueprint.periodic(cron="51 3 * * *")
@blueprint.task(
    name="drop_old_partitions",
    queue=MAINTENANCE_QUEUE,
    queueing_lock="retention-partitions",
    retry=JOB_RETRY,
)
async def drop_old_partitions_task(timestamp: int) -> int:
    job = resources()
    dropped = await drop_old_partitions(job.database, job.settings.partition_retention_months)
    record_run("partitions", len(dropped))
    log.info("retention_done", kind="partitions", deleted=len(dropped), partitions=dropped)
    return len(dropped)
