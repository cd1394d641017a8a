"""Shared bench plumbing: a scratch database built by the migrations, and timing."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql

ADMIN_URL = os.environ.get(
    "BENCH_DATABASE_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@contextmanager
def scratch_database(prefix: str = "koinonia_bench") -> Iterator[str]:
    """A fresh database migrated to head; yields its SQLAlchemy URL, dropped afterwards."""
    from alembic import command

    from koinonia.cli.database import alembic_config

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    try:
        command.upgrade(alembic_config(url), "heads")
        yield url
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@contextmanager
def timer(results: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    results[name] = time.perf_counter() - start


def plain_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def settings_for(url: str, **overrides: Any) -> Any:
    from koinonia.settings import load_settings

    return load_settings(
        KOINONIA_ENV="development", database_url=url, log_level="WARNING", **overrides
    )
