"""Jobs of the members feature."""

from __future__ import annotations

import uuid

from procrastinate import Blueprint

from koinonia.jobs import JOB_RETRY, resources
from koinonia.members.crypto import ContactCipher
from koinonia.members.imports import import_in_job
from koinonia.members.service import church_region

blueprint = Blueprint()
IMPORT_QUEUE = "imports"


@blueprint.task(name="import_members", queue=IMPORT_QUEUE, retry=JOB_RETRY)
async def import_members(import_id: str, church_id: str) -> None:
    job = resources()
    async with job.database.sessions() as session:
        region = await church_region(session, uuid.UUID(church_id))
    cipher = ContactCipher.from_settings(job.settings)
    await import_in_job(job.database, cipher, uuid.UUID(import_id), region)
