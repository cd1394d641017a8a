"""Telnyx webhook signatures (units) and the endpoint: forged → 401 touching nothing,
the same event twice → stored once, `finalized` before `sent` → final state kept."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI
from sqlalchemy import text

from koinonia.errors import WebhookSignatureError
from koinonia.members.crypto import ContactCipher
from koinonia.messaging import refs
from koinonia.sandbox.signing import load_telnyx_key, telnyx_headers
from koinonia.settings import Settings
from koinonia.telnyx import signatures
from koinonia.telnyx.events import apply_pending
from tests.conftest import TELNYX_TEST_SEED
from tests.messaging.conftest import SendingChurch, WorkerFactory, eventually
from tests.support.api import add_member

KEY = Ed25519PrivateKey.generate()
PUBLIC = [KEY.public_key()]
BODY = b'{"data": {"id": "e1", "event_type": "message.sent"}}'


def _signed(body: bytes, at: int | None = None, key: Ed25519PrivateKey = KEY) -> tuple[str, str]:
    headers = telnyx_headers(key, body, at if at is not None else int(time.time()))
    return headers["telnyx-signature-ed25519"], headers["telnyx-timestamp"]


def test_good_signature_verifies() -> None:
    signatures.verify(PUBLIC, BODY, *_signed(BODY))


@pytest.mark.parametrize(
    "case",
    ["wrong_key", "stale", "future", "tampered", "no_signature", "no_timestamp", "garbage"],
)
def test_bad_signatures_are_refused(case: str) -> None:
    signature, timestamp = _signed(BODY)
    body = BODY
    if case == "wrong_key":
        signature, timestamp = _signed(BODY, key=Ed25519PrivateKey.generate())
    elif case == "stale":
        signature, timestamp = _signed(BODY, at=int(time.time()) - 301)
    elif case == "future":
        signature, timestamp = _signed(BODY, at=int(time.time()) + 301)
    elif case == "tampered":
        body = BODY.replace(b"e1", b"e2")
    elif case == "no_signature":
        signature = ""
    elif case == "no_timestamp":
        timestamp = ""
    elif case == "garbage":
        signature = "***"
    with pytest.raises(WebhookSignatureError):
        signatures.verify(PUBLIC, body, signature or None, timestamp or None)


def test_row_references_are_tamper_proof() -> None:
    key = refs.ref_key("x" * 40)
    ref = refs.RowRef("r", 42, __import__("datetime").datetime.now(__import__("datetime").UTC))
    encoded = refs.encode(key, ref)
    assert refs.decode(key, encoded) == ref
    forged = encoded.replace(".42.", ".43.")
    assert refs.decode(key, forged) is None
    assert refs.decode(refs.ref_key("y" * 40), encoded) is None


def _event(event_type: str, payload: dict[str, Any], event_id: str | None = None) -> bytes:
    return json.dumps(
        {
            "data": {
                "event_type": event_type,
                "id": event_id or str(uuid.uuid4()),
                "occurred_at": "2026-11-25T12:00:00.000+00:00",
                "record_type": "event",
                "payload": payload,
            },
            "meta": {"attempt": 1, "delivered_to": "http://test"},
        }
    ).encode()


async def _post(client: httpx.AsyncClient, body: bytes, **params: str) -> httpx.Response:
    headers = telnyx_headers(load_telnyx_key(TELNYX_TEST_SEED), body, int(time.time()))
    return await client.post(
        "/api/v1/webhooks/telnyx",
        content=body,
        headers=headers | {"Content-Type": "application/json"},
        params=params,
    )


async def test_forged_webhook_is_401_and_stores_nothing(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    body = _event("message.received", {"id": "x"})
    forged = telnyx_headers(KEY, body, int(time.time()))
    answer = await client.post(
        "/api/v1/webhooks/telnyx",
        content=body,
        headers=forged | {"Content-Type": "application/json"},
    )
    assert answer.status_code == 401 and answer.json()["code"] == "invalid_signature"
    missing = await client.post("/api/v1/webhooks/telnyx", content=body)
    assert missing.status_code == 401
    async with app.state.database.unit_of_work() as session:
        stored = await session.scalar(
            text("SELECT count(*) FROM webhook_events WHERE payload -> 'data' ->> 'id' = :id"),
            {"id": json.loads(body)["data"]["id"]},
        )
    assert stored == 0


async def test_duplicate_and_out_of_order_receipts(
    client: httpx.AsyncClient,
    app: FastAPI,
    settings: Settings,
    sending_church: SendingChurch,
    sandbox_http: httpx.AsyncClient,
    worker: WorkerFactory,
) -> None:
    member = await add_member(client, sending_church.account)
    sent = await client.post(
        "/api/v1/messages",
        json={"body": "hello", "member_ids": [member["id"]]},
        headers=sending_church.headers,
    )
    message_id = sent.json()["id"]
    async with worker():

        async def delivered() -> Any:
            got = (
                await client.get(f"/api/v1/messages/{message_id}", headers=sending_church.headers)
            ).json()
            return got if got["counts"]["delivered"] == 1 else None

        await eventually(delivered)
    recipient = (
        await client.get(
            f"/api/v1/messages/{message_id}/recipients", headers=sending_church.headers
        )
    ).json()["data"][0]
    provider_id = recipient["provider_message_id"]
    payload = {
        "id": provider_id,
        "to": [{"phone_number": member["phone"], "status": "sent"}],
        "parts": 1,
    }
    # A late `message.sent` (after `finalized`), delivered twice with the same event id.
    event_id = str(uuid.uuid4())
    first = await _post(client, _event("message.sent", payload, event_id))
    second = await _post(client, _event("message.sent", payload, event_id))
    assert first.json() == {"received": True, "duplicate": False}
    assert second.json() == {"received": True, "duplicate": True}
    cipher = ContactCipher.from_settings(settings)
    key = refs.ref_key(settings.member_hmac_key.get_secret_value())
    while (await apply_pending(app.state.database, cipher, app.state.job_app, key, 100)).events:
        pass
    after = (
        await client.get(f"/api/v1/messages/{message_id}", headers=sending_church.headers)
    ).json()
    assert after["counts"] == {"queued": 0, "sent": 0, "delivered": 1, "failed": 0, "skipped": 0}
    again = (
        await client.get(
            f"/api/v1/messages/{message_id}/recipients", headers=sending_church.headers
        )
    ).json()["data"][0]
    assert again["status"] == "delivered"


async def test_concurrent_redeliveries_store_one_event(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    """Requests arriving together share one INSERT; the same event id in it is still
    stored once and exactly one answer says it was new."""
    event_id = str(uuid.uuid4())
    same = _event("message.sent", {"id": str(uuid.uuid4()), "to": [], "parts": 1}, event_id)
    others = [
        _event("message.sent", {"id": str(uuid.uuid4()), "to": [], "parts": 1}) for _ in range(30)
    ]
    answers = await asyncio.gather(*(_post(client, body) for body in [same] * 20 + others))
    assert all(a.status_code == 200 for a in answers)
    firsts = [a.json()["duplicate"] for a in answers[:20]]
    assert firsts.count(False) == 1
    assert not any(a.json()["duplicate"] for a in answers[20:])
    async with app.state.database.unit_of_work() as session:
        stored = await session.scalar(
            text("SELECT count(*) FROM webhook_events WHERE provider = 'telnyx' AND event_id = :e"),
            {"e": event_id},
        )
    assert stored == 1
