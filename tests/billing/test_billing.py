"""Billing end to end through the Stripe sandbox: plans, trial, checkout, portal, signed
events (duplicates, out of order), blocking, and the allowance under concurrency."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text

from koinonia.billing import ledger
from koinonia.billing.tables import LedgerEntry
from koinonia.errors import QuotaExceededError
from koinonia.settings import Settings
from tests.support.api import Account, add_user
from tests.support.report import REPORTS
from tests.support.servers import LiveServer

pytestmark = pytest.mark.usefixtures("sandbox")


async def _sandbox(sandbox: LiveServer, path: str, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=sandbox.url, timeout=30) as client:
        return await client.post(path, json=body)


async def _subscription(client: httpx.AsyncClient, account: Account) -> Any:
    return (await client.get("/api/v1/billing/subscription", headers=account.headers)).json()


async def _usage(client: httpx.AsyncClient, account: Account) -> Any:
    return (await client.get("/api/v1/billing/usage", headers=account.headers)).json()


def _sub_event(
    church: str,
    status: str,
    created_offset: int = 0,
    sub: str = "sub_x",
    price: str = "price_starter",
) -> dict[str, Any]:
    now = int(time.time())
    return {
        "id": f"sub_{uuid.uuid4().hex[:8]}" if sub == "sub_x" else sub,
        "object": "subscription",
        "status": status,
        "customer": f"cus_{church[:8]}",
        "metadata": {"church_id": church},
        "cancel_at_period_end": False,
        "items": {
            "data": [
                {
                    "price": {"id": price},
                    "current_period_start": now,
                    "current_period_end": now + 30 * 86400,
                }
            ]
        },
        "_offset": created_offset,
    }


async def test_plans_and_trial(client: httpx.AsyncClient, owner: Account) -> None:
    plans = (await client.get("/api/v1/billing/plans", headers=owner.headers)).json()
    assert {p["id"] for p in plans} == {"starter", "growth"}
    subscription = await _subscription(client, owner)
    assert subscription["status"] == "trialing" and subscription["can_send"] is True
    usage = await _usage(client, owner)
    assert usage == usage | {"used": 0, "included": 250, "remaining": 250}


async def test_checkout_then_paid_subscription(
    client: httpx.AsyncClient, owner: Account, sandbox: LiveServer
) -> None:
    staff = await add_user(client, owner, "staff")
    forbidden = await client.post(
        "/api/v1/billing/checkout", json={"plan": "starter"}, headers=staff.headers
    )
    assert forbidden.status_code == 403
    unknown = await client.post(
        "/api/v1/billing/checkout", json={"plan": "platinum"}, headers=owner.headers
    )
    assert unknown.status_code == 422
    no_customer = await client.post("/api/v1/billing/portal", headers=owner.headers)
    assert no_customer.status_code == 422
    checkout = await client.post(
        "/api/v1/billing/checkout", json={"plan": "starter"}, headers=owner.headers
    )
    assert checkout.status_code == 200, checkout.text
    url = checkout.json()["url"]
    assert url.startswith(sandbox.url)
    # The customer pays: the sandbox sends signed events to the live API.
    done = await _sandbox(sandbox, f"/sandbox/stripe/checkout/{checkout.json()['id']}/complete", {})
    assert done.json()["deliveries"] == {
        "checkout.session.completed": 200,
        "customer.subscription.created": 200,
        "invoice.paid": 200,
    }
    subscription = await _subscription(client, owner)
    assert subscription | {} == subscription | {"plan": "starter", "status": "active"}
    assert subscription["stripe_customer_id"].startswith("cus_")
    usage = await _usage(client, owner)
    assert (usage["included"], usage["remaining"]) == (2000, 2000)
    me = (await client.get("/api/v1/auth/me", headers=owner.headers)).json()
    assert me["church"]["plan"] == "starter"
    portal = await client.post("/api/v1/billing/portal", headers=owner.headers)
    assert portal.status_code == 200 and "/sandbox/stripe/portal/" in portal.json()["url"]
    # A second checkout reuses the same Stripe customer (idempotent creation).
    again = await client.post(
        "/api/v1/billing/checkout", json={"plan": "growth"}, headers=owner.headers
    )
    assert again.status_code == 200


async def _emit(
    sandbox: LiveServer, event_type: str, obj: dict[str, Any], event_id: str | None = None
) -> Any:
    body: dict[str, Any] = {"type": event_type, "data": {"object": obj}}
    if event_id:
        body["id"] = event_id
    response = await _sandbox(sandbox, "/sandbox/stripe/events", body)
    assert response.status_code == 202
    return response.json()


async def test_duplicate_and_out_of_order_events(
    client: httpx.AsyncClient, owner: Account, sandbox: LiveServer, app: Any
) -> None:
    church = owner.church_id
    sub_id = f"sub_{uuid.uuid4().hex[:10]}"
    active = _sub_event(church, "active", sub=sub_id)
    event_id = f"evt_{uuid.uuid4().hex[:10]}"
    first = await _emit(sandbox, "customer.subscription.updated", active, event_id)
    second = await _emit(sandbox, "customer.subscription.updated", active, event_id)
    assert first["delivered_status"] == second["delivered_status"] == 200
    async with app.state.database.sessions() as session:
        grants = await session.scalar(
            select(func.count())
            .select_from(LedgerEntry)
            .where(
                LedgerEntry.church_id == uuid.UUID(church),
                LedgerEntry.kind == "grant",
                LedgerEntry.reference.like("plan:%"),
            )
        )
        stored = await session.scalar(
            text("SELECT count(*) FROM webhook_events WHERE event_id = :e"), {"e": event_id}
        )
    assert grants == 1 and stored == 1
    assert (await _subscription(client, owner))["status"] == "active"
    # A payment failure, then a stale "active" that Stripe created earlier but delivered late.
    failed = {
        "id": "in_1",
        "customer": active["customer"],
        "metadata": {"church_id": church},
        "parent": {"subscription_details": {"subscription": sub_id}},
    }
    await _emit(sandbox, "invoice.payment_failed", failed)
    subscription = await _subscription(client, owner)
    assert subscription["status"] == "past_due" and subscription["can_send"] is False
    await asyncio.sleep(1.1)
    await _emit(
        sandbox, "customer.subscription.updated", _sub_event(church, "past_due", sub=sub_id)
    )
    async with app.state.database.unit_of_work() as session:  # make the next one older
        await session.execute(
            text(
                "UPDATE subscriptions SET last_event_created = last_event_created + 100 "
                "WHERE church_id = :c"
            ),
            {"c": church},
        )
    await _emit(sandbox, "customer.subscription.updated", _sub_event(church, "active", sub=sub_id))
    assert (await _subscription(client, owner))["status"] == "past_due"
    # Deleted is final: a later "updated" for the same subscription does not revive it.
    await _emit(
        sandbox, "customer.subscription.deleted", _sub_event(church, "canceled", sub=sub_id)
    )
    async with app.state.database.unit_of_work() as session:
        await session.execute(
            text("UPDATE subscriptions SET last_event_created = 0 WHERE church_id = :c"),
            {"c": church},
        )
    await _emit(sandbox, "customer.subscription.updated", _sub_event(church, "active", sub=sub_id))
    assert (await _subscription(client, owner))["status"] == "canceled"
    # Reading still works while sending is blocked.
    assert (await client.get("/api/v1/members", headers=owner.headers)).status_code == 200


async def test_bad_signature_changes_nothing(live_server: LiveServer) -> None:
    body = b'{"id": "evt_forged", "type": "invoice.paid", "data": {"object": {}}}'
    async with httpx.AsyncClient(base_url=live_server.url) as http:
        response = await http.post(
            "/api/v1/webhooks/stripe",
            content=body,
            headers={"Stripe-Signature": f"t={int(time.time())},v1=deadbeef"},
        )
        missing = await http.post("/api/v1/webhooks/stripe", content=body)
    assert response.status_code == missing.status_code == 400
    assert response.json()["code"] == "invalid_signature"


async def test_sending_blocked_when_trial_ended_or_past_due(
    client: httpx.AsyncClient, owner: Account, app: Any, settings: Settings
) -> None:
    church = uuid.UUID(owner.church_id)
    async with app.state.database.unit_of_work() as session:
        await ledger.ensure_subscription(session, settings, church)
        await session.execute(
            text(
                "UPDATE subscriptions SET period_end = now() - interval '1 day' "
                "WHERE church_id = :c"
            ),
            {"c": church},
        )
    with pytest.raises(ledger.SubscriptionInactiveError) as blocked:
        await ledger.debit(app.state.database, settings, church, 1, "m-1")
    assert blocked.value.status == 402
    assert (await _subscription(client, owner))["can_send"] is False


async def test_concurrent_debits_never_overdraw(
    owner: Account, app: Any, settings: Settings
) -> None:
    church = uuid.UUID(owner.church_id)
    database = app.state.database
    await ledger.debit(database, settings, church, 240, "warm-up")  # 10 of 250 left

    async def attempt(i: int) -> tuple[str, int]:
        try:
            _, retries = await ledger.debit(database, settings, church, 1, f"race-{i}")
            return "ok", retries
        except QuotaExceededError:
            return "refused", 0

    results = await asyncio.gather(*(attempt(i) for i in range(50)))
    succeeded = sum(1 for outcome, _ in results if outcome == "ok")
    retries = sum(r for _, r in results)
    REPORTS.append(
        f"50 concurrent 1-segment debits, 10 left: {succeeded} succeeded, "
        f"{50 - succeeded} refused (402), {retries} serialization retries"
    )
    assert succeeded == 10
    async with database.sessions() as session:
        usage = await ledger.usage(session, settings, church)
    assert usage.remaining == 0 and usage.used == 250
    # Debits are idempotent per reference, and a credit gives a debit back once.
    async with database.unit_of_work() as session:
        await ledger.credit(session, church, 240, "warm-up")
        await ledger.credit(session, church, 240, "warm-up")
    async with database.sessions() as session:
        assert (await ledger.usage(session, settings, church)).remaining == 240


async def test_ledger_is_append_only(owner: Account, app: Any, settings: Settings) -> None:
    church = uuid.UUID(owner.church_id)
    await ledger.debit(app.state.database, settings, church, 1, "x")
    with pytest.raises(Exception, match="append-only"):
        async with app.state.database.unit_of_work() as session:
            await session.execute(text("UPDATE usage_ledger SET segments = 0"))


async def test_stripe_outage_retries_then_opens_the_breaker(
    client: httpx.AsyncClient, owner: Account, sandbox: LiveServer, redis: Any
) -> None:
    await _sandbox(sandbox, "/sandbox/faults", {"error_rate": 1.0, "status": 500})
    try:
        first = await client.post(
            "/api/v1/billing/checkout", json={"plan": "starter"}, headers=owner.headers
        )
        assert first.status_code == 502  # three attempts (2 retries), all failed
        assert first.json()["code"] == "external_service_error"
        second = await client.post(
            "/api/v1/billing/checkout", json={"plan": "starter"}, headers=owner.headers
        )
        assert second.status_code in (502, 503)
        third = await client.post(
            "/api/v1/billing/checkout", json={"plan": "starter"}, headers=owner.headers
        )
        assert third.status_code == 503  # 5 failures within 60 s: the circuit is open
        assert int(third.headers["Retry-After"]) >= 1
        health = (await client.get("/api/v1/health")).json()
        stripe_check = health["checks"]["stripe"]
        assert stripe_check["status"] in ("degraded", "down")
    finally:
        async with httpx.AsyncClient(base_url=sandbox.url) as http:
            await http.delete("/sandbox/faults")
        await redis.delete("cb:stripe", "cb:stripe:failures", "cb:stripe:probe")


async def test_invoice_paid_recovers_a_past_due_subscription(
    client: httpx.AsyncClient, owner: Account, sandbox: LiveServer
) -> None:
    church = owner.church_id
    sub_id = f"sub_{uuid.uuid4().hex[:10]}"
    await _emit(sandbox, "customer.subscription.created", _sub_event(church, "active", sub=sub_id))
    invoice = {
        "id": "in_2",
        "customer": f"cus_{church[:8]}",
        "metadata": {"church_id": church},
        "parent": {"subscription_details": {"subscription": sub_id}},
    }
    await _emit(sandbox, "invoice.payment_failed", invoice)
    assert (await _subscription(client, owner))["status"] == "past_due"
    await _emit(sandbox, "invoice.paid", invoice)
    subscription = await _subscription(client, owner)
    assert subscription["status"] == "active" and subscription["can_send"] is True
    # An invoice of another subscription does not touch this one.
    other = invoice | {"parent": {"subscription_details": {"subscription": "sub_other"}}}
    await _emit(sandbox, "invoice.payment_failed", other)
    assert (await _subscription(client, owner))["status"] == "active"
