"""Shared bench plumbing: a scratch database built by the migrations, and timing."""

from __future__ import annotations

import datetime as dt
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


def phone_of(i: int, area: str) -> str:
    """Distinct valid-looking US numbers: exchange 200+, line 1000-9999 (never the
    0000/0001/0002 endings the sandbox refuses)."""
    return f"+1{area}{200 + i // 9000}{1000 + i % 9000:04d}"


async def give_number(
    database: Any, settings: Any, church_id: uuid.UUID, number: str, segments: int
) -> None:
    """An assigned sending number (as provisioning leaves it) and a segment grant."""
    from sqlalchemy import update

    from koinonia.accounts.tables import Church
    from koinonia.billing import ledger

    async with database.unit_of_work() as session:
        await session.execute(
            update(Church)
            .where(Church.id == church_id)
            # The bench runs at any hour: a window open all day (start == end).
            .values(
                phone_number=number,
                number_status="assigned",
                send_window_start=dt.time(0, 0),
                send_window_end=dt.time(0, 0),
            )
        )
        subscription = await ledger.ensure_subscription(session, settings, church_id)
        await ledger.grant(session, church_id, subscription.period_start, segments, "bench-grant")


def copy_members(url: str, settings: Any, church_id: uuid.UUID, phones: list[str]) -> uuid.UUID:
    """Members with `phones` (encrypted as the app does) COPYed into a new group, then
    ANALYZE; answers the group id."""
    from koinonia.members.crypto import ContactCipher

    cipher = ContactCipher.from_settings(settings)
    group_id = uuid.uuid4()
    with psycopg.connect(plain_url(url)) as connection:
        connection.execute(
            "INSERT INTO groups (id, church_id, name) VALUES (%s, %s, %s)",
            (group_id, church_id, "bench"),
        )
        with (
            connection.cursor() as cursor,
            cursor.copy(
                "COPY members (id, church_id, first_name, last_name, phone_ct, phone_hash) "
                "FROM STDIN"
            ) as copy,
        ):
            for i, phone in enumerate(phones):
                copy.write_row(
                    (
                        uuid.uuid4(),
                        church_id,
                        f"Member{i}",
                        "Bench",
                        cipher.encrypt(phone, church_id),
                        cipher.phone_hash(phone, church_id),
                    )
                )
        connection.execute(
            "INSERT INTO group_members (group_id, member_id) "
            "SELECT %s, id FROM members WHERE church_id = %s",
            (group_id, church_id),
        )
    with psycopg.connect(plain_url(url), autocommit=True) as connection:
        connection.execute("ANALYZE members")
        connection.execute("ANALYZE group_members")
    return group_id
