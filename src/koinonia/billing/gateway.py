"""Stripe through the official library: pooled async HTTP, our retry policy (≤ 2 retries),
an `Idempotency-Key` on every POST (the same one on each retry), the shared breaker."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import stripe
import structlog
from fastapi import FastAPI
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from koinonia.breaker import CircuitBreaker, CircuitOpenError
from koinonia.errors import ExternalServiceError, ServiceUnavailableError
from koinonia.health.checks import BackgroundCheck, Degraded, HealthCheck
from koinonia.observability import RETRIES
from koinonia.settings import Settings

log = structlog.get_logger(__name__)
T = TypeVar("T")
MAX_RETRIES = 2


def is_transient(error: BaseException) -> bool:
    if isinstance(error, stripe.APIConnectionError | stripe.RateLimitError):
        return True
    status = getattr(error, "http_status", None)
    return isinstance(error, stripe.StripeError) and (
        status is None or status >= 500 or status == 409
    )


class StripeGateway:
    def __init__(self, settings: Settings, breaker: CircuitBreaker) -> None:
        self.breaker = breaker
        self.client = stripe.StripeClient(
            settings.stripe_api_key.get_secret_value(),
            base_addresses={"api": str(settings.stripe_base_url).rstrip("/")},
            http_client=stripe.HTTPXClient(
                timeout=settings.stripe_timeout, allow_sync_methods=False
            ),
            max_network_retries=0,  # retries are ours: counted, logged, behind the breaker
        )

    async def call(self, operation: str, request: Callable[[], Awaitable[T]]) -> T:
        try:
            await self.breaker.before_call()
        except CircuitOpenError as error:
            raise ServiceUnavailableError(
                "Payments are unavailable for a moment; try again shortly",
                headers={"Retry-After": str(max(1, round(error.retry_after)))},
            ) from None

        def count(state: Any) -> None:
            RETRIES.labels(f"stripe.{operation}").inc()
            log.info("retrying", operation=f"stripe.{operation}", attempt=state.attempt_number)

        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(is_transient),
                stop=stop_after_attempt(1 + MAX_RETRIES),
                wait=wait_random_exponential(multiplier=0.25, max=2),
                before_sleep=count,
                reraise=True,
            ):
                with attempt:
                    try:
                        result = await request()
                    except stripe.StripeError as error:
                        if is_transient(error):
                            await self.breaker.failure()
                        raise
            await self.breaker.success()
            return result
        except stripe.StripeError as error:
            log.warning(
                "stripe_failed",
                operation=operation,
                error=type(error).__name__,
                status=getattr(error, "http_status", None),
            )
            raise ExternalServiceError("Stripe could not complete the request") from None

    async def create_customer(self, church_id: uuid.UUID, name: str, email: str | None) -> str:
        # Derived from the church: a retry, or a second attempt after a crash, finds the
        # customer Stripe already made instead of creating another.
        options: Any = {"idempotency_key": f"customer-{church_id}"}
        params: Any = {"name": name, "metadata": {"church_id": str(church_id)}}
        if email:
            params["email"] = email
        customer = await self.call(
            "create_customer", lambda: self.client.v1.customers.create_async(params, options)
        )
        return str(customer.id)

    async def create_checkout(
        self,
        church_id: uuid.UUID,
        customer: str,
        price_id: str,
        success_url: str,
        cancel_url: str,
    ) -> tuple[str, str]:
        options: Any = {"idempotency_key": f"checkout-{uuid.uuid4()}"}
        params: Any = {
            "mode": "subscription",
            "customer": customer,
            "client_reference_id": str(church_id),
            "line_items": [{"price": price_id, "quantity": 1}],
            "success_url": success_url,
            "cancel_url": cancel_url,
            "metadata": {"church_id": str(church_id)},
            "subscription_data": {"metadata": {"church_id": str(church_id)}},
        }
        session = await self.call(
            "create_checkout",
            lambda: self.client.v1.checkout.sessions.create_async(params, options),
        )
        return str(session.id), str(session.url)

    async def create_portal(self, customer: str, return_url: str) -> str:
        options: Any = {"idempotency_key": f"portal-{uuid.uuid4()}"}
        params: Any = {"customer": customer, "return_url": return_url}
        session = await self.call(
            "create_portal",
            lambda: self.client.v1.billing_portal.sessions.create_async(params, options),
        )
        return str(session.url)

    def health_check(self) -> HealthCheck:
        """The provider call (`GET /v1/balance`): run in the background only."""

        async def probe() -> None:
            await self.client.v1.balance.retrieve_async()

        # Not critical: without Stripe the product still texts; only checkout waits.
        return HealthCheck("stripe", probe, critical=False)

    async def breaker_probe(self) -> None:
        """Checked on every health request (a Redis read, no provider call)."""
        state = (await self.breaker.status()).state
        if state != "closed":
            raise Degraded(f"circuit {state}")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    gateway = StripeGateway(settings, CircuitBreaker(app.state.redis, "stripe"))
    app.state.stripe = gateway
    # Probes never call Stripe: it is checked in the background, every interval.
    monitor = BackgroundCheck(
        gateway.health_check(),
        settings.provider_health_interval_seconds,
        settings.health_check_timeout,
        live=gateway.breaker_probe,
    )
    await monitor.start()
    app.state.health_checks.append(monitor.served())
    try:
        yield
    finally:
        await monitor.stop()
