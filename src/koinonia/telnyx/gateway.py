"""The API process's Telnyx client and its health check (a feature lifespan)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from koinonia.breaker import CircuitBreaker
from koinonia.health.checks import Degraded, HealthCheck
from koinonia.messaging.suppressions import suppression_key
from koinonia.settings import Settings
from koinonia.telnyx.client import TelnyxClient
from koinonia.telnyx.event_writer import EventWriter


def telnyx_health(client: TelnyxClient, breaker: CircuitBreaker) -> HealthCheck:
    async def probe() -> None:
        state = (await breaker.status()).state
        await client.balance()
        if state not in ("closed", "unknown"):
            raise Degraded(f"circuit {state}")

    # Not critical: without Telnyx the API still serves; sends wait in the queue.
    return HealthCheck("telnyx", probe, critical=False)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    client = TelnyxClient(settings, max_connections=16)
    app.state.telnyx = client
    app.state.health_checks.append(telnyx_health(client, CircuitBreaker(app.state.redis, "telnyx")))
    events = EventWriter(settings.database_url, "telnyx", suppression_key=suppression_key(settings))
    await events.open()
    app.state.telnyx_events = events
    try:
        yield
    finally:
        await events.close()
        await client.aclose()
