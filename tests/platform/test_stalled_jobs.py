"""Jobs left `doing` by a worker that died are recovered — and one that cannot go back to
`todo` is closed instead of left `doing` for ever (the model test found that sequence:
connections dropped again and again left a batch job `doing`, holding its church's lock,
because its retry collided with a newer job's queueing lock)."""

from __future__ import annotations

import time
import uuid

from koinonia.jobs import build_job_app, defer
from koinonia.settings import Settings
from koinonia.telnyx.loops import recover_stalled_job

TASK = "messaging:ensure_partitions"  # queue `maintenance`, queueing lock `partitions`


async def test_a_stalled_job_is_retried_or_closed_never_left_doing(settings: Settings) -> None:
    job_app = build_job_app(settings)
    lock = f"stalled-{uuid.uuid4().hex[:8]}"
    async with job_app.open_async():
        manager = job_app.job_manager
        stuck_id = await defer(
            job_app, TASK, queue="maintenance", queueing_lock=lock, timestamp=int(time.time())
        )
        plain_id = await defer(job_app, TASK, queue="maintenance", timestamp=int(time.time()))
        connector = job_app.connector
        # As a worker that died mid-job leaves them: `doing`, no live worker.
        await connector.execute_query_async(
            "UPDATE procrastinate_jobs SET status = 'doing', worker_id = NULL "
            "WHERE id = ANY(%(ids)s)",
            ids=[stuck_id, plain_id],
        )
        # A newer run took the queueing lock meanwhile, so the first cannot go back to todo.
        newer_id = await defer(
            job_app, TASK, queue="maintenance", queueing_lock=lock, timestamp=int(time.time())
        )
        stalled = [
            job
            for job in await manager.get_stalled_jobs(seconds_since_heartbeat=30)
            if job.id in (stuck_id, plain_id)
        ]
        assert sorted(job.id for job in stalled) == sorted([stuck_id, plain_id])
        for job in stalled:
            await recover_stalled_job(manager, job)
        rows = await connector.execute_query_all_async(
            "SELECT id, status FROM procrastinate_jobs WHERE id = ANY(%(ids)s)",
            ids=[stuck_id, plain_id, newer_id],
        )
        states = {row["id"]: row["status"] for row in rows}
        assert states == {stuck_id: "failed", plain_id: "todo", newer_id: "todo"}
        await connector.execute_query_async(
            "DELETE FROM procrastinate_jobs WHERE id = ANY(%(ids)s)",
            ids=[stuck_id, plain_id, newer_id],
        )
