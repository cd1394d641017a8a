"""Periodic upkeep of the dead-letter queue: retention and the size/alert metrics."""

from __future__ import annotations

import structlog
from procrastinate import Blueprint

from koinonia.deadletters import service
from koinonia.jobs import JOB_RETRY, resources
from koinonia.retention import record_run

blueprint = Blueprint()
MAINTENANCE_QUEUE = "maintenance"
log = structlog.get_logger(__name__)


@blueprint.periodic(cron="41 3 * * *")
@blueprint.task(
    name="cleanup_dead_letters",
    queue=MAINTENANCE_QUEUE,
    queueing_lock="dlq-cleanup",
    retry=JOB_RETRY,
)
async def cleanup_dead_letters(timestamp: int) -> int:
    """Delete dead letters replayed more than `DLQ_RETENTION_DAYS` ago (daily); the others
    wait for an operator."""
    job = resources()
    async with job.database.unit_of_work() as session:
        deleted = await service.cleanup(session, job.settings.dlq_retention_days)
    record_run("dead_letters", deleted)
    log.info("dlq_cleanup_done", deleted=deleted)
    return deleted


@blueprint.periodic(cron="* * * * *")
@blueprint.task(
    name="dlq_metrics", queue=MAINTENANCE_QUEUE, queueing_lock="dlq-metrics", retry=JOB_RETRY
)
async def dlq_metrics(timestamp: int) -> int:
    """Refresh `koinonia_dlq_size` / `koinonia_dlq_alert` (every minute)."""
    job = resources()
    async with job.database.sessions() as session:
        return await service.refresh_size_metrics(session, job.settings.dlq_alert_threshold)
