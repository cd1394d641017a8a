"""`/billing/*` and `POST /webhooks/stripe`."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import Request
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.accounts.deps import CurrentPrincipal, Owner
from koinonia.accounts.tables import Church, User
from koinonia.billing import ledger, webhooks
from koinonia.billing.gateway import StripeGateway
from koinonia.billing.plans import plan_by_id, plans
from koinonia.billing.schemas import (
    CheckoutRequest,
    PlanOut,
    RedirectOut,
    SubscriptionOut,
    UsageOut,
    WebhookAck,
)
from koinonia.billing.tables import Subscription
from koinonia.cache import CachePolicy, usage_tag
from koinonia.errors import FieldError, ValidationError, problem_responses
from koinonia.http.deps import AppCache, AppDatabase, AppSettings, get_database
from koinonia.http.routing import FeatureRouter
from koinonia.replicas import ReadSession
from koinonia.settings import Settings

router = FeatureRouter(prefix="/api/v1/billing", tags=["billing"])
hooks = FeatureRouter(prefix="/api/v1/webhooks", tags=["webhooks"])
routers = [router, hooks]
READ = problem_responses(401, 429)
OWNER = problem_responses(401, 403, 422, 429, 502, 503)


@router.get("/plans", responses=READ)
async def list_plans(_: CurrentPrincipal, settings: AppSettings) -> list[PlanOut]:
    return [PlanOut.model_validate(p) for p in plans(settings)]


async def _subscription(
    session: AsyncSession, request: Request, settings: Settings, church_id: uuid.UUID
) -> Subscription:
    """The church's subscription as `session` (a replica, maybe) sees it. A church without
    one yet — its first billing read, or a row the replica has not replayed — gets its
    trial created on the primary: the one write this GET can cause, kept off the
    read-only session."""
    found = await session.get(Subscription, church_id)
    if found is not None:
        return found
    async with get_database(request).unit_of_work() as primary:
        return await ledger.ensure_subscription(primary, settings, church_id)


@router.get("/subscription", responses=READ)
async def get_subscription(
    principal: CurrentPrincipal, session: ReadSession, settings: AppSettings, request: Request
) -> SubscriptionOut:
    subscription = await _subscription(session, request, settings, principal.church_id)
    try:
        ledger.check_can_send(subscription)
        can_send = True
    except ledger.SubscriptionInactiveError:
        can_send = False
    return SubscriptionOut(
        plan=subscription.plan,
        status=subscription.status,
        can_send=can_send,
        period_start=subscription.period_start,
        period_end=subscription.period_end,
        cancel_at_period_end=subscription.cancel_at_period_end,
        stripe_customer_id=subscription.stripe_customer_id,
    )


# Exact after every write: each ledger row and subscription change invalidates the
# church's `usage` tag after its commit (ledger.py). A figure about money: never served
# past its TTL (no stale window); the TTL only bounds a lost invalidation.
USAGE_CACHE = CachePolicy("usage", ttl=60, stale_ttl=0)


@router.get("/usage", responses=READ)
async def get_usage(
    principal: CurrentPrincipal, database: AppDatabase, cache: AppCache, settings: AppSettings
) -> UsageOut:
    """Segments used and left in the current period (trial or paid)."""
    church_id = principal.church_id

    async def load() -> dict[str, Any]:
        # Its own transaction on the primary (a first read starts the trial: it writes).
        async with database.unit_of_work() as session:
            usage = await ledger.usage(session, settings, church_id)
        return UsageOut.model_validate(usage).model_dump(mode="json")

    cached = await cache.get_or_load(USAGE_CACHE, str(church_id), load, tags=[usage_tag(church_id)])
    return UsageOut.model_validate(cached)


def _gateway(request: Request) -> StripeGateway:
    gateway: StripeGateway = request.app.state.stripe
    return gateway


@router.post("/checkout", responses=OWNER)
async def checkout(
    body: CheckoutRequest,
    principal: Owner,
    request: Request,
    settings: AppSettings,
) -> RedirectOut:
    """A Stripe Checkout URL for the plan (owner only).

    No Stripe call runs inside a database transaction: the church is read in one short
    transaction, the customer created (idempotency key derived from the church, so a
    retry finds the same customer), its id stored in a second one, then the checkout
    session is created."""
    plan = plan_by_id(settings, body.plan)
    if plan is None:
        raise ValidationError(
            "Unknown plan", errors=[FieldError("plan", f"one of {[p.id for p in plans(settings)]}")]
        )
    database = get_database(request)
    gateway = _gateway(request)
    async with database.unit_of_work() as session:
        subscription = await ledger.ensure_subscription(session, settings, principal.church_id)
        customer = subscription.stripe_customer_id
        church = await session.get(Church, principal.church_id)
        user = await session.get(User, principal.user_id) if principal.user_id else None
        name, email = (church.name if church else ""), (user.email if user else None)
    if customer is None:
        created = await gateway.create_customer(principal.church_id, name, email)
        async with database.unit_of_work() as session:
            subscription = await ledger.ensure_subscription(session, settings, principal.church_id)
            if subscription.stripe_customer_id is None:
                subscription.stripe_customer_id = created
                await ledger.sync_church(session, subscription)
            customer = subscription.stripe_customer_id
        await request.app.state.replicas.note_write(principal.church_id)
    assert customer is not None
    base = str(settings.public_base_url).rstrip("/")
    session_id, url = await gateway.create_checkout(
        principal.church_id,
        customer,
        plan.price_id,
        f"{base}/billing/done",
        f"{base}/billing/cancelled",
    )
    return RedirectOut(url=url, id=session_id)


@router.post("/portal", responses=OWNER)
async def portal(principal: Owner, request: Request, settings: AppSettings) -> RedirectOut:
    """A Stripe billing-portal URL (owner only; after a first checkout). Stripe is called
    after the read's transaction has ended."""
    async with get_database(request).unit_of_work() as session:
        subscription = await ledger.ensure_subscription(session, settings, principal.church_id)
        customer = subscription.stripe_customer_id
    if customer is None:
        raise ValidationError("There is no Stripe customer yet; start with a checkout")
    url = await _gateway(request).create_portal(
        customer, str(settings.public_base_url).rstrip("/") + "/billing"
    )
    return RedirectOut(url=url)


@hooks.post("/stripe", responses=problem_responses(400))
async def stripe_webhook(request: Request, settings: AppSettings) -> WebhookAck:
    """Verified (`Stripe-Signature`), deduplicated by event id, applied idempotently."""
    payload = await request.body()
    secrets = [secret for secret in settings.stripe_webhook_secret_list if secret]
    event = webhooks.verify(
        payload,
        request.headers.get("stripe-signature"),
        secrets,
        settings.stripe_webhook_tolerance_seconds,
    )
    # Stored and applied in one transaction: if applying fails nothing is recorded and
    # Stripe's redelivery tries again; a redelivered event that was applied is a no-op.
    # A malformed event is stored, dead-lettered and acknowledged (webhooks.receive).
    async with get_database(request).unit_of_work() as session:
        new = await webhooks.receive(session, settings, event)
    return WebhookAck(received=True, duplicate=not new)
