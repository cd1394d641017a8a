"""The sandbox in-process (ASGI transports both ways, no sockets): Telnyx numbers and
profile-routed webhooks, retries and failover, faults, and the Stripe half."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import phonenumbers
import pytest
import stripe
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from fastapi import FastAPI, Request, Response

from koinonia.sandbox.server import create_sandbox_app
from koinonia.sandbox.signing import public_key_b64
from koinonia.sandbox.state import SandboxConfig

TELNYX = {"Authorization": "Bearer KEY_sandbox"}
STRIPE = {"Authorization": "Bearer sk_test_sandbox"}
SMS = {"from": "+14155550100", "to": "+14155550123", "text": "hi"}


class Receiver:
    """A webhook endpoint that records what arrives; `failures` answers 500 first."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, str], bytes]] = []
        self.failures = 0
        self.app = FastAPI()

        @self.app.post("/{name}")
        async def hook(name: str, request: Request) -> Response:
            self.events.append((name, dict(request.headers), await request.body()))
            if self.failures:
                self.failures -= 1
                return Response(status_code=500)
            return Response(status_code=200)

    async def wait_for(self, n: int) -> None:
        for _ in range(200):
            if len(self.events) >= n:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"expected {n} webhooks, got {len(self.events)}")

    def bodies(self, name: str | None = None) -> list[dict[str, Any]]:
        return [json.loads(b) for n, _, b in self.events if name in (None, n)]


@asynccontextmanager
async def sandbox(**config: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Receiver]]:
    receiver = Receiver()
    defaults: dict[str, Any] = {
        "telnyx_webhook_url": "http://app/telnyx",
        "stripe_webhook_url": "http://app/stripe",
        "delivery_delay_ms": 1,
        "public_base_url": "http://sandbox",
    }
    app = create_sandbox_app(
        SandboxConfig(**(defaults | config)), transport=httpx.ASGITransport(receiver.app)
    )
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://sandbox") as http,
    ):
        yield http, receiver


def verify_telnyx(public_b64: str, headers: dict[str, str], body: bytes) -> None:
    key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_b64))
    signed = f"{headers['telnyx-timestamp']}|".encode() + body
    key.verify(base64.b64decode(headers["telnyx-signature-ed25519"]), signed)


# --- Telnyx -----------------------------------------------------------------------------


async def test_numbers_search_order_and_profile_routing() -> None:
    async with sandbox() as (http, receiver):
        found = await http.get(
            "/v2/available_phone_numbers",
            headers=TELNYX,
            params={"filter[country_code]": "US", "filter[limit]": 3},
        )
        numbers = [n["phone_number"] for n in found.json()["data"]]
        assert len(set(numbers)) == 3
        assert all(phonenumbers.is_valid_number(phonenumbers.parse(n)) for n in numbers)
        again = await http.get("/v2/available_phone_numbers", headers=TELNYX)
        assert not set(numbers) & {n["phone_number"] for n in again.json()["data"]}

        profile = await http.post(
            "/v2/messaging_profiles",
            headers=TELNYX,
            json={"name": "Grace Church", "webhook_url": "http://app/profile"},
        )
        profile_id = profile.json()["data"]["id"]
        order = await http.post(
            "/v2/number_orders",
            headers=TELNYX,
            json={"phone_numbers": [{"phone_number": numbers[0]}]},
        )
        data = order.json()["data"]
        assert data["status"] == "success"
        assert data["phone_numbers"][0] == data["phone_numbers"][0] | {
            "phone_number": numbers[0],
            "status": "success",
        }
        fetched = await http.get(f"/v2/number_orders/{data['id']}", headers=TELNYX)
        assert fetched.json()["data"]["id"] == data["id"]
        twice = await http.post(
            "/v2/number_orders",
            headers=TELNYX,
            json={"phone_numbers": [{"phone_number": numbers[0]}]},
        )
        assert twice.status_code == 422

        linked = await http.patch(
            f"/v2/phone_numbers/{numbers[0]}/messaging",
            headers=TELNYX,
            json={"messaging_profile_id": profile_id},
        )
        assert linked.json()["data"]["messaging_profile_id"] == profile_id

        # Receipts for sends from the number, and texts to it, go to the profile's URL.
        await http.post("/v2/messages", headers=TELNYX, json=SMS | {"from": numbers[0]})
        inbound = await http.post(
            "/sandbox/inbound", json={"from": "+14155550123", "to": numbers[0], "text": "HELLO"}
        )
        assert inbound.json()["delivered_status"] == 200
        await receiver.wait_for(3)
        kinds = sorted(b["data"]["event_type"] for b in receiver.bodies("profile"))
        assert kinds == ["message.finalized", "message.received", "message.sent"]


async def test_webhook_retry_then_failover_with_attempt_count() -> None:
    async with sandbox(webhook_retry_pauses=(0.01, 0.01, 0.01)) as (http, receiver):
        public = (await http.get("/sandbox/public-key")).json()["public_key"]
        receiver.failures = 4  # three tries at the primary, one at the failover
        sent = await http.post(
            "/v2/messages",
            headers=TELNYX,
            json=SMS
            | {"webhook_url": "http://app/primary", "webhook_failover_url": "http://app/backup"},
        )
        assert sent.status_code == 200
        await receiver.wait_for(6)
        names = [name for name, _, _ in receiver.events]
        assert names[:5] == ["primary"] * 3 + ["backup"] * 2
        first_event = receiver.bodies()[:5]
        assert [b["meta"]["attempt"] for b in first_event] == [1, 2, 3, 4, 5]
        assert len({b["data"]["id"] for b in first_event}) == 1  # one event, redelivered
        for _, headers, body in receiver.events:
            verify_telnyx(public, headers, body)


async def test_no_profile_webhooks_means_no_receipts() -> None:
    async with sandbox() as (http, receiver):
        await http.post("/v2/messages", headers=TELNYX, json=SMS | {"use_profile_webhooks": False})
        await asyncio.sleep(0.05)
        assert receiver.events == []


async def test_landline_latency_and_failed_delivery() -> None:
    async with sandbox() as (http, receiver):
        landline = await http.post(
            "/v2/messages", headers=TELNYX, json=SMS | {"to": "+14155550001"}
        )
        assert (landline.status_code, landline.json()["errors"][0]["code"]) == (400, "40001")
        await http.post("/sandbox/faults", json={"latency_ms": 100, "delivery_failure_rate": 1})
        started = time.monotonic()
        sent = await http.post("/v2/messages", headers=TELNYX, json=SMS)
        assert time.monotonic() - started >= 0.1
        await receiver.wait_for(2)
        final = receiver.bodies()[-1]["data"]
        assert final["event_type"] == "message.finalized"
        assert final["payload"]["to"][0]["status"] == "delivery_failed"
        assert final["payload"]["errors"][0]["code"] == "40008"
        looked_up = await http.get(f"/v2/messages/{sent.json()['data']['id']}", headers=TELNYX)
        assert looked_up.json()["data"]["to"][0]["status"] == "delivery_failed"


async def test_timeout_is_ambiguous_the_message_was_accepted() -> None:
    async with sandbox(timeout_hold_seconds=5) as (http, receiver):
        await http.post("/sandbox/faults", json={"timeout_rate": 1})
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(http.post("/v2/messages", headers=TELNYX, json=SMS), 0.2)
        log = (await http.get("/sandbox/messages", params={"to": SMS["to"]})).json()["data"]
        assert len(log) == 1
        await receiver.wait_for(2)  # and it was delivered: resending would text twice
        assert receiver.bodies()[-1]["data"]["payload"]["id"] == log[0]["id"]


async def test_faults_are_validated_and_seeded() -> None:
    async with sandbox(seed=7) as (http, _):
        bad = await http.post("/sandbox/faults", json={"error_rate": 2})
        assert bad.status_code == 422
        await http.post("/sandbox/faults", json={"error_rate": 0.5, "status": 502})
        first = [(await http.get("/v2/balance", headers=TELNYX)).status_code for _ in range(20)]
    async with sandbox(seed=7) as (http, _):
        await http.post("/sandbox/faults", json={"error_rate": 0.5, "status": 502})
        second = [(await http.get("/v2/balance", headers=TELNYX)).status_code for _ in range(20)]
    assert first == second and {200, 502} <= set(first)


async def test_configured_pem_key_signs() -> None:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()
    async with sandbox(telnyx_private_key=pem) as (http, _):
        public = (await http.get("/sandbox/public-key")).json()["public_key"]
    assert public == public_key_b64(key)


# --- Stripe -----------------------------------------------------------------------------


async def test_stripe_auth_customer_and_idempotency() -> None:
    async with sandbox() as (http, _):
        refused = await http.post("/v1/customers", data={"email": "a@b.org"})
        assert refused.status_code == 401
        assert refused.json()["error"]["type"] == "invalid_request_error"
        key = {"Idempotency-Key": "church-1-customer"}
        params = {"email": "pastor@grace.org", "metadata[church_id]": "1"}
        first = await http.post("/v1/customers", headers=STRIPE | key, data=params)
        customer = first.json()
        assert customer["id"].startswith("cus_") and customer["object"] == "customer"
        assert customer["metadata"] == {"church_id": "1"} and customer["livemode"] is False
        replay = await http.post("/v1/customers", headers=STRIPE | key, data=params)
        assert replay.json() == customer and replay.headers["Idempotent-Replayed"] == "true"
        conflict = await http.post(
            "/v1/customers", headers=STRIPE | key, data=params | {"email": "x@y.org"}
        )
        assert conflict.status_code == 400
        assert conflict.json()["error"]["type"] == "idempotency_error"
        got = await http.get(f"/v1/customers/{customer['id']}", headers=STRIPE)
        assert got.json()["email"] == "pastor@grace.org"
        missing = await http.get("/v1/customers/cus_nope", headers=STRIPE)
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "resource_missing"


async def test_stripe_checkout_complete_sends_signed_events() -> None:
    async with sandbox() as (http, receiver):
        customer = (await http.post("/v1/customers", headers=STRIPE, data={})).json()["id"]
        session = await http.post(
            "/v1/checkout/sessions",
            headers=STRIPE,
            data={
                "mode": "subscription",
                "customer": customer,
                "line_items[0][price]": "price_standard",
                "line_items[0][quantity]": "1",
                "success_url": "http://app/ok",
                "cancel_url": "http://app/cancel",
                "client_reference_id": "church-1",
                "metadata[church_id]": "1",
            },
        )
        checkout = session.json()
        assert checkout["id"].startswith("cs_test_") and checkout["object"] == "checkout.session"
        assert checkout["url"] == f"http://sandbox/sandbox/stripe/checkout/{checkout['id']}"
        portal = await http.post(
            "/v1/billing_portal/sessions",
            headers=STRIPE,
            data={"customer": customer, "return_url": "http://app/billing"},
        )
        assert portal.json()["object"] == "billing_portal.session"
        assert portal.json()["id"].startswith("bps_")

        done = await http.post(f"/sandbox/stripe/checkout/{checkout['id']}/complete")
        assert set(done.json()["deliveries"].values()) == {200}
        for _, headers, body in receiver.events:  # as the official library checks it
            stripe.Webhook.construct_event(body, headers["stripe-signature"], "whsec_sandbox")
        events = receiver.bodies()
        assert [e["type"] for e in events] == [
            "checkout.session.completed",
            "customer.subscription.created",
            "invoice.paid",
        ]
        completed = events[0]["data"]["object"]
        assert completed["client_reference_id"] == "church-1"
        assert completed["metadata"] == {"church_id": "1"}
        subscription = events[1]["data"]["object"]
        assert subscription["status"] == "active" and subscription["customer"] == customer
        assert subscription["items"]["data"][0]["price"]["id"] == "price_standard"
        fetched = await http.get(f"/v1/subscriptions/{subscription['id']}", headers=STRIPE)
        assert fetched.json()["id"] == completed["subscription"]


async def test_stripe_custom_event_hmac_and_faults() -> None:
    async with sandbox() as (http, receiver):
        answer = await http.post(
            "/sandbox/stripe/events",
            json={"type": "customer.subscription.updated", "data": {"object": {"id": "sub_1"}}},
        )
        assert answer.status_code == 202 and answer.json()["delivered_status"] == 200
        _, headers, body = receiver.events[-1]
        parts = dict(item.split("=", 1) for item in headers["stripe-signature"].split(","))
        expected = hmac.new(
            b"whsec_sandbox", f"{parts['t']}.".encode() + body, hashlib.sha256
        ).hexdigest()
        assert hmac.compare_digest(parts["v1"], expected)
        event = json.loads(body)
        assert event["id"] == answer.json()["id"] and event["object"] == "event"

        await http.post("/sandbox/faults", json={"error_rate": 1, "status": 503})
        failed = await http.get("/v1/balance", headers=STRIPE)
        assert failed.status_code == 503 and failed.json()["error"]["type"] == "api_error"
        await http.delete("/sandbox/faults")
        assert (await http.get("/v1/balance", headers=STRIPE)).json()["object"] == "balance"
