"""The worker's long-running loops: applying stored Telnyx events, and settling sends in
doubt. They run beside the procrastinate worker in every worker process."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import structlog
from procrastinate.jobs import Job, Status
from procrastinate.manager import JobManager

from koinonia.jobs import JobResources
from koinonia.members.crypto import ContactCipher
from koinonia.messaging.jobs import send_context
from koinonia.messaging.reconcile import reconcile
from koinonia.messaging.suppressions import suppression_key
from koinonia.telnyx.events import apply_pending

log = structlog.get_logger(__name__)
IDLE_POLL_SECONDS = 0.2


async def apply_events_forever(job: JobResources) -> None:
    cipher = ContactCipher.from_settings(job.settings)
    context = send_context(job)
    limit = job.settings.webhook_apply_batch_size
    while True:
        try:
            applied = await apply_pending(
                job.database,
                cipher,
                job.job_app,
                context.ref_key,
                limit,
                suppression_key=suppression_key(job.settings),
            )
        except Exception:  # a database outage: keep the loop alive and try again
            log.exception("event_loop_error")
            applied = None
        if applied is None or applied.events < limit:
            await asyncio.sleep(IDLE_POLL_SECONDS)


async def reconcile_forever(job: JobResources) -> None:
    context = send_context(job)
    every = min(10.0, max(0.5, job.settings.send_reconcile_after_seconds / 2))
    while True:
        try:
            await reconcile(context, job.database, job.job_app)
        except Exception:
            log.exception("reconcile_error")
        await asyncio.sleep(every)


STALLED_AFTER_SECONDS = 30.0  # procrastinate workers heartbeat every 10 s


async def recover_stalled_jobs_forever(job: JobResources, every: float = 5.0) -> None:
    """Jobs of a worker that died (SIGKILL, lost host) stay `doing` and, through their
    lock, would hold back every later batch of their church: retry them."""
    manager = job.job_app.job_manager
    while True:
        try:
            for stalled in await manager.get_stalled_jobs(
                seconds_since_heartbeat=STALLED_AFTER_SECONDS
            ):
                await recover_stalled_job(manager, stalled)
        except Exception:
            log.exception("stalled_job_recovery_error")
        await asyncio.sleep(every)


async def recover_stalled_job(manager: JobManager, stalled: Job) -> None:
    """Retry one stalled job; one that cannot go back to `todo` (its queueing lock is
    taken by a newer job) is closed as failed instead — left `doing`, it would hold its
    lock for ever. Work it leaves behind is found by the reconciler and the sweeper."""
    try:
        await manager.retry_job(stalled)
        log.warning("stalled_job_retried", job_id=stalled.id, task=stalled.task_name)
    except Exception as error:
        await manager.finish_job(stalled, status=Status.FAILED, delete_job=False)
        log.warning(
            "stalled_job_closed",
            job_id=stalled.id,
            task=stalled.task_name,
            error=type(error).__name__,
        )


@contextlib.asynccontextmanager
async def running_loops(job: JobResources) -> AsyncIterator[list[asyncio.Task[None]]]:
    tasks = [
        asyncio.create_task(apply_events_forever(job), name="telnyx-events"),
        asyncio.create_task(reconcile_forever(job), name="send-reconciler"),
        asyncio.create_task(recover_stalled_jobs_forever(job), name="stalled-jobs"),
    ]
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
