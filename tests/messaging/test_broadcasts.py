"""Broadcasts end to end: API → fan-out → worker → sandbox (Telnyx) → signed receipts →
webhook → applied in batches → counters."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from tests.messaging.conftest import SendingChurch, WorkerFactory, eventually
from tests.support.api import add_member


async def _group_with(
    client: httpx.AsyncClient, church: SendingChurch, n: int
) -> tuple[str, list[dict[str, Any]]]:
    group = await client.post(
        "/api/v1/groups", json={"name": f"g-{uuid.uuid4().hex[:6]}"}, headers=church.headers
    )
    assert group.status_code == 201, group.text
    members = [await add_member(client, church.account) for _ in range(n)]
    added = await client.post(
        f"/api/v1/groups/{group.json()['id']}/members",
        json={"member_ids": [m["id"] for m in members]},
        headers=church.headers,
    )
    assert added.status_code in (200, 204), added.text
    return group.json()["id"], members


async def test_broadcast_is_sent_delivered_and_counted(
    client: httpx.AsyncClient,
    sending_church: SendingChurch,
    sandbox_http: httpx.AsyncClient,
    worker: WorkerFactory,
) -> None:
    group_id, members = await _group_with(client, sending_church, 5)
    opted = members[0]
    patched = await client.patch(
        f"/api/v1/members/{opted['id']}", json={"opted_out": True}, headers=sending_church.headers
    )
    assert patched.status_code == 200, patched.text
    body = {
        "body": "Hi {{first_name}}, choir at 7pm!",
        "group_ids": [group_id],
        "member_ids": [members[1]["id"]],
    }
    preview = await client.post(
        "/api/v1/messages/preview", json=body, headers=sending_church.headers
    )
    assert preview.status_code == 200, preview.text
    assert preview.json()["recipients"] == 4 and preview.json()["skipped"] == 1
    assert preview.json()["encoding"] == "GSM-7" and preview.json()["segments"] == 1

    key = {"Idempotency-Key": str(uuid.uuid4())}
    sent = await client.post("/api/v1/messages", json=body, headers=sending_church.headers | key)
    assert sent.status_code == 202, sent.text
    message = sent.json()
    assert message["recipients_total"] == 5
    assert message["counts"] == {"queued": 4, "sent": 0, "delivered": 0, "failed": 0, "skipped": 1}
    again = await client.post("/api/v1/messages", json=body, headers=sending_church.headers | key)
    assert again.status_code == 202 and again.json() == message
    assert again.headers["Idempotent-Replayed"] == "true"
    other = await client.post(
        "/api/v1/messages", json=body | {"body": "changed"}, headers=sending_church.headers | key
    )
    assert other.status_code == 409 and other.json()["code"] == "idempotency_key_reused"

    async with worker():

        async def done() -> Any:
            got = (
                await client.get(
                    f"/api/v1/messages/{message['id']}", headers=sending_church.headers
                )
            ).json()
            return got if got["counts"]["delivered"] == 4 else None

        final = await eventually(done)
    assert final["status"] == "completed"
    assert final["counts"] == {"queued": 0, "sent": 0, "delivered": 4, "failed": 0, "skipped": 1}
    for member in members:
        log = (await sandbox_http.get("/sandbox/messages", params={"to": member["phone"]})).json()
        texts = log["data"] if isinstance(log, dict) else log
        expected = 0 if member is opted else 1
        assert len(texts) == expected, (member["phone"], texts)
        if expected:
            assert texts[0]["text"] == f"Hi {member['first_name']}, choir at 7pm!"
    recipients = await client.get(
        f"/api/v1/messages/{message['id']}/recipients",
        params={"status": "skipped"},
        headers=sending_church.headers,
    )
    assert [r["skip_reason"] for r in recipients.json()["data"]] == ["opted_out"]


async def test_other_church_sees_404(
    client: httpx.AsyncClient, sending_church: SendingChurch, other_church: Any
) -> None:
    group_id, _ = await _group_with(client, sending_church, 1)
    sent = await client.post(
        "/api/v1/messages",
        json={"body": "x", "group_ids": [group_id]},
        headers=sending_church.headers,
    )
    assert sent.status_code == 202, sent.text
    mid = sent.json()["id"]
    for path in (f"/api/v1/messages/{mid}", f"/api/v1/messages/{mid}/recipients"):
        assert (await client.get(path, headers=other_church.headers)).status_code == 404
    assert (
        await client.post(f"/api/v1/messages/{mid}/cancel", headers=other_church.headers)
    ).status_code == 404
    foreign = await client.post(
        "/api/v1/messages",
        json={"body": "x", "group_ids": [group_id]},
        headers=other_church.headers,
    )
    assert foreign.status_code in (409, 422)


async def test_carrier_refusals_are_skipped_with_their_reason_and_not_billed(
    client: httpx.AsyncClient,
    sending_church: SendingChurch,
    sandbox_http: httpx.AsyncClient,
    worker: WorkerFactory,
) -> None:
    headers = sending_church.headers
    exchange = 200 + uuid.uuid4().int % 300
    # The sandbox refuses numbers ending 0000 (40300: texted STOP at the carrier),
    # 0001 (40001: landline) and 0002 (40310: cannot receive SMS), as Telnyx does.
    phones = {end: f"+1415{exchange}{end}" for end in ("0000", "0001", "0002")}
    members = {
        end: await add_member(client, sending_church.account, phone=phone)
        for end, phone in phones.items()
    }
    fine = await add_member(client, sending_church.account)
    usage_before = (await client.get("/api/v1/billing/usage", headers=headers)).json()
    ids = [m["id"] for m in members.values()] + [fine["id"]]
    sent = await client.post(
        "/api/v1/messages", json={"body": "Hello", "member_ids": ids}, headers=headers
    )
    assert sent.status_code == 202, sent.text
    message_id = sent.json()["id"]
    reserved = (await client.get("/api/v1/billing/usage", headers=headers)).json()
    assert reserved["remaining"] == usage_before["remaining"] - 4

    async def finished() -> Any:
        got = (await client.get(f"/api/v1/messages/{message_id}", headers=headers)).json()
        done = got["status"] == "completed" and got["counts"]["delivered"] == 1
        return got if done else None

    async with worker():
        message = await eventually(finished)
    assert message["counts"] == {"queued": 0, "sent": 0, "delivered": 1, "failed": 0, "skipped": 3}
    rows = (await client.get(f"/api/v1/messages/{message_id}/recipients", headers=headers)).json()[
        "data"
    ]
    by_member = {r["member_id"]: r for r in rows}
    expected = {
        "0000": ("opted_out", "40300"),
        "0001": ("landline", "40001"),
        "0002": ("invalid", "40310"),
    }
    for end, (reason, code) in expected.items():
        row = by_member[members[end]["id"]]
        assert (row["status"], row["skip_reason"], row["error_code"]) == ("skipped", reason, code)
        assert row["segments"] == 0
    stopped = (await client.get(f"/api/v1/members/{members['0000']['id']}", headers=headers)).json()
    assert stopped["opted_out"] is True and stopped["opted_out_source"] == "provider"
    for end in ("0001", "0002"):
        other = (await client.get(f"/api/v1/members/{members[end]['id']}", headers=headers)).json()
        assert other["opted_out"] is False
    billed = (await client.get("/api/v1/billing/usage", headers=headers)).json()
    assert billed["remaining"] == usage_before["remaining"] - 1  # only the delivered one
