"""Jobs of the messaging feature: dispatch batches and keeping partitions ahead."""

from __future__ import annotations

import uuid
from datetime import datetime

import structlog
from procrastinate import Blueprint

from koinonia import partitions
from koinonia.jobs import JOB_RETRY, JobResources, resources
from koinonia.messaging.broadcasts import SEND_QUEUE, start_held
from koinonia.messaging.delivery import SendContext
from koinonia.messaging.sending import continue_batch, run_batch

blueprint = Blueprint()
log = structlog.get_logger(__name__)
_contexts: dict[int, tuple[JobResources, SendContext]] = {}


def send_context(job: JobResources) -> SendContext:
    """One per worker process (per open resources).

    Held with the resources it was built from and matched by identity: an `id()` alone
    can be reused by the next resources once the old ones are freed (a worker's next
    supervised round), which handed out the old, closed Telnyx client and Redis pool."""
    cached = _contexts.get(id(job))
    if cached is None or cached[0] is not job:
        _contexts.clear()
        cached = _contexts[id(job)] = (job, SendContext.build(job.settings, job.redis, job.telnyx))
    return cached[1]


@blueprint.task(name="start_broadcast", queue=SEND_QUEUE, retry=JOB_RETRY)
async def start_broadcast(message_id: str) -> None:
    job = resources()
    outcome = await start_held(job.database, job.job_app, uuid.UUID(message_id))
    log.info("broadcast_start", message_id=message_id, outcome=outcome)


@blueprint.task(name="wake_batch", queue=SEND_QUEUE, retry=JOB_RETRY)
async def wake_batch(
    message_id: str, created_at: str, batch_no: int, church_id: str, fresh: bool = False
) -> None:
    """Lock-free timer of a waiting batch: queue the batch (under its church's lock) now."""
    job = resources()
    await continue_batch(
        job.database,
        job.job_app,
        uuid.UUID(message_id),
        datetime.fromisoformat(created_at),
        uuid.UUID(church_id),
        batch_no,
        0,
        fresh=fresh,
    )


@blueprint.task(name="send_batch", queue=SEND_QUEUE, retry=JOB_RETRY)
async def send_batch(message_id: str, created_at: str, batch_no: int) -> None:
    job = resources()
    report = await run_batch(
        send_context(job),
        job.database,
        job.job_app,
        uuid.UUID(message_id),
        datetime.fromisoformat(created_at),
        batch_no,
    )
    log.info(
        "batch_slice_done",
        message_id=message_id,
        batch_no=batch_no,
        sent=report.sent,
        other=report.other,
        continues_in=report.deferred_for,
    )


@blueprint.periodic(cron="17 3 * * *")
@blueprint.task(
    name="ensure_partitions", queue="maintenance", queueing_lock="partitions", retry=JOB_RETRY
)
async def ensure_partitions(timestamp: int) -> None:
    job = resources()
    async with job.database.engine.begin() as connection:
        created = await partitions.ensure(connection, job.settings.partition_months_ahead)
    log.info("partitions_ensured", created=created)
