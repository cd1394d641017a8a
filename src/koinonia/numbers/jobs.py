"""Jobs of the numbers feature: provision a church's number, and sweep up stuck ones."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import procrastinate
import structlog
from procrastinate import Blueprint
from procrastinate import tasks as procrastinate_tasks
from procrastinate.exceptions import AlreadyEnqueued
from sqlalchemy import select

from koinonia.accounts.tables import Church
from koinonia.jobs import JOB_RETRY, resources
from koinonia.numbers.service import ASSIGNED, provision

blueprint = Blueprint()
log = structlog.get_logger(__name__)

NUMBERS_QUEUE = "numbers"
PROVISION_TASK = "numbers:provision_number"
STUCK_AFTER = timedelta(minutes=2)
SWEEP_LIMIT = 100


def queueing_lock(church_id: uuid.UUID | str) -> str:
    """At most one waiting provisioning job per church."""
    return f"number:{church_id}"


@blueprint.task(
    name="provision_number",
    queue=NUMBERS_QUEUE,
    retry=procrastinate.RetryStrategy(max_attempts=8, exponential_wait=2),
)
async def provision_number(church_id: str) -> None:
    job = resources()
    status = await provision(job.database, job.settings, job.telnyx, uuid.UUID(church_id))
    log.info("number_provisioned", church_id=church_id, status=status)


@blueprint.periodic(cron="*/5 * * * *")
@blueprint.task(
    name="retry_stuck_numbers", queue=NUMBERS_QUEUE, queueing_lock="stuck-numbers", retry=JOB_RETRY
)
async def retry_stuck_numbers(timestamp: int) -> None:
    """Churches whose number is not assigned 2 minutes after sign-up get another job."""
    job = resources()
    cutoff = datetime.now(UTC) - STUCK_AFTER
    async with job.database.sessions() as session:
        church_ids = list(
            (
                await session.execute(
                    select(Church.id)
                    .where(Church.number_status != ASSIGNED, Church.created_at < cutoff)
                    .order_by(Church.created_at)
                    .limit(SWEEP_LIMIT)
                )
            ).scalars()
        )
    deferred = 0
    for church_id in church_ids:
        # Registered tasks live on the never-opened registry App: defer via this app's
        # job manager (as `koinonia.jobs.defer` does), with the per-church queueing lock.
        deferrer = procrastinate_tasks.configure_task(
            name=PROVISION_TASK,
            job_manager=job.job_app.job_manager,
            queue=NUMBERS_QUEUE,
            queueing_lock=queueing_lock(church_id),
        )
        try:
            await deferrer.defer_async(church_id=str(church_id))
            deferred += 1
        except AlreadyEnqueued:
            continue
    log.info("stuck_numbers_retried", found=len(church_ids), deferred=deferred)
