"""Health probes never call a provider: Telnyx and Stripe are checked in the background
(once at start-up, then every PROVIDER_HEALTH_INTERVAL_SECONDS) and probes serve the last
result. A tiny HTTP server plays both balance endpoints and counts every call."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from koinonia.app import create_app
from koinonia.settings import Settings
from tests.messaging.conftest import eventually
from tests.support.servers import LiveServer


class BalanceCounter:
    """`GET /v2/balance` (Telnyx) and `GET /v1/balance` (Stripe), counted; `failing` 500s."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.failing = False

    def app(self) -> Starlette:
        async def balance(request: Request) -> JSONResponse:
            self.calls[request.url.path] += 1
            if self.failing:
                return JSONResponse({"errors": [{"code": "10007"}]}, status_code=500)
            if request.url.path.startswith("/v1/"):
                return JSONResponse({"object": "balance", "available": [], "livemode": False})
            return JSONResponse({"data": {"record_type": "balance", "balance": "1.00"}})

        return Starlette(routes=[Route("/v2/balance", balance), Route("/v1/balance", balance)])


@pytest.fixture
def counter() -> Iterator[tuple[BalanceCounter, LiveServer]]:
    counting = BalanceCounter()
    with LiveServer(counting.app) as server:
        yield counting, server


async def _app(
    settings: Settings, server: LiveServer, interval: float
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    configured = settings.model_copy(
        update={
            "telnyx_base_url": server.url,
            "stripe_base_url": server.url,
            "provider_health_interval_seconds": interval,
        }
    )
    application = create_app(configured)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            yield application, http


async def test_many_probes_cost_no_provider_call(
    settings: Settings, redis: Any, counter: tuple[BalanceCounter, LiveServer]
) -> None:
    counting, server = counter
    async for _, http in _app(settings, server, interval=30):
        # Start-up checked each provider once.
        assert counting.calls == {"/v2/balance": 1, "/v1/balance": 1}
        answers: list[httpx.Response] = []
        for _ in range(10):  # 200 probes, 20 at a time (the database pool holds 10)
            probes = [http.get("/readyz") for _ in range(15)]
            probes += [http.get("/api/v1/health") for _ in range(5)]
            answers += await asyncio.gather(*probes)
        assert {a.status_code for a in answers} == {200}
        health = answers[-1].json()
        assert health["checks"]["telnyx"]["status"] == "ok"
        assert health["checks"]["stripe"]["status"] == "ok"
        # At most one call per provider per interval (30 s): none of the probes called.
        assert counting.calls == {"/v2/balance": 1, "/v1/balance": 1}


async def test_the_background_check_keeps_the_result_fresh(
    settings: Settings, redis: Any, counter: tuple[BalanceCounter, LiveServer]
) -> None:
    counting, server = counter
    async for _, http in _app(settings, server, interval=1):
        counting.failing = True

        async def telnyx_down(http: httpx.AsyncClient = http) -> Any:
            checks = (await http.get("/api/v1/health")).json()["checks"]
            return checks["telnyx"]["status"] == "down" and checks["stripe"]["status"] == "down"

        await eventually(telnyx_down, within=10, every=0.2)
        # Non-critical providers down: degraded, still ready.
        assert (await http.get("/readyz")).status_code == 200
        counting.failing = False

        async def recovered(http: httpx.AsyncClient = http) -> Any:
            checks = (await http.get("/api/v1/health")).json()["checks"]
            return checks["telnyx"]["status"] == "ok" and checks["stripe"]["status"] == "ok"

        await eventually(recovered, within=10, every=0.2)
        calls = sum(counting.calls.values())
    # The loop stopped with the app: no call after shutdown.
    await asyncio.sleep(0)
    assert sum(counting.calls.values()) == calls


async def test_an_open_circuit_shows_at_once_without_a_provider_call(
    settings: Settings, redis: Any, counter: tuple[BalanceCounter, LiveServer]
) -> None:
    counting, server = counter
    async for _, http in _app(settings, server, interval=30):
        await redis.hset("cb:stripe", mapping={"state": "open"})
        try:
            health = (await http.get("/api/v1/health")).json()
            assert health["checks"]["stripe"] == health["checks"]["stripe"] | {
                "status": "degraded",
                "detail": "circuit open",
            }
        finally:
            await redis.delete("cb:stripe", "cb:stripe:failures", "cb:stripe:probe")
        assert counting.calls["/v1/balance"] == 1
