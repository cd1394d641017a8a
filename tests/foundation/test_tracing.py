"""Traces: the request span with SQL and Redis spans as its children."""

from __future__ import annotations

import httpx
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from koinonia.settings import Settings
from tests.foundation.conftest import probe


async def test_request_database_and_redis_spans_share_one_trace(settings: Settings) -> None:
    from koinonia.app import create_app

    exporter = InMemorySpanExporter()
    app = create_app(settings, span_exporter=exporter)
    app.include_router(probe)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/api/v1/_test/db")).status_code == 200
            assert (await client.get("/api/v1/health")).status_code == 200
    spans = exporter.get_finished_spans()
    names = [span.name for span in spans]
    server = next(s for s in spans if s.name == "GET /api/v1/_test/db")
    sql = [s for s in spans if s.attributes and s.attributes.get("db.system") == "postgresql"]
    assert sql, names
    assert any(s.context.trace_id == server.context.trace_id for s in sql)
    assert any(s.attributes and s.attributes.get("db.system") == "redis" for s in spans), names
