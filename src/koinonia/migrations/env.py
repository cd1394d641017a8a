"""Alembic environment: async engine on the configured database."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from koinonia.db import Base
from koinonia.models import import_all_tables

import_all_tables()
target_metadata = Base.metadata
config = context.config


def _database_url() -> str:
    url = config.attributes.get("database_url")
    if url is None:
        from koinonia.settings import get_settings

        url = get_settings().database_url
    return str(url)


def _include_object(
    obj: object, name: str | None, type_: str, reflected: bool, compare_to: object
) -> bool:
    # procrastinate's schema is applied from its own SQL, not from our metadata.
    return not (name or "").startswith(("procrastinate", "idx_procrastinate"))


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        include_object=_include_object,
        compare_type=True,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    # The database's default statement_timeout (set by `koinonia migrate`) is for the
    # application; a migration (an index on a big table) may take longer. A startup option,
    # not a SET: behind PgBouncer a session SET would outlive this client on the server
    # connection (there, where startup options are dropped, migrate directly).
    engine = create_async_engine(
        _database_url(),
        poolclass=pool.NullPool,
        connect_args={"prepare_threshold": None, "options": "-c statement_timeout=0"},
    )
    async with engine.connect() as connection:
        await connection.run_sync(_run)
    await engine.dispose()


def run_migrations_offline() -> None:
    context.configure(
        url=_database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
    else:
        asyncio.run(_run_async())
