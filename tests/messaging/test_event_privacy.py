"""A Telnyx event keeps no plain-text phone or body once applied (or dead-lettered): its
message object is sealed with the member keys, `koinonia_ref` and `data.payload.id` stay
readable for the reconciler, and a replayed dead letter is unsealed and applied as new."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import text

from koinonia.deadletters import service as dead_letters
from koinonia.members.crypto import ContactCipher
from koinonia.messaging import refs
from koinonia.sandbox.signing import load_telnyx_key, telnyx_headers
from koinonia.settings import Settings
from koinonia.telnyx import privacy
from koinonia.telnyx.events import apply_pending
from tests.conftest import TELNYX_TEST_SEED
from tests.messaging.conftest import SendingChurch

BODY = "Please pray for my mother, she is in hospital"


def _inbound(sender: str, to: str, body: str) -> dict[str, Any]:
    return {
        "data": {
            "event_type": "message.received",
            "id": str(uuid.uuid4()),
            "occurred_at": "2026-11-25T12:00:00.000+00:00",
            "record_type": "event",
            "payload": {
                "id": str(uuid.uuid4()),
                "record_type": "message",
                "direction": "inbound",
                "from": {"phone_number": sender, "carrier": "T-Mobile"},
                "to": [{"phone_number": to, "status": "webhook_delivered"}],
                "text": body,
                "media": [{"url": "https://media.example/p.jpg", "content_type": "image/jpeg"}],
                "parts": 1,
            },
        }
    }


async def _post(client: httpx.AsyncClient, event: dict[str, Any], **params: str) -> None:
    body = json.dumps(event).encode()
    headers = telnyx_headers(load_telnyx_key(TELNYX_TEST_SEED), body, int(time.time()))
    answer = await client.post(
        "/api/v1/webhooks/telnyx", content=body, headers=headers, params=params
    )
    assert answer.status_code == 200, answer.text


async def _apply_all(app: FastAPI, settings: Settings) -> None:
    cipher = ContactCipher.from_settings(settings)
    key = refs.ref_key(settings.member_hmac_key.get_secret_value())
    while (await apply_pending(app.state.database, cipher, app.state.job_app, key, 100)).events:
        pass


async def _stored(app: FastAPI, event_id: str) -> Any:
    async with app.state.database.unit_of_work() as session:
        return (
            await session.execute(
                text(
                    "SELECT id, payload, payload::text AS raw, processed_at, "
                    "payload ->> 'koinonia_ref' AS ref, "
                    "payload -> 'data' -> 'payload' ->> 'id' AS provider_id "
                    "FROM webhook_events WHERE provider = 'telnyx' AND event_id = :e"
                ),
                {"e": event_id},
            )
        ).one()


async def _texts_with(app: FastAPI, provider_id: str) -> int:
    async with app.state.database.unit_of_work() as session:
        count: int = await session.scalar(
            text("SELECT count(*) FROM conversation_messages WHERE provider_message_id = :p"),
            {"p": provider_id},
        )
    return count


async def test_an_applied_inbound_event_keeps_no_phone_or_body(
    client: httpx.AsyncClient, app: FastAPI, settings: Settings, sending_church: SendingChurch
) -> None:
    sender = f"+1415555{uuid.uuid4().int % 10000:04d}"
    event = _inbound(sender, sending_church.number, BODY)
    await _post(client, event)
    await _apply_all(app, settings)
    provider_id = event["data"]["payload"]["id"]
    assert await _texts_with(app, provider_id) == 1, "applied: the text reached the inbox"
    row = await _stored(app, event["data"]["id"])
    assert row.processed_at is not None
    for secret in (sender, sender[2:], sending_church.number, BODY, "media.example"):
        assert secret not in row.raw, secret
    assert row.provider_id == provider_id  # the reconciler's key stays readable
    assert row.payload["data"]["event_type"] == "message.received"
    assert row.payload["data"]["payload"]["to"] == [{"status": "webhook_delivered"}]
    # Sealed with the member keys, bound to its row: it opens to exactly what arrived.
    cipher = ContactCipher.from_settings(settings)
    assert privacy.unseal(cipher, row.id, row.payload)["data"] == event["data"]


async def test_an_applied_receipt_keeps_its_reference_readable(
    client: httpx.AsyncClient, app: FastAPI, settings: Settings
) -> None:
    phone = "+14155550177"
    event = {
        "data": {
            "event_type": "message.finalized",
            "id": str(uuid.uuid4()),
            "record_type": "event",
            "payload": {
                "id": str(uuid.uuid4()),
                "to": [{"phone_number": phone, "status": "delivery_failed"}],
                "text": BODY,
                "errors": [{"code": "40008", "title": "Undeliverable", "detail": f"to {phone}"}],
            },
        }
    }
    await _post(client, event, ref="r.1.2.abc")
    await _apply_all(app, settings)
    row = await _stored(app, event["data"]["id"])
    assert row.processed_at is not None
    assert phone not in row.raw and phone[2:] not in row.raw and BODY not in row.raw
    assert row.ref == "r.1.2.abc"
    assert row.provider_id == event["data"]["payload"]["id"]
    assert row.payload["data"]["payload"]["errors"] == [{"code": "40008", "title": "Undeliverable"}]


async def test_a_sealed_dead_letter_is_replayed_and_applied(
    client: httpx.AsyncClient,
    app: FastAPI,
    settings: Settings,
    sending_church: SendingChurch,
    tenant_factory: Any,
) -> None:
    operator = await tenant_factory(is_operator=True)
    sender = f"+1415556{uuid.uuid4().int % 10000:04d}"
    event = _inbound(sender, sending_church.number, BODY)
    cipher = ContactCipher.from_settings(settings)
    async with app.state.database.unit_of_work() as session:
        row_id = await session.scalar(
            text(
                "INSERT INTO webhook_events (provider, event_id, event_type, payload, "
                "processed_at, attempts, last_error) VALUES ('telnyx', :e, 'message.received', "
                "'{}', now(), 10, 'boom') RETURNING id"
            ),
            {"e": event["data"]["id"]},
        )
        sealed = privacy.seal(cipher, row_id, event)  # as a worker leaves a dead letter
        await session.execute(
            text("UPDATE webhook_events SET payload = CAST(:p AS jsonb) WHERE id = :i"),
            {"p": json.dumps(sealed), "i": row_id},
        )
        await dead_letters.record(
            session,
            kind="webhook.telnyx",
            church_id=None,
            payload={"webhook_event_id": row_id, "event_type": "message.received"},
            error="boom",
            error_code=None,
            attempts=10,
        )
        entry_id = await session.scalar(
            text("SELECT max(id) FROM dead_letters WHERE kind = 'webhook.telnyx'")
        )
    assert sender not in json.dumps(sealed) and BODY not in json.dumps(sealed)
    replayed = await client.post(f"/api/v1/admin/dlq/{entry_id}/replay", headers=operator.headers)
    assert replayed.status_code == 200, replayed.text
    await _apply_all(app, settings)
    assert await _texts_with(app, event["data"]["payload"]["id"]) == 1
    row = await _stored(app, event["data"]["id"])
    assert row.processed_at is not None and BODY not in row.raw


async def test_an_event_dead_lettered_by_the_worker_is_sealed(
    client: httpx.AsyncClient, app: FastAPI, settings: Settings
) -> None:
    phone = "+14155550188"
    event = {
        "data": {
            "event_type": "message.finalized",
            "id": str(uuid.uuid4()),
            "payload": {"id": "m-x", "to": [phone], "text": BODY},  # malformed `to`
        }
    }
    await _post(client, event)
    await _apply_all(app, settings)
    row = await _stored(app, event["data"]["id"])
    assert row.processed_at is not None
    assert phone not in row.raw and BODY not in row.raw
    assert (
        privacy.unseal(ContactCipher.from_settings(settings), row.id, row.payload)["data"]
        == event["data"]
    )


def test_any_row_id_seals_and_opens() -> None:
    from koinonia.members.crypto import ContactCipher
    from koinonia.telnyx.privacy import seal, unseal
    from tests.conftest import make_settings

    cipher = ContactCipher.from_settings(make_settings())
    event = {"data": {"id": "e", "event_type": "message.received", "payload": {"text": "hi"}}}
    for row_id in (1, -5, 2**63 - 1):
        assert unseal(cipher, row_id, seal(cipher, row_id, event)) == event
