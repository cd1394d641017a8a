"""Stripe webhook verification and idempotent, order-tolerant application of events.

Order, per object: a subscription event older (`created`) than the newest applied for
that church changes nothing; an invoice event is ranked by its invoice's own period end
(else the invoice's `created`) and then the event's `created`, and one ranked below the
newest invoice event applied changes nothing; and no event changes the status set by a
newer one (`status_event_created`), whichever object it came from.

Malformed: an event that is correctly signed but cannot be applied as it stands (a
`created` that is not a timestamp, a `data.object` that is not an object, a field of the
wrong type, a church that does not exist) would fail the same way on every redelivery. It
is stored (a redelivery is a duplicate), dead-lettered (`webhook.stripe`, error code
`malformed_event`) and acknowledged with 200, so Stripe stops sending it and an operator
sees it in the DLQ. A body that is not an event at all (not JSON, no `id`/`type`) is a
`400 malformed_event`.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, TypeGuard

import stripe
import structlog
from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DataError
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia import provider_json
from koinonia.accounts.tables import Church
from koinonia.billing import ledger
from koinonia.billing.plans import plan_by_price
from koinonia.billing.tables import Subscription
from koinonia.deadletters import service as dead_letters
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


class MalformedStripeEventError(StripeSignatureError):
    """Correctly signed, but not a Stripe event at all (not JSON, no `id` or `type`)."""

    code = "malformed_event"
    title = "The webhook payload is not a Stripe event"


MAX_TIMESTAMP = 253402300799  # 9999-12-31T23:59:59Z: anything later overflows a datetime
SUBSCRIPTION_STATUSES = frozenset(
    {
        "trialing",
        "active",
        "past_due",
        "canceled",
        "unpaid",
        "incomplete",
        "incomplete_expired",
        "paused",
    }
)
# Applying an event raises these only when its content cannot be applied; a redelivery
# would fail the same way, so the event is dead-lettered. Anything else (the database
# unreachable, a serialization failure) is a 5xx and Stripe retries.
UNAPPLICABLE = (DataError, ValueError, TypeError, KeyError, AttributeError, OverflowError)


def _is_timestamp(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TIMESTAMP


def _object_problem(kind: str, obj: dict[str, Any]) -> str | None:
    """What in a handled event's object would fail applying it (None: nothing)."""

    def bad_id(value: Any, limit: int = 64) -> bool:
        return value is not None and not (isinstance(value, str) and len(value) <= limit)

    def bad_dict(value: Any) -> bool:
        return value is not None and not isinstance(value, dict)

    def bad_time(value: Any) -> bool:
        return value is not None and not _is_timestamp(value)

    for name in ("id", "customer", "subscription"):
        if bad_id(obj.get(name)):
            return f"data.object.{name} is not a Stripe id"
    if bad_id(obj.get("client_reference_id"), 200):
        return "data.object.client_reference_id is not a string"
    for name in ("metadata", "parent", "items", "lines"):
        if bad_dict(obj.get(name)):
            return f"data.object.{name} is not an object"
    if bad_id((obj.get("metadata") or {}).get("church_id"), 200):
        return "data.object.metadata.church_id is not a string"
    for name in (
        "created",
        "period_start",
        "period_end",
        "current_period_start",
        "current_period_end",
    ):
        if bad_time(obj.get(name)):
            return f"data.object.{name} is not a Unix timestamp"
    if obj.get("cancel_at_period_end") is not None and not isinstance(
        obj["cancel_at_period_end"], bool
    ):
        return "data.object.cancel_at_period_end is not a boolean"
    status = obj.get("status")
    subscription_event = kind.startswith("customer.subscription.")
    if subscription_event and status is not None and status not in SUBSCRIPTION_STATUSES:
        return "data.object.status is not a subscription status"
    details = (obj.get("parent") or {}).get("subscription_details")
    if bad_dict(details):
        return "data.object.parent.subscription_details is not an object"
    if details:
        if bad_id(details.get("subscription")):
            return "data.object.parent.subscription_details.subscription is not a Stripe id"
        if bad_dict(details.get("metadata")):
            return "data.object.parent.subscription_details.metadata is not an object"
    for name in ("items", "lines"):
        entries = (obj.get(name) or {}).get("data")
        if entries is None:
            continue
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            return f"data.object.{name}.data is not a list of objects"
        for entry in entries:
            if bad_dict(entry.get("price")) or bad_id((entry.get("price") or {}).get("id"), 200):
                return f"data.object.{name}.data[].price is not a price"
            if bad_dict(entry.get("period")):
                return f"data.object.{name}.data[].period is not an object"
            times = [entry.get("current_period_start"), entry.get("current_period_end")]
            times += [(entry.get("period") or {}).get(k) for k in ("start", "end")]
            if any(bad_time(t) for t in times):
                return f"data.object.{name}.data[] has a period that is not a Unix timestamp"
    return None


def malformed(event: dict[str, Any]) -> str | None:
    """Why a verified event cannot be applied, whatever the retries (None: it can)."""
    if not _is_timestamp(event.get("created")):
        return "created is not a Unix timestamp"
    data = event.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
        return "data.object is not an object"
    if event["type"] not in HANDLED:
        return None
    return _object_problem(str(event["type"]), data["object"])


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
            event = provider_json.loads(payload)
        except provider_json.MalformedJSONError:
            raise MalformedStripeEventError("The payload is not JSON") from None
        if not isinstance(event, dict) or not all(
            isinstance(event.get(k), str) and 0 < len(event[k].strip()) <= 100
            for k in ("id", "type")
        ):
            raise MalformedStripeEventError("The payload is not a Stripe event")
        return event
    raise StripeSignatureError("No signature matches, or it is too old")


async def store(session: AsyncSession, event: dict[str, Any], error: str | None = None) -> bool:
    """Record the event; False when this event id was already received (a redelivery)."""
    return await _store(session, event, error) is not None


async def _store(session: AsyncSession, event: dict[str, Any], error: str | None) -> int | None:
    result = await session.execute(
        insert(WebhookEvent)
        .values(
            provider="stripe",
            event_id=str(event["id"]),
            event_type=str(event["type"]),
            payload=event,
            processed_at=datetime.now(UTC),
            last_error=error,
        )
        .on_conflict_do_nothing(index_elements=["provider", "event_id"])
        .returning(WebhookEvent.id)
    )
    return result.scalar_one_or_none()


async def receive(session: AsyncSession, settings: Settings, event: dict[str, Any]) -> bool:
    """Store a verified event once and apply it, in the caller's transaction; False for a
    redelivery. A malformed event is stored and dead-lettered instead (module doc)."""
    problem = malformed(event)
    stored = await _store(session, event, problem)
    if stored is None:
        return False
    if problem is None and event["type"] in HANDLED:
        try:
            async with session.begin_nested():
                await apply(session, settings, event)
        except UNAPPLICABLE as error:
            problem = f"{type(error).__name__} while applying"
            await session.execute(
                update(WebhookEvent).where(WebhookEvent.id == stored).values(last_error=problem)
            )
    if problem is not None:
        log.warning("stripe_event_malformed", event_id=event["id"], type=event["type"])
        obj = (event.get("data") or {}).get("object")
        await dead_letters.record(
            session,
            kind="webhook.stripe",
            church_id=_church_id(obj) if isinstance(obj, dict) else None,
            payload={"webhook_event_id": stored, "event_id": event["id"], "type": event["type"]},
            error=problem,
            error_code="malformed_event",
            attempts=1,
        )
    return True


def _dig(value: Any, *path: str) -> Any:
    """`value[path[0]][path[1]]…`, or None as soon as a step is not an object."""
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _church_id(obj: dict[str, Any]) -> uuid.UUID | None:
    candidates = [
        obj.get("client_reference_id"),
        _dig(obj, "metadata", "church_id"),
        _dig(obj, "parent", "subscription_details", "metadata", "church_id"),
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
    if await session.get(Church, church_id) is None:
        return None  # a church that does not exist (any more): nothing to apply
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
    created = int(event["created"])
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
    if deleted or created >= subscription.status_event_created:
        subscription.status = str(status or subscription.status)
        subscription.status_event_created = max(created, subscription.status_event_created)
    else:  # a newer event (an invoice, say) already set the status
        log.info("stripe_status_stale", event_id=event["id"], type=event["type"])
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
    created = int(event["created"])
    rank = (invoice_rank(obj), created)
    if rank < (subscription.invoice_period_end, subscription.invoice_event_created):
        # e.g. `invoice.payment_failed` of an earlier period after `invoice.paid` of a later
        log.info("stripe_invoice_stale", event_id=event["id"], type=event["type"])
        return
    subscription.invoice_period_end, subscription.invoice_event_created = rank
    if created < subscription.status_event_created:
        log.info("stripe_status_stale", event_id=event["id"], type=event["type"])
    elif event["type"] == "invoice.payment_failed":
        subscription.status = "past_due"
        subscription.status_event_created = created
    elif subscription.status in ("past_due", "unpaid", "incomplete"):
        subscription.status = "active"
        subscription.status_event_created = created
    subscription.updated_at = datetime.now(UTC)
    await ledger.sync_church(session, subscription)


def invoice_rank(obj: dict[str, Any]) -> int:
    """An invoice's place among its subscription's invoices: the end of the period it
    bills (`period_end`, or its first line's `period.end`), else when it was created."""
    lines = (obj.get("lines") or {}).get("data") or [{}]
    line_end = (lines[0].get("period") or {}).get("end")
    for value in (obj.get("period_end"), line_end, obj.get("created")):
        if _is_timestamp(value):
            return int(value)
    return 0


async def apply(session: AsyncSession, settings: Settings, event: dict[str, Any]) -> None:
    obj = dict((event.get("data") or {}).get("object") or {})
    kind = event["type"]
    if kind == "checkout.session.completed":
        await _apply_checkout(session, settings, obj)
    elif kind.startswith("customer.subscription."):
        await _apply_subscription(session, settings, event, obj)
    elif kind.startswith("invoice."):
        await _apply_invoice(session, settings, event, obj)
