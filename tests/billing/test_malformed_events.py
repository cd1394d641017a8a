"""Correctly signed but malformed provider events never answer 5xx.

Stripe: an event that cannot be applied is stored, dead-lettered (`webhook.stripe`,
`malformed_event`) and acknowledged with 200 (so Stripe stops redelivering it); a body
that is not an event at all is a 400. Telnyx: the envelope is checked at the door (400);
a payload of the wrong shape is stored, acknowledged and dead-lettered by the worker."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from koinonia.members.crypto import ContactCipher
from koinonia.messaging import refs
from koinonia.sandbox.signing import load_telnyx_key, stripe_signature, telnyx_headers
from koinonia.settings import Settings
from koinonia.telnyx.events import apply_pending
from tests.conftest import TELNYX_TEST_SEED
from tests.support.api import Account


async def _stripe(client: httpx.AsyncClient, settings: Settings, body: bytes) -> httpx.Response:
    secret = settings.stripe_webhook_secret_list[0]
    return await client.post(
        "/api/v1/webhooks/stripe",
        content=body,
        headers={"Stripe-Signature": stripe_signature(secret, body, int(time.time()))},
    )


def _event(event_type: str, obj: Any, **fields: Any) -> dict[str, Any]:
    return {
        "id": f"evt_{uuid.uuid4().hex[:12]}",
        "object": "event",
        "type": event_type,
        "created": int(time.time()),
        "data": {"object": obj},
        **fields,
    }


def _subscription(church: str, **fields: Any) -> dict[str, Any]:
    now = int(time.time())
    return {
        "id": f"sub_{uuid.uuid4().hex[:10]}",
        "status": "active",
        "customer": f"cus_{uuid.uuid4().hex[:10]}",
        "metadata": {"church_id": church},
        "items": {
            "data": [
                {
                    "price": {"id": "price_growth"},
                    "current_period_start": now,
                    "current_period_end": now + 30 * 86400,
                }
            ]
        },
        **fields,
    }


async def _dead_letter(app: FastAPI, event_id: str) -> Any:
    async with app.state.database.unit_of_work() as session:
        return (
            await session.execute(
                text(
                    "SELECT d.kind, d.error_code, d.last_error, e.last_error AS stored_error "
                    "FROM dead_letters d JOIN webhook_events e "
                    "ON e.id = (d.payload ->> 'webhook_event_id')::bigint "
                    "WHERE e.provider = 'stripe' AND e.event_id = :e"
                ),
                {"e": event_id},
            )
        ).one_or_none()


def _cases(church: str) -> dict[str, dict[str, Any]]:
    sub = _subscription(church)
    return {
        "created_yesterday": _event("customer.subscription.updated", sub, created="yesterday"),
        "object_a_string": _event("invoice.paid", "a string"),
        "created_missing": {k: v for k, v in _event("invoice.paid", {}).items() if k != "created"},
        "created_a_bool": _event("invoice.paid", {}, created=True),
        "period_overflows": _event(
            "customer.subscription.updated",
            _subscription(church, current_period_end=10**20),
        ),
        "items_a_string": _event("customer.subscription.updated", sub | {"items": "x"}),
        "price_a_list": _event(
            "customer.subscription.updated",
            sub | {"items": {"data": [{"price": ["price_growth"]}]}},
        ),
        "status_unknown": _event("customer.subscription.updated", sub | {"status": "x" * 40}),
        "customer_too_long": _event("customer.subscription.updated", sub | {"customer": "c" * 99}),
        "metadata_a_list": _event("checkout.session.completed", {"metadata": [church]}),
        "cancel_flag_a_string": _event(
            "customer.subscription.updated", sub | {"cancel_at_period_end": "no"}
        ),
        "invoice_details_a_string": _event(
            "invoice.payment_failed", {"parent": {"subscription_details": "sub_1"}}
        ),
    }


@pytest.mark.parametrize("case", list(_cases(str(uuid.UUID(int=0)))))
async def test_a_signed_malformed_stripe_event_is_dead_lettered_and_acknowledged(
    client: httpx.AsyncClient, app: FastAPI, settings: Settings, owner: Account, case: str
) -> None:
    before = (await client.get("/api/v1/billing/subscription", headers=owner.headers)).json()
    event = _cases(owner.church_id)[case]
    body = json.dumps(event).encode()
    answer = await _stripe(client, settings, body)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"received": True, "duplicate": False}
    dead = await _dead_letter(app, event["id"])
    assert dead is not None, "dead-lettered"
    assert (dead.kind, dead.error_code) == ("webhook.stripe", "malformed_event")
    assert dead.stored_error == dead.last_error
    again = await _stripe(client, settings, body)  # Stripe's redelivery
    assert again.json() == {"received": True, "duplicate": True}
    after = (await client.get("/api/v1/billing/subscription", headers=owner.headers)).json()
    assert after == before


async def test_an_event_for_a_church_that_does_not_exist_changes_nothing(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    event = _event("customer.subscription.updated", _subscription(str(uuid.uuid4())))
    answer = await _stripe(client, settings, json.dumps(event).encode())
    assert answer.status_code == 200, answer.text


async def test_nul_and_lone_surrogates_are_stored_not_500(
    client: httpx.AsyncClient, app: FastAPI, settings: Settings, owner: Account
) -> None:
    sub = _subscription(owner.church_id, description="a\u0000b")
    event = _event("customer.subscription.updated", sub)
    body = json.dumps(event).replace("a\\u0000b", "a\\u0000b\\ud800").encode()
    answer = await _stripe(client, settings, body)
    assert answer.status_code == 200, answer.text
    got = (await client.get("/api/v1/billing/subscription", headers=owner.headers)).json()
    assert (got["plan"], got["status"]) == ("growth", "active")


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"id": "evt_1"}',
        b'{"id": 7, "type": "invoice.paid"}',
        b'{"id": "evt_nan", "type": "invoice.paid", "created": NaN}',
        b"[" * 5000 + b"]" * 5000,
    ],
)
async def test_a_signed_body_that_is_not_an_event_is_400(
    client: httpx.AsyncClient, settings: Settings, body: bytes
) -> None:
    answer = await _stripe(client, settings, body)
    assert answer.status_code == 400
    assert answer.json()["code"] == "malformed_event"


async def _telnyx(client: httpx.AsyncClient, body: bytes) -> httpx.Response:
    headers = telnyx_headers(load_telnyx_key(TELNYX_TEST_SEED), body, int(time.time()))
    return await client.post(
        "/api/v1/webhooks/telnyx",
        content=body,
        headers=headers | {"Content-Type": "application/json"},
    )


def _telnyx_event(event_type: str, payload: Any) -> dict[str, Any]:
    return {
        "data": {
            "event_type": event_type,
            "id": str(uuid.uuid4()),
            "occurred_at": "2026-11-25T12:00:00.000+00:00",
            "record_type": "event",
            "payload": payload,
        }
    }


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"data": "x"}',
        b'{"data": {"id": "", "event_type": "message.sent"}}',
        b'{"data": {"id": 5, "event_type": "message.sent"}}',
        b'{"data": {"id": "e", "event_type": "message.sent", "x": Infinity}}',
    ],
)
async def test_a_signed_telnyx_body_that_is_not_an_event_is_400(
    client: httpx.AsyncClient, body: bytes
) -> None:
    answer = await _telnyx(client, body)
    assert answer.status_code == 400
    assert answer.json()["code"] == "malformed_event"


async def test_a_signed_telnyx_event_with_a_malformed_payload_is_dead_lettered(
    client: httpx.AsyncClient, app: FastAPI, settings: Settings
) -> None:
    events = [
        _telnyx_event("message.received", "a string"),
        _telnyx_event("message.received", {"id": "x", "from": "+14155550100", "text": "STOP"}),
        _telnyx_event("message.finalized", {"id": "x", "to": ["+14155550100"]}),
        _telnyx_event("message.sent", {"id": "x", "to": [{"status": "sent"}], "errors": "e"}),
        _telnyx_event("message.received", {"id": "x", "text": "a\u0000b\ud800"}),
    ]
    for event in events:
        body = json.dumps(event).encode()
        answer = await _telnyx(client, body)
        assert answer.status_code == 200, answer.text
    cipher = ContactCipher.from_settings(settings)
    key = refs.ref_key(settings.member_hmac_key.get_secret_value())
    while (await apply_pending(app.state.database, cipher, app.state.job_app, key, 100)).events:
        pass
    ids = [e["data"]["id"] for e in events]
    async with app.state.database.unit_of_work() as session:
        rows = (
            await session.execute(
                text(
                    "SELECT e.event_id, e.processed_at IS NOT NULL AS done, e.attempts, "
                    "d.error_code FROM webhook_events e LEFT JOIN dead_letters d "
                    "ON d.kind = 'webhook.telnyx' "
                    "AND (d.payload ->> 'webhook_event_id')::bigint = e.id "
                    "WHERE e.provider = 'telnyx' AND e.event_id = ANY(:ids)"
                ),
                {"ids": ids},
            )
        ).all()
    by_id = {r.event_id: r for r in rows}
    assert all(by_id[i].done for i in ids), "settled at once, not retried for minutes"
    for malformed in ids[:4]:
        assert (by_id[malformed].attempts, by_id[malformed].error_code) == (1, "malformed_event")
    assert by_id[ids[4]].error_code is None  # NUL and a lone surrogate: stored and applied
