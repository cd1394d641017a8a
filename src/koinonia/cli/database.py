"""`koinonia migrate` and database creation."""

from __future__ import annotations

from pathlib import Path

import psycopg
import typer
from alembic import command
from alembic.config import Config
from psycopg import sql

from koinonia.cli.common import settings_or_exit
from koinonia.db import timeout_values
from koinonia.jobs import psycopg_conninfo
from koinonia.settings import Settings

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["database_url"] = database_url
    return config


def ensure_database(database_url: str) -> bool:
    """Create the database named in the URL if it does not exist; True if created."""
    conninfo = psycopg.conninfo.conninfo_to_dict(psycopg_conninfo(database_url))
    name = str(conninfo["dbname"])
    conninfo["dbname"] = "postgres"
    with psycopg.connect(**conninfo, autocommit=True) as connection:  # type: ignore[arg-type]
        exists = connection.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
        ).fetchone()
        if exists:
            return False
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return True


def migrate(
    revision: str = typer.Argument("heads", help="Target revision (default: all heads)"),
    create_db: bool = typer.Option(True, help="Create the database first if it is missing"),
) -> None:
    """Create the database if needed and apply migrations."""
    settings = settings_or_exit()
    if create_db and ensure_database(settings.database_url):
        typer.echo("created database")
    command.upgrade(alembic_config(settings.database_url), revision)
    apply_database_timeouts(settings)
    typer.echo(f"database migrated to {revision}")


def apply_database_timeouts(settings: Settings, database_url: str | None = None) -> None:
    """Make the configured timeouts the database's defaults for every new session: they
    then hold behind PgBouncer (which drops startup options) at no cost per request."""
    conninfo = psycopg_conninfo(database_url or settings.database_url)
    with psycopg.connect(conninfo, autocommit=True) as connection:
        row = connection.execute("SELECT current_database()").fetchone()
        assert row is not None
        for name, value in timeout_values(settings).items():
            connection.execute(
                sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                    sql.Identifier(str(row[0])), sql.Identifier(name), sql.Literal(value)
                )
            )


def downgrade(revision: str = typer.Argument(..., help="Target revision, e.g. base")) -> None:
    """Revert migrations down to REVISION."""
    settings = settings_or_exit()
    command.downgrade(alembic_config(settings.database_url), revision)
    typer.echo(f"database downgraded to {revision}")
