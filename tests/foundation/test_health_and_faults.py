"""Health report and behaviour when PostgreSQL or Redis is gone."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from koinonia.settings import Settings
from tests.conftest import make_settings
from tests.foundation.conftest import build_probe_app
from tests.support.servers import RedisProcess, free_port


async def test_health_reports_each_dependency(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    for name in ("database", "redis"):
        assert body["checks"][name]["status"] == "ok"
        assert body["checks"][name]["latency_ms"] >= 0
    assert (await client.get("/livez")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).status_code == 200


@pytest.fixture
async def app_with_own_redis(
    settings: Settings,
) -> AsyncIterator[tuple[httpx.AsyncClient, RedisProcess]]:
    redis = RedisProcess()
    redis.start()
    app = build_probe_app(
        make_settings(
            database_url=settings.database_url, redis_url=redis.url, health_check_timeout=0.5
        )
    )
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                yield client, redis
    finally:
        redis.stop()


async def test_redis_stopped_makes_health_503_but_db_routes_answer(
    app_with_own_redis: tuple[httpx.AsyncClient, RedisProcess],
) -> None:
    client, redis = app_with_own_redis
    assert (await client.get("/api/v1/health")).status_code == 200
    redis.stop()
    response = await client.get("/api/v1/health")
    assert response.status_code == 503
    body = response.json()
    assert body["checks"]["redis"]["status"] == "down"
    assert body["checks"]["database"]["status"] == "ok"
    assert (await client.get("/readyz")).status_code == 503
    assert (await client.get("/livez")).status_code == 200
    assert (await client.get("/api/v1/_test/db")).json() == {"value": 1}


async def test_database_unreachable_answers_503_problem() -> None:
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    app = build_probe_app(
        make_settings(database_url=dead, database_connect_timeout=1, health_check_timeout=2)
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.get("/api/v1/_test/db")
            assert response.status_code == 503
            body = response.json()
            assert body["code"] == "service_unavailable"
            assert "Traceback" not in response.text and "psycopg" not in response.text
            assert response.headers["retry-after"] == "5"
            health = await client.get("/api/v1/health")
            assert health.status_code == 503
            assert health.json()["checks"]["database"]["status"] == "down"
            assert (await client.get("/livez")).status_code == 200
