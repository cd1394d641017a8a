"""`koinonia partitions ensure|list`: the monthly partitions of the partitioned tables."""

from __future__ import annotations

import asyncio

import typer

from koinonia import partitions
from koinonia.cli.common import settings_or_exit
from koinonia.db import Database

app = typer.Typer(help="Monthly partitions.", no_args_is_help=True)


async def _ensure(months_ahead: int | None) -> list[str]:
    settings = settings_or_exit()
    database = Database(settings)
    try:
        async with database.engine.begin() as connection:
            return await partitions.ensure(
                connection, months_ahead or settings.partition_months_ahead
            )
    finally:
        await database.dispose()


async def _list() -> list[partitions.PartitionInfo]:
    database = Database(settings_or_exit())
    try:
        async with database.engine.connect() as connection:
            return await partitions.list_partitions(connection)
    finally:
        await database.dispose()


@app.command()
def ensure(
    months_ahead: int = typer.Option(None, min=1, max=24, help="Default: PARTITION_MONTHS_AHEAD"),
) -> None:
    """Create any missing partition from this month to N months ahead (idempotent)."""
    created = asyncio.run(_ensure(months_ahead))
    typer.echo("created: " + (", ".join(created) if created else "nothing (all present)"))


@app.command("list")
def list_() -> None:
    """Every partition with its bounds and estimated rows."""
    for info in asyncio.run(_list()):
        typer.echo(f"{info.name:40} {info.bounds:80} ~{info.rows_estimate} rows")
