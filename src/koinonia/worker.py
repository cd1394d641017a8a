"""The worker process: procrastinate jobs plus the features' long-running loops."""

from __future__ import annotations

from typing import Any

import structlog

from koinonia.jobs import build_job_app, open_resources
from koinonia.logging import configure_logging
from koinonia.settings import Settings

log = structlog.get_logger("koinonia.worker")


async def run_worker(settings: Settings, *, concurrency: int, queues: list[str] | None) -> None:
    configure_logging(settings.log_level, settings.log_file, settings.log_file_backup_count)
    job_app = build_job_app(settings, pool_max=concurrency + 2)
    log.info("worker_starting", concurrency=concurrency, queues=queues or "all")
    options: dict[str, Any] = {
        "concurrency": concurrency,
        "install_signal_handlers": True,
        "fetch_job_polling_interval": settings.worker_poll_seconds,
    }
    if queues:  # procrastinate listens to every queue unless told otherwise
        options["queues"] = queues
    from koinonia.telnyx.loops import running_loops

    async with (
        job_app.open_async(),
        open_resources(settings, job_app) as job,
        running_loops(job),
    ):
        await job_app.run_worker_async(**options)
