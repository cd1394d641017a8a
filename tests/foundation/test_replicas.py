"""Read replicas: a real streaming replica on port 5433 (scripts/replica.sh)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import httpx
import psycopg
import pytest
from fastapi import APIRouter
from sqlalchemy import text

from koinonia.accounts.deps import CurrentPrincipal
from koinonia.app import create_app
from koinonia.http.deps import DbSession
from koinonia.replicas import ReadSession
from koinonia.settings import Settings
from tests.conftest import make_settings

REPLICA_HOSTPORT = os.environ.get("TEST_REPLICA_HOSTPORT", "127.0.0.1:5433")

reads = APIRouter(prefix="/api/v1/_replica")


@reads.get("/where")
async def where(principal: CurrentPrincipal, session: ReadSession) -> dict[str, bool]:
    in_recovery = (await session.execute(text("SELECT pg_is_in_recovery()"))).scalar_one()
    return {"replica": bool(in_recovery)}


@reads.post("/write")
async def write(principal: CurrentPrincipal, session: DbSession) -> dict[str, bool]:
    await session.execute(text("SELECT 1"))
    return {"ok": True}


@pytest.fixture
async def replica_client(
    settings: Settings, database_name: str
) -> AsyncIterator[tuple[httpx.AsyncClient, object]]:
    replica_url = f"postgresql://postgres@{REPLICA_HOSTPORT}/{database_name}"
    app = create_app(
        make_settings(
            database_url=settings.database_url,
            database_replica_urls=replica_url,
            replica_max_lag_seconds=0.5,
            read_your_writes_seconds=3,
        )
    )
    app.include_router(reads)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield client, app


async def test_reads_go_to_the_replica_except_right_after_a_write(
    replica_client: tuple[httpx.AsyncClient, object],
    tenant_factory: object,
) -> None:
    client, _ = replica_client
    tenant = await tenant_factory()  # type: ignore[operator]
    other = await tenant_factory()  # type: ignore[operator]

    async def where(headers: dict[str, str]) -> bool:
        body = (await client.get("/api/v1/_replica/where", headers=headers)).json()
        return bool(body["replica"])

    async def eventually_on_replica(headers: dict[str, str]) -> None:
        # The shared replica may lag past the 0.5 s limit for a moment on a busy machine
        # (other tests pause its replay, create databases): wait for it, with a deadline.
        deadline = time.monotonic() + 15
        while not await where(headers):
            assert time.monotonic() < deadline, "reads never went to the replica"
            await asyncio.sleep(0.1)

    await eventually_on_replica(tenant.headers)
    assert (await client.post("/api/v1/_replica/write", headers=tenant.headers)).status_code == 200
    # The writer reads its own write from the primary (for READ_YOUR_WRITES_SECONDS, 3 s).
    assert await where(tenant.headers) is False
    await eventually_on_replica(other.headers)  # another church still uses the replica
    await eventually_on_replica(tenant.headers)  # and so does the writer, once the window ends
    deadline = time.monotonic() + 15
    while (await client.get("/api/v1/health")).json()["checks"]["replica0"]["status"] != "ok":
        assert time.monotonic() < deadline, "the replica never looked healthy"
        await asyncio.sleep(0.1)


async def test_a_lagging_replica_is_bypassed(
    replica_client: tuple[httpx.AsyncClient, object],
    tenant_factory: object,
    database_name: str,
) -> None:
    client, app = replica_client
    tenant = await tenant_factory()  # type: ignore[operator]
    replica = f"postgresql://postgres@{REPLICA_HOSTPORT}/{database_name}"
    with psycopg.connect(replica, autocommit=True) as connection:
        connection.execute("SELECT pg_wal_replay_pause()")
        try:
            await tenant_factory()  # type: ignore[operator]  # a write the replica won't replay
            await asyncio.sleep(1.0)
            await app.state.replicas.measure()  # type: ignore[attr-defined]
            body = (await client.get("/api/v1/_replica/where", headers=tenant.headers)).json()
            assert body == {"replica": False}
            health = (await client.get("/api/v1/health")).json()
            assert health["status"] == "degraded"
            assert health["checks"]["replica0"]["status"] == "degraded"
        finally:
            connection.execute("SELECT pg_wal_replay_resume()")


async def test_an_unreachable_replica_falls_back_to_the_primary(
    settings: Settings,
    tenant_factory: object,
) -> None:
    app = create_app(
        make_settings(
            database_url=settings.database_url,
            database_replica_urls="postgresql://postgres@127.0.0.1:1/x",
            database_connect_timeout=1,
        )
    )
    app.include_router(reads)
    tenant = await tenant_factory()  # type: ignore[operator]
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            body = (await client.get("/api/v1/_replica/where", headers=tenant.headers)).json()
            assert body == {"replica": False}
            health = await client.get("/api/v1/health")
            assert health.status_code == 200
            assert health.json()["checks"]["replica0"]["status"] == "down"
