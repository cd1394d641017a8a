"""Work that ran out of retries lands in the dead-letter queue; an operator's replay
sends it (once, billed again) or applies it again, and a second replay is refused."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import text

from koinonia.deadletters import service as dead_letters
from koinonia.members.crypto import ContactCipher
from koinonia.messaging import refs
from koinonia.observability import RETRIES
from koinonia.settings import Settings
from koinonia.telnyx.events import apply_pending
from tests.messaging.conftest import SendingChurch, WorkerFactory, eventually
from tests.support.api import add_member
from tests.support.servers import free_port

DLQ = "/api/v1/admin/dlq"


async def test_exhausted_send_is_dead_lettered_and_replayed_once(
    client: httpx.AsyncClient,
    sending_church: SendingChurch,
    sandbox_http: httpx.AsyncClient,
    worker: WorkerFactory,
    tenant_factory: Any,
) -> None:
    operator = await tenant_factory(is_operator=True)
    headers = sending_church.headers
    member = await add_member(client, sending_church.account)
    # Telnyx cannot be reached (a refused connection: surely not sent), so the retries run
    # out. (A 429 would only slow sending down: throttling fails nobody.)
    sent = await client.post(
        "/api/v1/messages", json={"body": "Hi", "member_ids": [member["id"]]}, headers=headers
    )
    message_id = sent.json()["id"]
    usage_before = (await client.get("/api/v1/billing/usage", headers=headers)).json()

    async def counts() -> dict[str, int]:
        got = (await client.get(f"/api/v1/messages/{message_id}", headers=headers)).json()
        result: dict[str, int] = got["counts"]
        return result

    retries_before = RETRIES.labels("telnyx_send")._value.get()
    async with worker(telnyx_max_retries=1, telnyx_base_url=_unreachable()):
        await eventually(lambda: _when(counts(), lambda c: c["failed"] == 1), within=30)
    assert RETRIES.labels("telnyx_send")._value.get() == retries_before + 1  # counted
    refunded = (await client.get("/api/v1/billing/usage", headers=headers)).json()
    assert refunded["remaining"] == usage_before["remaining"] + 1  # not billed

    listed = await client.get(
        DLQ,
        params={"kind": "sms.send", "church_id": sending_church.account.church_id},
        headers=operator.headers,
    )
    assert listed.status_code == 200, listed.text
    [entry] = listed.json()["data"]
    assert entry["payload"]["message_id"] == message_id
    assert entry["attempts"] == 2 and entry["error_code"] == "retries_exhausted"
    assert member["phone"] not in str(entry)

    await sandbox_http.delete("/sandbox/faults")
    replayed = await client.post(f"{DLQ}/{entry['id']}/replay", headers=operator.headers)
    assert replayed.status_code == 200, replayed.text
    assert replayed.json()["replay_state"] == "replayed"
    again = await client.post(f"{DLQ}/{entry['id']}/replay", headers=operator.headers)
    assert again.status_code == 409

    async with worker():
        await eventually(lambda: _when(counts(), lambda c: c["delivered"] == 1), within=30)
    assert await counts() == {"queued": 0, "sent": 0, "delivered": 1, "failed": 0, "skipped": 0}
    message = (await client.get(f"/api/v1/messages/{message_id}", headers=headers)).json()
    assert message["status"] == "completed"
    log = (await sandbox_http.get("/sandbox/messages", params={"to": member["phone"]})).json()
    assert len(log["data"]) == 1, "the phone got the text exactly once"
    billed = (await client.get("/api/v1/billing/usage", headers=headers)).json()
    assert billed["remaining"] == usage_before["remaining"]


def _unreachable() -> str:
    """A loopback port nothing listens on: every connection is refused."""
    return f"http://127.0.0.1:{free_port()}"


async def _when(value: Any, predicate: Any) -> Any:
    got = await value
    return got if predicate(got) else None


async def test_exhausted_reply_is_dead_lettered_and_replayed(
    client: httpx.AsyncClient,
    sending_church: SendingChurch,
    sandbox_http: httpx.AsyncClient,
    worker: WorkerFactory,
    tenant_factory: Any,
) -> None:
    operator = await tenant_factory(is_operator=True)
    headers = sending_church.headers
    member = await add_member(client, sending_church.account)
    started = await client.post(
        "/api/v1/conversations", json={"member_id": member["id"]}, headers=headers
    )
    messages_url = f"/api/v1/conversations/{started.json()['id']}/messages"
    reply = await client.post(messages_url, json={"body": "See you Sunday"}, headers=headers)
    assert reply.status_code == 202, reply.text

    async def reply_status() -> str:
        listed = (await client.get(messages_url, headers=headers)).json()["data"]
        [text] = [m for m in listed if m["direction"] == "outbound"]
        status: str = text["status"]
        return status

    async with worker(telnyx_max_retries=1, telnyx_base_url=_unreachable()):
        await eventually(lambda: _when(reply_status(), lambda s: s == "failed"), within=30)
    listed = await client.get(
        DLQ,
        params={"kind": "sms.reply", "church_id": sending_church.account.church_id},
        headers=operator.headers,
    )
    [entry] = listed.json()["data"]
    await sandbox_http.delete("/sandbox/faults")
    replayed = await client.post(f"{DLQ}/{entry['id']}/replay", headers=operator.headers)
    assert replayed.status_code == 200, replayed.text
    async with worker():
        await eventually(lambda: _when(reply_status(), lambda s: s == "delivered"), within=30)
    log = (await sandbox_http.get("/sandbox/messages", params={"to": member["phone"]})).json()
    assert [t["text"] for t in log["data"]] == ["See you Sunday"]


async def test_dead_lettered_event_is_applied_again_after_replay(
    client: httpx.AsyncClient, app: FastAPI, settings: Settings, tenant_factory: Any
) -> None:
    operator = await tenant_factory(is_operator=True)
    async with app.state.database.unit_of_work() as session:
        event_id = await session.scalar(
            text(
                "INSERT INTO webhook_events (provider, event_id, event_type, payload, "
                "processed_at, attempts, last_error) VALUES ('telnyx', :e, 'message.finalized', "
                "CAST(:p AS jsonb), now(), 5, 'boom') RETURNING id"
            ),
            {"e": str(uuid.uuid4()), "p": json.dumps(_receipt_of_unknown_message())},
        )
        await dead_letters.record(
            session,
            kind="webhook.telnyx",
            church_id=None,
            payload={"webhook_event_id": event_id, "event_type": "message.finalized"},
            error="boom",
            error_code=None,
            attempts=5,
        )
        entry_id = await session.scalar(
            text("SELECT max(id) FROM dead_letters WHERE kind = 'webhook.telnyx'")
        )
    replayed = await client.post(f"{DLQ}/{entry_id}/replay", headers=operator.headers)
    assert replayed.status_code == 200, replayed.text
    async with app.state.database.unit_of_work() as session:
        row = (
            await session.execute(
                text("SELECT processed_at, attempts, last_error FROM webhook_events WHERE id = :i"),
                {"i": event_id},
            )
        ).one()
    assert tuple(row) == (None, 0, None)  # pending again
    cipher = ContactCipher.from_settings(settings)
    key = refs.ref_key(settings.member_hmac_key.get_secret_value())
    while (await apply_pending(app.state.database, cipher, app.state.job_app, key, 100)).events:
        pass
    async with app.state.database.unit_of_work() as session:
        applied = await session.scalar(
            text(
                "SELECT processed_at IS NOT NULL AND attempts = 0 FROM webhook_events WHERE id = :i"
            ),
            {"i": event_id},
        )
    assert applied


def _receipt_of_unknown_message() -> dict[str, Any]:
    payload = {
        "id": str(uuid.uuid4()),
        "to": [{"phone_number": "+14155550123", "status": "delivered"}],
        "parts": 1,
    }
    return {
        "data": {"event_type": "message.finalized", "id": str(uuid.uuid4()), "payload": payload}
    }
