"""The API process's Telnyx client and its health check (a feature lifespan)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from koinonia.breaker import CircuitBreaker
from koinonia.db import timeout_startup_options
from koinonia.health.checks import BackgroundCheck, Degraded, HealthCheck
from koinonia.messaging.suppressions import suppression_key
from koinonia.settings import Settings
from koinonia.telnyx.client import TelnyxClient
from koinonia.telnyx.event_writer import EventWriter


def telnyx_health(client: TelnyxClient) -> HealthCheck:
    """The provider call (`GET /v2/balance`): run in the background only (BackgroundCheck)."""

    async def probe() -> None:
        await client.balance()

    # Not critical: without Telnyx the API still serves; sends wait in the queue.
    return HealthCheck("telnyx", probe, critical=False)


def breaker_probe(breaker: CircuitBreaker) -> Callable[[], Awaitable[None]]:
    """Checked on every health request (a Redis read, no provider call)."""

    async def probe() -> None:
        state = (await breaker.status()).state
        if state not in ("closed", "unknown"):
            raise Degraded(f"circuit {state}")

    return probe


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    client = TelnyxClient(settings, max_connections=16)
    app.state.telnyx = client
    monitor = BackgroundCheck(
        telnyx_health(client),
        settings.provider_health_interval_seconds,
        settings.health_check_timeout,
        live=breaker_probe(CircuitBreaker(app.state.redis, "telnyx")),
    )
    await monitor.start()
    app.state.health_checks.append(monitor.served())
    events = EventWriter(
        # PostgreSQL itself, not PgBouncer: the STOP-wins hot path never queues behind the
        # API's transactions for a server connection, and its startup options hold.
        settings.direct_database_url,
        "telnyx",
        suppression_key=suppression_key(settings),
        slow_query_ms=settings.slow_query_ms,
        options=timeout_startup_options(settings),
    )
    await events.open()
    app.state.telnyx_events = events
    try:
        yield
    finally:
        await monitor.stop()
        await events.close()
        await client.aclose()
