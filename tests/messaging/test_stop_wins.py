"""STOP always wins: an inbound opt-out is suppressed by the statement that stores its
event (durable once the webhook is answered 2xx, before any worker applied it); a START
lifts it only when it is newer; an event that fails to apply is retried over minutes, not
dead-lettered within a second; the endpoint answers a fast 503 when it cannot store."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from structlog.testing import capture_logs

from koinonia.app import create_app
from koinonia.conversations.service import handle_inbound
from koinonia.members.crypto import ContactCipher
from koinonia.messaging import refs
from koinonia.messaging.suppressions import phone_hmac, suppressed, suppression_key
from koinonia.sandbox.signing import load_telnyx_key, telnyx_headers
from koinonia.settings import Settings
from koinonia.telnyx import events as telnyx_events
from koinonia.telnyx.event_writer import EventStoreUnavailableError, EventWriter
from koinonia.telnyx.events import RETRY, apply_pending
from tests.conftest import TELNYX_TEST_SEED
from tests.messaging.conftest import SendingChurch
from tests.support.api import add_member, random_phone
from tests.support.servers import free_port


def _inbound(
    sender: str, to: str, body: str, at: datetime, event_id: str | None = None
) -> tuple[str, bytes]:
    event_id = event_id or str(uuid.uuid4())
    event = {
        "data": {
            "event_type": "message.received",
            "id": event_id,
            "occurred_at": at.isoformat(),
            "record_type": "event",
            "payload": {
                "record_type": "message",
                "direction": "inbound",
                "id": str(uuid.uuid4()),
                "from": {"phone_number": sender},
                "to": [{"phone_number": to, "status": "webhook_delivered"}],
                "text": body,
                "media": [],
            },
        },
        "meta": {"attempt": 1, "delivered_to": "http://test"},
    }
    return event_id, json.dumps(event).encode()


async def _post(client: httpx.AsyncClient, body: bytes) -> httpx.Response:
    headers = telnyx_headers(load_telnyx_key(TELNYX_TEST_SEED), body, int(time.time()))
    return await client.post(
        "/api/v1/webhooks/telnyx",
        content=body,
        headers=headers | {"Content-Type": "application/json"},
    )


async def _suppressed(app: FastAPI, settings: Settings, sender: str, phones: list[str]) -> set[str]:
    async with app.state.database.unit_of_work() as session:
        return await suppressed(session, settings, sender, phones)


async def _apply_all(app: FastAPI, settings: Settings) -> None:
    cipher = ContactCipher.from_settings(settings)
    key = refs.ref_key(settings.member_hmac_key.get_secret_value())
    while (await apply_pending(app.state.database, cipher, app.state.job_app, key, 100)).events:
        pass


async def _event_row(app: FastAPI, event_id: str) -> dict[str, Any]:
    async with app.state.database.unit_of_work() as session:
        row = (
            await session.execute(
                text(
                    "SELECT id, attempts, processed_at, next_attempt_at, last_error, "
                    "next_attempt_at - now() AS wait FROM webhook_events "
                    "WHERE provider = 'telnyx' AND event_id = :e"
                ),
                {"e": event_id},
            )
        ).one()
        return dict(row._mapping)


async def _dead_letters(app: FastAPI, row_id: int) -> int:
    async with app.state.database.unit_of_work() as session:
        count = await session.scalar(
            text(
                "SELECT count(*) FROM dead_letters WHERE kind = 'webhook.telnyx' "
                "AND (payload ->> 'webhook_event_id')::bigint = :id"
            ),
            {"id": row_id},
        )
        return int(count or 0)


def test_phone_hmac_is_keyed_domain_separated_and_church_independent(settings: Settings) -> None:
    key = suppression_key(settings)
    phone = "+14155550123"
    assert phone_hmac(key, phone) == phone_hmac(key, f" {phone} ")
    assert phone_hmac(key, phone) != phone_hmac(b"another key", phone)
    assert phone_hmac(key, phone) != phone_hmac(key, "+14155550124")
    # Not the members' blind index of any church.
    cipher = ContactCipher.from_settings(settings)
    assert phone_hmac(key, phone) != cipher.phone_hash(phone, uuid.uuid4())


async def test_stop_is_suppressed_as_soon_as_it_is_acknowledged(
    client: httpx.AsyncClient,
    app: FastAPI,
    settings: Settings,
    sending_church: SendingChurch,
    sandbox_http: httpx.AsyncClient,
) -> None:
    """Through the sandbox over real HTTP: once the endpoint answered 2xx, the phone is
    suppressed although no worker has applied the event."""
    member = await add_member(client, sending_church.account)
    stranger, chatty = random_phone(), random_phone()
    number = sending_church.number
    texts = [(member["phone"], "  stop "), (stranger, "Opt Out"), (chatty, "stop by tonight?")]
    for sender, body in texts:
        answer = await sandbox_http.post(
            "/sandbox/inbound", json={"from": sender, "to": number, "text": body}
        )
        assert answer.status_code == 202, answer.text
        assert answer.json()["delivered_status"] == 200

    phones = [member["phone"], stranger, chatty]
    assert await _suppressed(app, settings, number, phones) == {member["phone"], stranger}
    # Only for the number texted.
    assert await _suppressed(app, settings, "+12025550000", phones) == set()
    async with app.state.database.unit_of_work() as session:
        rows = (
            await session.execute(
                text(
                    "SELECT s.source, e.processed_at FROM suppressions s "
                    "JOIN webhook_events e ON e.provider = 'telnyx' "
                    "AND e.payload #>> '{data,payload,from,phone_number}' = :phone "
                    "WHERE s.sender_number = :number AND s.phone_hmac = :hmac"
                ),
                {
                    "phone": member["phone"],
                    "number": number,
                    "hmac": phone_hmac(suppression_key(settings), member["phone"]),
                },
            )
        ).all()
    assert [(r.source, r.processed_at) for r in rows] == [("keyword", None)]


async def test_a_later_stop_wins_over_an_earlier_start(
    client: httpx.AsyncClient, app: FastAPI, settings: Settings, sending_church: SendingChurch
) -> None:
    phone, number = random_phone(), sending_church.number
    t0 = datetime.now(UTC)

    stop_id, stop = _inbound(phone, number, "STOP", t0)
    assert (await _post(client, stop)).json() == {"received": True, "duplicate": False}
    assert await _suppressed(app, settings, number, [phone]) == {phone}

    # A START texted before that STOP, applied after it: the STOP stands.
    _, early_start = _inbound(phone, number, "start", t0 - timedelta(minutes=1))
    assert (await _post(client, early_start)).status_code == 200
    await _apply_all(app, settings)
    assert await _suppressed(app, settings, number, [phone]) == {phone}

    # A START texted after it lifts it.
    _, start = _inbound(phone, number, "UNSTOP", t0 + timedelta(minutes=1))
    assert (await _post(client, start)).status_code == 200
    await _apply_all(app, settings)
    assert await _suppressed(app, settings, number, [phone]) == set()

    # A redelivery of the old STOP is a duplicate: it does not suppress again.
    _, again = _inbound(phone, number, "STOP", t0, event_id=stop_id)
    assert (await _post(client, again)).json() == {"received": True, "duplicate": True}
    assert await _suppressed(app, settings, number, [phone]) == set()

    # A new STOP, then a START texted before it but applied after it: suppressed.
    _, stop2 = _inbound(phone, number, "revoke", t0 + timedelta(minutes=3))
    _, late_start = _inbound(phone, number, "YES", t0 + timedelta(minutes=2))
    assert (await _post(client, stop2)).status_code == 200
    assert (await _post(client, late_start)).status_code == 200
    await _apply_all(app, settings)
    assert await _suppressed(app, settings, number, [phone]) == {phone}


@pytest.fixture
def inbound_fault(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Provider message ids whose application fails as a lost connection would."""
    failing: set[str] = set()
    original = handle_inbound

    async def flaky(session: Any, job_app: Any, cipher: Any, inbound: Any) -> str:
        if inbound.provider_id in failing:
            raise OperationalError("SELECT 1", {}, ConnectionError("server closed the connection"))
        return await original(session, job_app, cipher, inbound)

    monkeypatch.setattr(telnyx_events, "handle_inbound", flaky)
    return failing


def _provider_id(body: bytes) -> str:
    return str(json.loads(body)["data"]["payload"]["id"])


async def test_a_failed_inbound_event_is_retried_over_minutes(
    client: httpx.AsyncClient,
    app: FastAPI,
    settings: Settings,
    sending_church: SendingChurch,
    inbound_fault: set[str],
) -> None:
    phone, number = random_phone(), sending_church.number
    event_id, body = _inbound(phone, number, "STOP", datetime.now(UTC))
    inbound_fault.add(_provider_id(body))
    assert (await _post(client, body)).status_code == 200

    await _apply_all(app, settings)
    row = await _event_row(app, event_id)
    assert row["attempts"] == 1 and row["processed_at"] is None
    assert "OperationalError" in row["last_error"]
    assert row["wait"] >= timedelta(seconds=RETRY.base_seconds / 2 - 1)
    # However often the loop runs meanwhile, the event waits for its time.
    for _ in range(20):
        await apply_pending(
            app.state.database,
            ContactCipher.from_settings(settings),
            app.state.job_app,
            refs.ref_key(settings.member_hmac_key.get_secret_value()),
            100,
        )
    row = await _event_row(app, event_id)
    assert row["attempts"] == 1 and row["processed_at"] is None
    assert await _dead_letters(app, row["id"]) == 0
    # The STOP was honoured all along.
    assert await _suppressed(app, settings, number, [phone]) == {phone}

    # Its time comes (as minutes pass) and the fault is gone: it applies.
    inbound_fault.clear()
    async with app.state.database.unit_of_work() as session:
        await session.execute(
            text("UPDATE webhook_events SET next_attempt_at = now() WHERE id = :id"),
            {"id": row["id"]},
        )
    await _apply_all(app, settings)
    row = await _event_row(app, event_id)
    assert row["processed_at"] is not None and row["attempts"] == 1
    assert await _dead_letters(app, row["id"]) == 0


async def test_an_event_failing_every_attempt_is_dead_lettered_with_an_alert(
    client: httpx.AsyncClient,
    app: FastAPI,
    settings: Settings,
    sending_church: SendingChurch,
    inbound_fault: set[str],
) -> None:
    event_id, body = _inbound(random_phone(), sending_church.number, "hi", datetime.now(UTC))
    inbound_fault.add(_provider_id(body))
    assert (await _post(client, body)).status_code == 200
    async with app.state.database.unit_of_work() as session:
        # Every attempt but the last has failed already (minutes apart).
        await session.execute(
            text(
                "UPDATE webhook_events SET attempts = :n, next_attempt_at = now() "
                "WHERE provider = 'telnyx' AND event_id = :e"
            ),
            {"n": RETRY.max_attempts - 1, "e": event_id},
        )
    labels = {"kind": "inbound"}
    before = REGISTRY.get_sample_value("koinonia_webhook_events_dead_lettered_total", labels) or 0
    with capture_logs() as logs:
        await _apply_all(app, settings)
    row = await _event_row(app, event_id)
    assert row["processed_at"] is not None and row["attempts"] == RETRY.max_attempts
    assert await _dead_letters(app, row["id"]) == 1
    after = REGISTRY.get_sample_value("koinonia_webhook_events_dead_lettered_total", labels)
    assert after == before + 1
    alerts = [e for e in logs if e["event"] == "inbound_event_dead_lettered"]
    assert [(e["log_level"], e["webhook_event_id"]) for e in alerts] == [("error", row["id"])]


@pytest.fixture
async def unreachable_app(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The API with its database on a port nobody listens on."""
    broken = settings.model_copy(
        update={"database_url": f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none"}
    )
    application = create_app(broken)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            yield http


async def test_endpoint_answers_503_fast_when_the_database_is_down(
    unreachable_app: httpx.AsyncClient,
) -> None:
    bodies = [_inbound(random_phone(), "+12025550100", "STOP", datetime.now(UTC))[1]]
    bodies += [_inbound(random_phone(), "+12025550100", "hello", datetime.now(UTC))[1]] * 5
    started = time.monotonic()
    answers = await asyncio.gather(*(_post(unreachable_app, body) for body in bodies))
    elapsed = time.monotonic() - started
    assert elapsed < 4.0, elapsed
    for answer in answers:
        assert answer.status_code == 503, answer.text
        assert answer.json()["code"] == "service_unavailable"
        assert int(answer.headers["Retry-After"]) >= 1


async def test_writer_gives_up_in_time_on_a_database_that_never_answers() -> None:
    """A server that accepts connections and says nothing (a hung database): the request
    is answered `EventStoreUnavailableError` within the bound, not after the 14 s hang."""
    held: list[asyncio.StreamWriter] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    writer = EventWriter(
        f"postgresql+psycopg://postgres@127.0.0.1:{port}/none", "telnyx", timeout=1.0
    )
    await writer.open()
    try:
        started = time.monotonic()
        with pytest.raises(EventStoreUnavailableError) as raised:
            await writer.store("e-hung", "message.received", {"data": {}})
        assert raised.value.status == 503 and raised.value.headers["Retry-After"]
        assert time.monotonic() - started < 2.5
    finally:
        for connection in held:
            connection.close()
        server.close()
        await writer.close()
