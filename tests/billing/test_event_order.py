"""Stripe events are applied in order per object: an older event never overrides a newer
state. Events come signed from the sandbox (`POST /sandbox/stripe/events`), or — where
the test needs a `created` in the past, which the sandbox always sets to now — signed
here the same way (`koinonia.sandbox.signing.stripe_signature`)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx
import pytest

from koinonia.sandbox.signing import stripe_signature
from koinonia.settings import Settings
from tests.support.api import Account
from tests.support.servers import LiveServer

pytestmark = pytest.mark.usefixtures("sandbox")
DAY = 86400


async def _emit(sandbox: LiveServer, event_type: str, obj: dict[str, Any]) -> None:
    async with httpx.AsyncClient(base_url=sandbox.url, timeout=30) as http:
        response = await http.post(
            "/sandbox/stripe/events", json={"type": event_type, "data": {"object": obj}}
        )
    assert response.status_code == 202, response.text
    assert response.json()["delivered_status"] == 200, response.text


async def _signed(
    client: httpx.AsyncClient,
    settings: Settings,
    event_type: str,
    obj: dict[str, Any],
    created: int,
) -> httpx.Response:
    event = {
        "id": f"evt_{uuid.uuid4().hex[:12]}",
        "object": "event",
        "type": event_type,
        "created": created,
        "data": {"object": obj},
    }
    body = json.dumps(event).encode()
    secret = settings.stripe_webhook_secret_list[0]
    return await client.post(
        "/api/v1/webhooks/stripe",
        content=body,
        headers={"Stripe-Signature": stripe_signature(secret, body, int(time.time()))},
    )


def _subscription(church: str, sub_id: str, status: str, start: int) -> dict[str, Any]:
    return {
        "id": sub_id,
        "object": "subscription",
        "status": status,
        "customer": f"cus_{church[:8]}",
        "metadata": {"church_id": church},
        "cancel_at_period_end": False,
        "items": {
            "data": [
                {
                    "price": {"id": "price_starter"},
                    "current_period_start": start,
                    "current_period_end": start + 30 * DAY,
                }
            ]
        },
    }


def _invoice(church: str, sub_id: str, invoice_id: str, period_end: int) -> dict[str, Any]:
    return {
        "id": invoice_id,
        "object": "invoice",
        "customer": f"cus_{church[:8]}",
        "period_start": period_end - 30 * DAY,
        "period_end": period_end,
        "parent": {
            "subscription_details": {"subscription": sub_id, "metadata": {"church_id": church}}
        },
    }


async def _state(client: httpx.AsyncClient, account: Account) -> tuple[str, bool]:
    got = (await client.get("/api/v1/billing/subscription", headers=account.headers)).json()
    return got["status"], got["can_send"]


async def test_a_late_failure_of_an_earlier_period_does_not_block_sending(
    client: httpx.AsyncClient, owner: Account, sandbox: LiveServer
) -> None:
    church, sub_id, now = owner.church_id, f"sub_{uuid.uuid4().hex[:10]}", int(time.time())
    await _emit(
        sandbox, "customer.subscription.created", _subscription(church, sub_id, "active", now)
    )
    # Period 2 paid; then period 1's failed payment arrives late (Stripe retried it).
    await _emit(sandbox, "invoice.paid", _invoice(church, sub_id, "in_p2", now + 30 * DAY))
    await _emit(sandbox, "invoice.payment_failed", _invoice(church, sub_id, "in_p1", now))
    assert await _state(client, owner) == ("active", True)
    # A failure of the newest period still stops sending, and its payment resumes it.
    await _emit(
        sandbox, "invoice.payment_failed", _invoice(church, sub_id, "in_p3", now + 60 * DAY)
    )
    assert await _state(client, owner) == ("past_due", False)
    await _emit(sandbox, "invoice.paid", _invoice(church, sub_id, "in_p3", now + 60 * DAY))
    assert await _state(client, owner) == ("active", True)


async def test_the_same_invoice_is_ordered_by_event_time(
    client: httpx.AsyncClient, owner: Account, settings: Settings
) -> None:
    church, sub_id, now = owner.church_id, f"sub_{uuid.uuid4().hex[:10]}", int(time.time())
    sub = _subscription(church, sub_id, "past_due", now)
    assert (
        await _signed(client, settings, "customer.subscription.updated", sub, now - 60)
    ).status_code == 200
    invoice = _invoice(church, sub_id, "in_same", now + 30 * DAY)
    paid = await _signed(client, settings, "invoice.paid", invoice, now)
    assert paid.status_code == 200, paid.text
    assert await _state(client, owner) == ("active", True)
    # The failed attempt that preceded the payment, delivered after it.
    late = await _signed(client, settings, "invoice.payment_failed", invoice, now - 30)
    assert late.status_code == 200 and late.json()["duplicate"] is False
    assert await _state(client, owner) == ("active", True)


async def test_an_older_subscription_event_does_not_undo_a_newer_payment(
    client: httpx.AsyncClient, owner: Account, settings: Settings
) -> None:
    church, sub_id, now = owner.church_id, f"sub_{uuid.uuid4().hex[:10]}", int(time.time())
    active = _subscription(church, sub_id, "active", now)
    await _signed(client, settings, "customer.subscription.created", active, now - 120)
    invoice = _invoice(church, sub_id, "in_x", now + 30 * DAY)
    await _signed(client, settings, "invoice.payment_failed", invoice, now - 90)
    assert await _state(client, owner) == ("past_due", False)
    await _signed(client, settings, "invoice.paid", invoice, now)
    assert await _state(client, owner) == ("active", True)
    # "past_due" as the subscription was before the payment, delivered after it: the
    # snapshot is newer than any subscription event so far, but its status is older.
    stale = _subscription(church, sub_id, "past_due", now) | {"cancel_at_period_end": True}
    answer = await _signed(client, settings, "customer.subscription.updated", stale, now - 60)
    assert answer.status_code == 200
    got = (await client.get("/api/v1/billing/subscription", headers=owner.headers)).json()
    assert (got["status"], got["can_send"]) == ("active", True)
    assert got["cancel_at_period_end"] is True
    # A newer subscription event still sets the status.
    newer = _subscription(church, sub_id, "unpaid", now)
    await _signed(client, settings, "customer.subscription.updated", newer, now + 5)
    assert await _state(client, owner) == ("unpaid", False)
