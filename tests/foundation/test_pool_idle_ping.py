"""Pooled connections: checked before use only after sitting idle (`_ping_after_idle`)."""

from __future__ import annotations

import asyncio

import psycopg
import pytest
from sqlalchemy import text

from koinonia.db import create_engine
from koinonia.settings import Settings
from tests.conftest import direct_database_url, make_settings

pytestmark = pytest.mark.nopgbouncer  # terminates server sessions it can see directly


def _terminate(database_name: str, application_name: str) -> int:
    url = direct_database_url(database_name).replace("+psycopg", "")
    with psycopg.connect(url, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND application_name = %s",
            (database_name, application_name),
        ).fetchall()
    return len(rows)


@pytest.mark.parametrize("autocommit", [False, True])  # False: the pre-ping
async def test_a_connection_killed_while_idle_is_replaced_before_use(
    settings: Settings, database_name: str, autocommit: bool
) -> None:
    engine = create_engine(
        settings.database_url,
        make_settings(database_url=settings.database_url, database_ping_after_idle_seconds=0.2),
        name=f"idle-{autocommit}",
        autocommit=autocommit,
    )
    try:
        async with engine.connect() as connection:
            assert (await connection.execute(text("SELECT 1"))).scalar_one() == 1
        assert _terminate(database_name, f"koinonia-idle-{autocommit}") == 1
        await asyncio.sleep(0.25)  # idle past the threshold: the point of the test, not a wait
        async with engine.connect() as connection:  # pinged, found dead, replaced
            assert (await connection.execute(text("SELECT 2"))).scalar_one() == 2
    finally:
        await engine.dispose()


async def test_a_connection_used_a_moment_ago_is_not_pinged(settings: Settings) -> None:
    engine = create_engine(
        settings.database_url,
        make_settings(database_url=settings.database_url, database_ping_after_idle_seconds=60),
        name="busy",
        autocommit=True,
    )
    statements: list[str] = []
    from sqlalchemy import event

    event.listen(
        engine.sync_engine, "before_cursor_execute", lambda *a: statements.append(a[2])
    )
    try:
        for _ in range(3):
            async with engine.connect() as connection:
                await connection.execute(text("SELECT 3"))
        assert statements == ["SELECT 3"] * 3  # no pings, no BEGIN/ROLLBACK statements
    finally:
        await engine.dispose()
