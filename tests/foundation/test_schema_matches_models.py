"""The migrated schema and the SQLAlchemy models agree (what `alembic revision
--autogenerate` would find is nothing), so a model change without its migration — or a
migration the models do not know about — fails here."""

from __future__ import annotations

import re
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from koinonia.cli.database import alembic_config
from koinonia.db import Base
from koinonia.models import import_all_tables
from tests.conftest import create_scratch_database, direct_database_url, drop_database

# Monthly partitions are created by `koinonia partitions`, and procrastinate owns its
# tables: neither is described by our models.
NOT_MODELLED = re.compile(r"(_p\d{6}$)|(^procrastinate_)")


def _table_of(change: Any) -> str:
    if isinstance(change, list):  # column changes come grouped
        return str(change[0][2])
    item = change[1]
    table = getattr(item, "table", None)
    return str(getattr(table, "name", None) or getattr(item, "name", ""))


def test_migrations_produce_what_the_models_describe() -> None:
    import_all_tables()
    name = create_scratch_database("koinonia_schema")
    try:
        url = direct_database_url(name)
        command.upgrade(alembic_config(url), "heads")
        engine = sa.create_engine(url)
        try:
            with engine.connect() as connection:
                context = MigrationContext.configure(connection, opts={"compare_type": True})
                changes = compare_metadata(context, Base.metadata)
        finally:
            engine.dispose()
    finally:
        drop_database(name)
    drift = [c for c in changes if not NOT_MODELLED.search(_table_of(c))]
    assert drift == []
