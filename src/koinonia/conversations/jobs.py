"""Jobs of the inbox: sending one text (ahead of broadcast batches)."""

from __future__ import annotations

from datetime import datetime

import structlog
from procrastinate import Blueprint

from koinonia.conversations.sending import run_reply
from koinonia.conversations.service import REPLY_QUEUE
from koinonia.jobs import JOB_RETRY, resources
from koinonia.messaging.jobs import send_context

blueprint = Blueprint()
log = structlog.get_logger(__name__)


@blueprint.task(name="send_reply", queue=REPLY_QUEUE, retry=JOB_RETRY)
async def send_reply(message_id: int, created_at: str) -> None:
    job = resources()
    outcome = await run_reply(
        send_context(job), job.database, job.job_app, message_id, datetime.fromisoformat(created_at)
    )
    log.info("reply_attempted", outcome=outcome)
