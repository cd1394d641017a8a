"""Running an import: inline for small files, as a job for big ones, and its record."""

from __future__ import annotations

import io
import uuid
from datetime import UTC, datetime
from typing import IO

import structlog
from sqlalchemy import delete, update
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.db import Database
from koinonia.members.crypto import ContactCipher
from koinonia.members.importing import ImportFailedError, ImportOptions, ImportResult, run_import
from koinonia.members.tables import MemberImport, MemberImportFile

log = structlog.get_logger(__name__)


def options_of(record: MemberImport, region: str) -> ImportOptions:
    return ImportOptions(
        church_id=record.church_id,
        region=region,
        on_duplicate=record.on_duplicate,
        group_id=record.group_id,
        column_map=dict(record.column_map),
    )


def apply_result(record: MemberImport, result: ImportResult) -> None:
    record.status = "completed"
    record.processed = result.processed
    record.created = result.created
    record.updated = result.updated
    record.skipped = result.skipped
    record.error_count = result.error_count
    record.errors = result.errors
    record.finished_at = datetime.now(UTC)


async def import_inline(
    session: AsyncSession,
    record: MemberImport,
    stream: IO[bytes],
    region: str,
    cipher: ContactCipher,
) -> None:
    """Run in the request's transaction. A whole-file failure is recorded, not raised."""
    record.status = "running"
    record.started_at = datetime.now(UTC)
    try:
        async with session.begin_nested():
            result = await run_import(session, stream, options_of(record, region), cipher)
    except ImportFailedError as error:
        record.status = "failed"
        record.failure = str(error)
        record.finished_at = datetime.now(UTC)
        return
    apply_result(record, result)


async def _set(database: Database, import_id: uuid.UUID, **values: object) -> None:
    """Progress and status go in their own short transactions, visible while importing."""
    async with database.unit_of_work() as session:
        await session.execute(
            update(MemberImport).where(MemberImport.id == import_id).values(**values)
        )


async def import_in_job(
    database: Database, cipher: ContactCipher, import_id: uuid.UUID, region: str
) -> None:
    async with database.unit_of_work() as session:
        record = await session.get(MemberImport, import_id)
        if record is None or record.status in ("completed", "failed"):
            return  # already done (a replayed job changes nothing)
        upload = await session.get(MemberImportFile, import_id)
        content = bytes(upload.content) if upload else b""
        options = options_of(record, region)
    await _set(database, import_id, status="running", started_at=datetime.now(UTC))

    async def progress(processed: int) -> None:
        await _set(database, import_id, processed=processed)

    try:
        async with database.unit_of_work() as session:
            result = await run_import(session, io.BytesIO(content), options, cipher, progress)
            record = await session.get(MemberImport, import_id)
            assert record is not None
            apply_result(record, result)
            await session.execute(
                delete(MemberImportFile).where(MemberImportFile.import_id == import_id)
            )
    except ImportFailedError as error:
        await _set(
            database,
            import_id,
            status="failed",
            failure=str(error),
            finished_at=datetime.now(UTC),
        )
    except Exception:
        log.exception("member_import_crashed", import_id=str(import_id))
        await _set(
            database,
            import_id,
            status="failed",
            failure="The import stopped on an internal error; nothing was imported",
            finished_at=datetime.now(UTC),
        )
        raise
