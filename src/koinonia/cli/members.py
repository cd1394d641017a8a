"""`koinonia members …`: CSV import from a file, with a progress bar; key rotation;
phone re-normalisation."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import IO, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn
from sqlalchemy import func, select, update

from koinonia.accounts.tables import Church
from koinonia.cache import Cache
from koinonia.cli.common import settings_or_exit
from koinonia.db import Database
from koinonia.members.crypto import ContactCipher
from koinonia.members.importing import ImportFailedError, ImportOptions, run_import
from koinonia.members.imports import apply_result
from koinonia.members.renormalize import (
    Flagged,
    Renormalized,
    flagged_members,
    renormalize_phones,
)
from koinonia.members.tables import Member, MemberImport
from koinonia.redis import create_redis
from koinonia.settings import Settings

app = typer.Typer(help="Member tools.", no_args_is_help=True)
console = Console(stderr=True)


class _CountingReader:
    """A file wrapper that advances the progress bar as bytes are read."""

    def __init__(self, raw: IO[bytes], progress: Progress, task: Any) -> None:
        self._raw = raw
        self._progress = progress
        self._task = task

    def read(self, size: int = -1) -> bytes:
        chunk = self._raw.read(size)
        self._progress.advance(self._task, len(chunk))
        return chunk


async def _import(
    settings: Settings,
    path: Path,
    size: int,
    church_id: uuid.UUID,
    on_duplicate: str,
    group_id: uuid.UUID | None,
) -> MemberImport:
    database = Database(settings)
    redis = create_redis(settings)
    database.cache = Cache(redis)  # the cached inbox and group counts it changes
    cipher = ContactCipher.from_settings(settings)
    try:
        async with database.unit_of_work() as session:
            church = await session.get(Church, church_id)
            if church is None:
                raise typer.BadParameter("no such church", param_hint="--church")
            record = MemberImport(
                church_id=church_id,
                filename=path.name[:255],
                size_bytes=size,
                on_duplicate=on_duplicate,
                group_id=group_id,
                status="running",
            )
            session.add(record)
            await session.flush()
            options = ImportOptions(church_id, church.default_region, on_duplicate, group_id)
            with (
                Progress(
                    "[progress.description]{task.description}",
                    BarColumn(),
                    DownloadColumn(),
                    TimeRemainingColumn(),
                    console=console,
                ) as progress,
                path.open("rb") as raw,
            ):
                task = progress.add_task(f"Importing {path.name}", total=size)
                stream: Any = _CountingReader(raw, progress, task)
                progress.update(task, description="Reading and staging rows")
                result = await run_import(session, stream, options, cipher)
                progress.update(task, description="Merged")
            apply_result(record, result)
            return record
    finally:
        await redis.aclose()
        await database.dispose()


@app.command("import")
def import_file(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, readable=True),
    church: str = typer.Option(..., "--church", help="Church id"),
    on_duplicate: str = typer.Option("update", help="update | skip members already there"),
    group: str | None = typer.Option(None, help="Also add every imported member to this group"),
) -> None:
    """Import members from a CSV file into a church (same rules as the API)."""
    settings = settings_or_exit()
    if on_duplicate not in ("update", "skip"):
        raise typer.BadParameter("update or skip", param_hint="--on-duplicate")
    try:
        church_id = uuid.UUID(church)
        group_id = uuid.UUID(group) if group else None
    except ValueError:
        raise typer.BadParameter("must be an id (UUID)") from None
    try:
        record = asyncio.run(
            _import(settings, file, file.stat().st_size, church_id, on_duplicate, group_id)
        )
    except ImportFailedError as error:
        console.print(f"[red]Import failed:[/red] {error}")
        raise typer.Exit(code=1) from None
    typer.echo(
        f"import {record.id}: processed {record.processed}, created {record.created}, "
        f"updated {record.updated}, skipped {record.skipped}, errors {record.error_count}"
    )
    for row_error in record.errors[:20]:
        typer.echo(f"  row {row_error['row']}: {row_error['field']} {row_error['message']}")
    if record.error_count > 20:
        typer.echo(f"  … and {record.error_count - 20} more")


async def _rotate(settings: Settings, batch: int) -> int:
    database = Database(settings)
    cipher = ContactCipher.from_settings(settings)
    marker = cipher.active_key_id.encode() + b"\x00"
    changed = 0
    try:
        while True:
            async with database.unit_of_work() as session:
                rows = (
                    await session.scalars(
                        select(Member)
                        .where(
                            (func.substring(Member.phone_ct, 1, len(marker)) != marker)
                            | (func.substring(Member.email_ct, 1, len(marker)) != marker)
                        )
                        .limit(batch)
                        .with_for_update(skip_locked=True)
                    )
                ).all()
                for member in rows:
                    values: dict[str, Any] = {
                        "phone_ct": cipher.encrypt(
                            cipher.decrypt(member.phone_ct, member.church_id), member.church_id
                        )
                    }
                    if member.email_ct is not None:
                        values["email_ct"] = cipher.encrypt(
                            cipher.decrypt(member.email_ct, member.church_id), member.church_id
                        )
                    await session.execute(
                        update(Member).where(Member.id == member.id).values(**values)
                    )
                changed += len(rows)
            if len(rows) < batch:
                return changed
    finally:
        await database.dispose()


@app.command("rotate-keys")
def rotate_keys(batch: int = typer.Option(1000, min=1)) -> None:
    """Re-encrypt members' contacts still under an older key with the active key."""
    settings = settings_or_exit()
    changed = asyncio.run(_rotate(settings, batch))
    typer.echo(f"re-encrypted {changed} member(s) with key {settings.member_encryption_active_key}")


async def _renormalize(settings: Settings, batch: int) -> tuple[Renormalized, list[Flagged]]:
    database = Database(settings)
    redis = create_redis(settings)
    database.cache = Cache(redis)  # the cached inbox shows the phones it rewrites
    cipher = ContactCipher.from_settings(settings)
    try:
        result = await renormalize_phones(database, cipher, batch)
        return result, await flagged_members(database)
    finally:
        await redis.aclose()
        await database.dispose()


@app.command("renormalize-phones")
def renormalize(batch: int = typer.Option(1000, min=1)) -> None:
    """Re-normalise every stored phone to ASCII E.164 (run after `koinonia migrate`; needs
    the member keys). Same phone twice in a church: opt-outs are copied to both, the
    non-canonical one is flagged for review; every member waiting for review is listed."""
    settings = settings_or_exit()
    result, flagged = asyncio.run(_renormalize(settings, batch))
    typer.echo(
        f"checked {result.checked} member(s): re-normalised {result.rewritten}, "
        f"copied {result.opt_outs_copied} opt-out(s), flagged {len(result.flagged)}"
    )
    if flagged:
        typer.echo(f"{len(flagged)} member(s) to review (church, member, reason, duplicate of):")
    for item in flagged:
        twin = str(item.duplicate_of) if item.duplicate_of else "-"
        typer.echo(f"  {item.church_id} {item.member_id} {item.reason} {twin}")
