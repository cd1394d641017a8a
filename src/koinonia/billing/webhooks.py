"""Stripe webhook verification and idempotent, order-tolerant application of events."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import stripe
import structlog
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.billing import ledger
from koinonia.billing.plans import plan_by_price
from koinonia.billing.tables import Subscription
from koinonia.errors import AppError
from koinonia.inbox.tables import WebhookEvent
from koinonia.settings import Settings

log = structlog.get_logger(__name__)

HANDLED = frozenset(
    {
        "checkout.session.completed",
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "invoice.paid",
        "invoice.payment_failed",
    }
)


class StripeSignatureError(AppError):
    status = 400
    code = "invalid_signature"
    title = "The webhook signature is not valid"


def verify(
    payload: bytes, header: str | None, secrets: list[str], tolerance: int
) -> dict[str, Any]:
    """The event, if any configured secret matches any `v1` of the header within tolerance.

    `stripe.WebhookSignature.verify_header` does the HMAC-SHA256 over `t.payload`, accepts
    any of several `v1` values, compares in constant time and checks the age; we add
    several secrets of our own so an endpoint secret can be rolled without downtime.
    """
    if not header:
        raise StripeSignatureError("Missing Stripe-Signature header")
    for secret in secrets:
        try:
            stripe.WebhookSignature.verify_header(payload, header, secret, tolerance)
        except stripe.SignatureVerificationError:
            continue
        try:
            event: dict[str, Any] = json.loads(payload)
        except ValueError:
            raise StripeSignatureError("The payload is not JSON") from None
        if not isinstance(event, dict) or "id" not in event or "type" not in event:
            raise StripeSignatureError("The payload is not a Stripe event")
        return event
    raise StripeSignatureError("No signature matches, or it is too old")


async def store(session: AsyncSession, event: dict[str, Any]) -> bool:
    """Record the event; False when this event id was already received (a redelivery)."""
    result = await session.execute(
        insert(WebhookEvent)
        .values(
            provider="stripe",
            event_id=str(event["id"]),
            event_type=str(event["type"]),
            payload=event,
            processed_at=datetime.now(UTC),
        )
        .on_conflict_do_nothing(index_elements=["provider", "event_id"])
        .returning(WebhookEvent.id)
    )
    return result.scalar_one_or_none() is not None


def _church_id(obj: dict[str, Any]) -> uuid.UUID | None:
    candidates = [
        obj.get("client_reference_id"),
        (obj.get("metadata") or {}).get("church_id"),
        ((obj.get("parent") or {}).get("subscription_details") or {})
        .get("metadata", {})
        .get("church_id"),
    ]
    for candidate in candidates:
        try:
            return uuid.UUID(str(candidate))
        except (ValueError, TypeError):
            continue
    return None


async def _subscription_for(
    session: AsyncSession, settings: Settings, obj: dict[str, Any], subscription_id: str | None
) -> Subscription | None:
    church_id = _church_id(obj)
    if church_id is None:
        conditions = []
        if subscription_id:
            conditions.append(Subscription.stripe_subscription_id == subscription_id)
        if obj.get("customer"):
            conditions.append(Subscription.stripe_customer_id == obj["customer"])
        for condition in conditions:
            found = await session.scalar(select(Subscription).where(condition).with_for_update())
            if found is not None:
                return found
        return None
    subscription = await ledger.ensure_subscription(session, settings, church_id)
    await session.refresh(subscription, with_for_update=True)
    return subscription


def _timestamp(value: Any) -> datetime | None:
    return datetime.fromtimestamp(int(value), UTC) if value else None


async def _apply_subscription(
    session: AsyncSession, settings: Settings, event: dict[str, Any], obj: dict[str, Any]
) -> None:
    subscription = await _subscription_for(session, settings, obj, obj.get("id"))
    if subscription is None:
        log.warning("stripe_event_unmatched", event_id=event["id"], type=event["type"])
        return
    created = int(event.get("created", 0))
    deleted = event["type"] == "customer.subscription.deleted"
    if created < subscription.last_event_created and not deleted:
        log.info("stripe_event_stale", event_id=event["id"], type=event["type"])
        return  # an older state arriving late
    if (
        subscription.status == "canceled"
        and subscription.stripe_subscription_id == obj.get("id")
        and event["type"] != "customer.subscription.deleted"
    ):
        return  # a deleted subscription never comes back to life
    item = ((obj.get("items") or {}).get("data") or [{}])[0]
    plan = plan_by_price(settings, str((item.get("price") or {}).get("id", "")))
    status = "canceled" if event["type"] == "customer.subscription.deleted" else obj.get("status")
    subscription.last_event_created = max(created, subscription.last_event_created)
    subscription.stripe_subscription_id = obj.get("id") or subscription.stripe_subscription_id
    subscription.stripe_customer_id = obj.get("customer") or subscription.stripe_customer_id
    subscription.status = str(status or subscription.status)
    subscription.cancel_at_period_end = bool(obj.get("cancel_at_period_end"))
    if plan is not None:
        subscription.plan = plan.id
    start = _timestamp(item.get("current_period_start") or obj.get("current_period_start"))
    end = _timestamp(item.get("current_period_end") or obj.get("current_period_end"))
    if start and end:
        subscription.period_start, subscription.period_end = start, end
        if plan is not None and subscription.status in ledger.SENDING_STATUSES:
            await ledger.grant(
                session,
                subscription.church_id,
                start,
                plan.included_segments,
                f"plan:{subscription.stripe_subscription_id}:{int(start.timestamp())}",
            )
    subscription.updated_at = datetime.now(UTC)
    await ledger.sync_church(session, subscription)


async def _apply_checkout(session: AsyncSession, settings: Settings, obj: dict[str, Any]) -> None:
    subscription = await _subscription_for(session, settings, obj, obj.get("subscription"))
    if subscription is None:
        return
    subscription.stripe_customer_id = obj.get("customer") or subscription.stripe_customer_id
    subscription.stripe_subscription_id = (
        obj.get("subscription") or subscription.stripe_subscription_id
    )
    await ledger.sync_church(session, subscription)


async def _apply_invoice(
    session: AsyncSession, settings: Settings, event: dict[str, Any], obj: dict[str, Any]
) -> None:
    details = (obj.get("parent") or {}).get("subscription_details") or {}
    subscription_id = details.get("subscription") or obj.get("subscription")
    subscription = await _subscription_for(session, settings, obj, subscription_id)
    if subscription is None or subscription.stripe_subscription_id not in (None, subscription_id):
        return
    if subscription.status == "canceled":
        return
    if event["type"] == "invoice.payment_failed":
        subscription.status = "past_due"
    elif subscription.status in ("past_due", "unpaid", "incomplete"):
        subscription.status = "active"
    subscription.updated_at = datetime.now(UTC)
    await ledger.sync_church(session, subscription)


async def apply(session: AsyncSession, settings: Settings, event: dict[str, Any]) -> None:
    obj = dict((event.get("data") or {}).get("object") or {})
    kind = event["type"]
    if kind == "checkout.session.completed":
        await _apply_checkout(session, settings, obj)
    elif kind.startswith("customer.subscription."):
        await _apply_subscription(session, settings, event, obj)
    elif kind.startswith("invoice."):
        await _apply_invoice(session, settings, event, obj)
