"""`koinonia backup config|init|run|list|check` and `koinonia restore` (pgBackRest).

See docs/backups.md (how it works) and docs/disaster-recovery.md (restoring for real).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import typer

from koinonia.backups.config import BackupConfig, BackupConfigError
from koinonia.backups.pgbackrest import (
    BackupType,
    PgBackRest,
    PgBackRestError,
    chown_to,
    format_target,
)
from koinonia.backups.pgbackrest import (
    restore as restore_stanza,
)
from koinonia.cli.common import settings_or_exit

app = typer.Typer(help="Backups: pgBackRest to S3-compatible storage.", no_args_is_help=True)


def _config() -> BackupConfig:
    return BackupConfig.from_settings(settings_or_exit())


def _pgbackrest() -> PgBackRest:
    config = _config()
    if not config.config_path.exists():
        _fail(
            f"{config.config_path} does not exist: render it first with "
            "`koinonia backup config --write`"
        )
    return PgBackRest(config)


def _fail(message: str) -> None:
    print(message, file=sys.stderr)
    raise typer.Exit(code=1)


def _age(moment: datetime) -> str:
    seconds = int((datetime.now(UTC) - moment).total_seconds())
    hours, rest = divmod(max(0, seconds), 3600)
    return f"{hours}h{rest // 60:02d}m"


@app.command()
def config(
    write: bool = typer.Option(
        False, "--write", help="Write BACKUP_CONFIG_PATH (mode 0640, group BACKUP_OS_USER)"
    ),
    postgresql: bool = typer.Option(
        False, "--postgresql", help="Print the primary's archiving settings instead"
    ),
    show_secrets: bool = typer.Option(False, help="Print the secrets instead of [REDACTED]"),
) -> None:
    """Render the pgBackRest configuration (or the primary's archiving settings)."""
    backup = _config()
    if postgresql:
        typer.echo(backup.render_postgresql(), nl=False)
        return
    try:
        rendered = backup.render()
    except BackupConfigError as error:
        _fail(f"cannot render the backup configuration: {error}")
        return
    if not write:
        typer.echo(rendered if show_secrets else backup.redacted(rendered), nl=False)
        return
    path = backup.config_path
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(rendered)
    path.chmod(0o640)
    chown_to(backup.os_user, path)
    typer.echo(f"wrote {path}")


@app.command()
def init() -> None:
    """Create the stanza in the repository (idempotent), then `check`."""
    pgbackrest = _pgbackrest()
    try:
        pgbackrest.stanza_create()
        pgbackrest.check()
    except PgBackRestError as error:
        _fail(str(error))
    typer.echo(f"stanza {pgbackrest.config.stanza} ready; WAL archiving reaches the repository")


@app.command()
def run(
    backup_type: str = typer.Option(
        "diff", "--type", help="full | diff (changes since the last full) | incr"
    ),
) -> None:
    """Take a backup now (the timers in deploy/pgbackrest/ run full weekly, diff daily)."""
    if backup_type not in ("full", "diff", "incr"):
        _fail("--type must be full, diff or incr")
    kind: BackupType = backup_type  # type: ignore[assignment]
    pgbackrest = _pgbackrest()
    try:
        backup = pgbackrest.backup(kind)
    except PgBackRestError as error:
        _fail(str(error))
        return
    seconds = (backup.stopped - backup.started).total_seconds()
    typer.echo(
        f"backup {backup.label} ({backup.type}) done in {seconds:.0f}s: "
        f"{backup.size_bytes / 1e6:.1f} MB of data, {backup.repo_size_bytes / 1e6:.1f} MB stored"
    )


@app.command("list")
def list_backups(
    as_json: bool = typer.Option(False, "--json", help="pgBackRest's JSON as it is"),
) -> None:
    """The backups in the repository and the archived WAL range."""
    pgbackrest = _pgbackrest()
    try:
        if as_json:
            typer.echo(pgbackrest.info_json())
            return
        info = pgbackrest.stanza_info()
    except PgBackRestError as error:
        _fail(str(error))
        return
    typer.echo(
        f"stanza {info.name}: {info.status_message} (cipher {info.cipher}); "
        f"WAL {info.wal_min or '-'} … {info.wal_max or '-'}"
    )
    typer.echo(f"{'label':<36} {'type':<5} {'finished (UTC)':<20} {'age':>8} {'stored':>10}")
    for backup in sorted(info.backups, key=lambda b: b.stopped):
        flag = "  (errors)" if backup.error else ""
        typer.echo(
            f"{backup.label:<36} {backup.type:<5} "
            f"{backup.stopped.strftime('%Y-%m-%d %H:%M:%S'):<20} {_age(backup.stopped):>8} "
            f"{backup.repo_size_bytes / 1e6:>8.1f}MB{flag}"
        )


@app.command()
def check(
    max_age_hours: float = typer.Option(
        0, help="Also fail when the last good backup is older than this (0: do not check)"
    ),
) -> None:
    """Check the repository and WAL archiving (pgbackrest check); print backup ages."""
    pgbackrest = _pgbackrest()
    try:
        pgbackrest.check()
        info = pgbackrest.stanza_info()
    except PgBackRestError as error:
        _fail(str(error))
        return
    last = info.last_good
    if last is None:
        _fail("WAL archiving works but the repository has no good backup yet")
        return
    age_hours = (datetime.now(UTC) - last.stopped).total_seconds() / 3600
    typer.echo(
        f"ok: archiving reaches the repository; last good backup {last.label} ({last.type}) "
        f"{age_hours:.1f}h ago; WAL up to {info.wal_max}"
    )
    if max_age_hours and age_hours > max_age_hours:
        _fail(f"the last good backup is {age_hours:.1f}h old (more than {max_age_hours:g}h)")


def _parse_time(value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value.strip().replace(" UTC", "+00:00"))
    except ValueError:
        raise typer.BadParameter(
            "expected an ISO 8601 time with a zone, e.g. 2026-11-29T10:15:00+00:00"
        ) from None
    if moment.tzinfo is None:
        raise typer.BadParameter("give the time zone, e.g. 2026-11-29T10:15:00+00:00")
    return moment


def _parse_target(value: str, port: int | None) -> tuple[Path, int | None]:
    directory, sep, maybe_port = value.rpartition(":")
    if sep and maybe_port.isdigit() and directory:
        if port is not None and port != int(maybe_port):
            raise typer.BadParameter("the port is given twice, differently")
        return Path(directory), int(maybe_port)
    return Path(value), port


def restore(
    to: str = typer.Option(
        "",
        "--to",
        help="Recover up to this time (ISO 8601 with zone); empty: all archived WAL",
    ),
    target: str = typer.Option(
        ..., "--target", help="New (or empty) data directory, optionally DIR:PORT"
    ),
    port: int = typer.Option(
        None, "--port", min=1, max=65535, help="Start the restored cluster on 127.0.0.1:PORT"
    ),
    archive: bool = typer.Option(
        False, help="Keep WAL archiving on in the restored cluster (only for a new primary)"
    ),
    backup_set: str = typer.Option(None, "--set", help="Restore this backup set (default: best)"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON"),
) -> None:
    """Point-in-time restore of the stanza into a new directory (never the primary's)."""
    moment = _parse_time(to) if to else None
    directory, serve_port = _parse_target(target, port)
    pgbackrest = _pgbackrest()
    shown = format_target(moment) if moment else "the end of the archived WAL"
    if not as_json:
        typer.echo(f"restoring {pgbackrest.config.stanza} into {directory} up to {shown}")
    try:
        result = restore_stanza(
            pgbackrest,
            directory,
            to=moment,
            port=serve_port,
            archive=archive,
            backup_set=backup_set,
        )
    except PgBackRestError as error:
        _fail(str(error))
        return
    if as_json:
        document = {
            key: (str(value) if isinstance(value, Path | datetime) else value)
            for key, value in asdict(result).items()
        }
        typer.echo(json.dumps(document))
        return
    typer.echo(f"files restored in {result.restore_seconds:.1f}s")
    if result.port is not None and result.recovery_seconds is not None:
        typer.echo(
            f"recovered and promoted in {result.recovery_seconds:.1f}s; serving on "
            f"127.0.0.1:{result.port} (archive_mode {'on' if archive else 'off'})"
        )
    else:
        typer.echo(f"start it with: pg_ctl -D {directory} start (it recovers, then promotes)")
