"""A send that runs out of retries lands in the dead-letter queue; an operator's replay
sends it (once) and bills it again; a second replay is refused."""

from __future__ import annotations

from typing import Any

import httpx

from koinonia.observability import RETRIES
from tests.messaging.conftest import SendingChurch, WorkerFactory, eventually
from tests.support.api import add_member

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
    # Telnyx answers 429 to everything: nothing goes out, retries run out.
    await sandbox_http.post("/sandbox/faults", json={"error_rate": 1.0, "status": 429})
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
    async with worker(telnyx_max_retries=1):
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
    assert entry["attempts"] == 2 and entry["error_code"] == "10011"
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


async def _when(value: Any, predicate: Any) -> Any:
    got = await value
    return got if predicate(got) else None
