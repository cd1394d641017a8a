"""Inbound SMS through the sandbox: routing, unknown senders, STOP/START/HELP, the inbox
and replies (which go through the same send path)."""

from __future__ import annotations

from typing import Any

import httpx

from tests.messaging.conftest import SendingChurch, WorkerFactory, eventually
from tests.support.api import add_member, random_phone


async def _texts_to(sandbox_http: httpx.AsyncClient, phone: str) -> list[dict[str, Any]]:
    log = (await sandbox_http.get("/sandbox/messages", params={"to": phone})).json()
    return list(log["data"] if isinstance(log, dict) else log)


async def _inbound(sandbox_http: httpx.AsyncClient, sender: str, to: str, text: str) -> None:
    sent = await sandbox_http.post(
        "/sandbox/inbound", json={"from": sender, "to": to, "text": text}
    )
    assert sent.status_code in (200, 202), sent.text


async def test_inbound_keywords_inbox_and_reply(
    client: httpx.AsyncClient,
    sending_church: SendingChurch,
    sandbox_http: httpx.AsyncClient,
    worker: WorkerFactory,
) -> None:
    headers = sending_church.headers
    member = await add_member(client, sending_church.account, first_name="Grace")
    stranger = random_phone()
    async with worker():
        await _inbound(sandbox_http, member["phone"], sending_church.number, "Is choir on tonight?")
        await _inbound(sandbox_http, stranger, sending_church.number, "who is this?")

        async def inbox() -> Any:
            data = (await client.get("/api/v1/conversations", headers=headers)).json()["data"]
            return data if len(data) == 2 else None

        conversations = await eventually(inbox)
        by_phone = {c["member"]["phone"]: c for c in conversations}
        assert by_phone[member["phone"]]["unread_count"] == 1
        assert by_phone[member["phone"]]["last_message"]["body"] == "Is choir on tonight?"
        assert by_phone[stranger]["member"]["is_unknown"] is True
        unread = await client.get(
            "/api/v1/conversations", params={"unread": "true"}, headers=headers
        )
        assert len(unread.json()["data"]) == 2

        conversation_id = by_phone[member["phone"]]["id"]
        reply = await client.post(
            f"/api/v1/conversations/{conversation_id}/messages",
            json={"body": "Yes, 7pm!"},
            headers=headers,
        )
        assert reply.status_code == 202, reply.text

        async def delivered() -> Any:
            texts = await _texts_to(sandbox_http, member["phone"])
            page = (
                await client.get(
                    f"/api/v1/conversations/{conversation_id}/messages", headers=headers
                )
            ).json()
            statuses = [m["status"] for m in page["data"] if m["direction"] == "outbound"]
            return texts if texts and statuses == ["delivered"] else None

        texts = await eventually(delivered)
        assert [t["text"] for t in texts] == ["Yes, 7pm!"]
        read = await client.patch(
            f"/api/v1/conversations/{conversation_id}", json={"read": True}, headers=headers
        )
        assert read.json()["unread_count"] == 0
        closed = await client.patch(
            f"/api/v1/conversations/{conversation_id}", json={"status": "closed"}, headers=headers
        )
        assert closed.json()["status"] == "closed"
        archived = await client.patch(
            f"/api/v1/conversations/{conversation_id}", json={"status": "archived"}, headers=headers
        )
        assert archived.json()["status"] == "archived"
        bad = await client.patch(
            f"/api/v1/conversations/{conversation_id}", json={"status": "closed"}, headers=headers
        )
        assert bad.status_code == 409

        # STOP (any case, trimmed): opted out, one confirmation; a second STOP sends nothing.
        await _inbound(sandbox_http, member["phone"], sending_church.number, "  stop ")

        async def opted_out() -> Any:
            got = (await client.get(f"/api/v1/members/{member['id']}", headers=headers)).json()
            texts = await _texts_to(sandbox_http, member["phone"])
            return got if got["opted_out"] and len(texts) == 2 else None

        got = await eventually(opted_out)
        assert got["opted_out_source"] == "keyword"
        texts = await _texts_to(sandbox_http, member["phone"])
        assert "unsubscribed" in texts[-1]["text"]
        await _inbound(sandbox_http, member["phone"], sending_church.number, "STOP")
        refused = await client.post(
            f"/api/v1/conversations/{conversation_id}/messages",
            json={"body": "hello?"},
            headers=headers,
        )
        assert refused.status_code == 409 and refused.json()["code"] == "member_opted_out"
        # The inbound STOP reopened the archived conversation.
        reopened = await client.get(f"/api/v1/conversations/{conversation_id}", headers=headers)
        assert reopened.json()["status"] == "open"

        # HELP answers with the church's help text; START opts back in with a confirmation.
        await _inbound(sandbox_http, member["phone"], sending_church.number, "Help")
        await _inbound(sandbox_http, member["phone"], sending_church.number, "START")

        async def back_in() -> Any:
            got = (await client.get(f"/api/v1/members/{member['id']}", headers=headers)).json()
            texts = await _texts_to(sandbox_http, member["phone"])
            return texts if not got["opted_out"] and len(texts) == 4 else None

        texts = await eventually(back_in)
        assert "Reply STOP" in texts[2]["text"] and "resubscribed" in texts[3]["text"]


async def test_conversations_belong_to_their_church(
    client: httpx.AsyncClient, sending_church: SendingChurch, other_church: Any
) -> None:
    member = await add_member(client, sending_church.account)
    started = await client.post(
        "/api/v1/conversations", json={"member_id": member["id"]}, headers=sending_church.headers
    )
    assert started.status_code == 201, started.text
    again = await client.post(
        "/api/v1/conversations", json={"member_id": member["id"]}, headers=sending_church.headers
    )
    assert again.status_code == 200 and again.json()["id"] == started.json()["id"]
    cid = started.json()["id"]
    for method, path, body in (
        ("GET", f"/api/v1/conversations/{cid}", None),
        ("GET", f"/api/v1/conversations/{cid}/messages", None),
        ("POST", f"/api/v1/conversations/{cid}/messages", {"body": "hi"}),
        ("PATCH", f"/api/v1/conversations/{cid}", {"read": True}),
    ):
        answer = await client.request(method, path, json=body, headers=other_church.headers)
        assert answer.status_code == 404, (path, answer.text)
    foreign = await client.post(
        "/api/v1/conversations", json={"member_id": member["id"]}, headers=other_church.headers
    )
    assert foreign.status_code == 404
    assert (await client.get("/api/v1/conversations", headers=other_church.headers)).json()[
        "data"
    ] == []
