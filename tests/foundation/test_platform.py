"""Migrations, metrics and the OpenAPI document."""

from __future__ import annotations

import httpx
import psycopg
from alembic import command

from koinonia.cli.database import alembic_config
from tests.conftest import ADMIN_URL, create_scratch_database, direct_database_url, drop_database


def _tables(name: str) -> set[str]:
    url = ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(url) as connection:
        rows = connection.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
    return {row[0] for row in rows}


def test_migrations_upgrade_downgrade_and_upgrade_again() -> None:
    name = create_scratch_database("koinonia_migrations")
    try:
        config = alembic_config(direct_database_url(name))
        command.upgrade(config, "heads")
        upgraded = _tables(name)
        assert {"procrastinate_jobs", "audit_log", "alembic_version"} <= upgraded
        command.downgrade(config, "base")
        assert _tables(name) == {"alembic_version"}
        command.upgrade(config, "heads")
        assert _tables(name) == upgraded
    finally:
        drop_database(name)


async def test_metrics_use_route_templates(client: httpx.AsyncClient) -> None:
    await client.get("/api/v1/health")
    await client.get("/api/v1/does-not-exist/12345")
    text = (await client.get("/metrics")).text
    assert 'koinonia_http_requests_total{method="GET",route="/api/v1/health",status="200"}' in text
    assert "/does-not-exist/12345" not in text
    assert 'route="<unmatched>"' in text
    assert "koinonia_http_requests_in_flight" in text
    assert "koinonia_db_pool_connections_in_use" in text
    assert "koinonia_http_request_duration_seconds_bucket" in text


async def test_openapi_documents_problems(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/api/openapi.json")).json()
    assert "Problem" in spec["components"]["schemas"]
    assert "/api/v1/health" in spec["paths"]
    docs = await client.get("/api/docs")
    assert docs.status_code == 200
    assert "swagger-ui" in docs.text.lower()
