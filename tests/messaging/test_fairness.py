"""Sharing between churches: a big broadcast does not starve a small one, inbox replies
go ahead of bulk batches; scheduling, cancelling and the plan's allowance."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from koinonia.settings import Settings
from tests.messaging.conftest import (
    SendingChurch,
    WorkerFactory,
    bulk_members,
    eventually,
    give_number,
)
from tests.support.api import add_member, register

pytestmark = pytest.mark.slow
# Every part runs in the test process (API, sandbox, worker), so CI sends fewer texts.
BIG = 1500 if os.environ.get("KOINONIA_SCALE") == "ci" else 4000


async def _completed_at(app: FastAPI, message_id: str) -> Any:
    async with app.state.database.unit_of_work() as session:
        return await session.scalar(
            text("SELECT completed_at FROM messages WHERE id = :id"), {"id": message_id}
        )


async def test_small_church_and_replies_are_not_starved(
    client: httpx.AsyncClient,
    app: FastAPI,
    settings: Settings,
    sending_church: SendingChurch,
    sandbox_http: httpx.AsyncClient,
    worker: WorkerFactory,
) -> None:
    big_group = await bulk_members(app, settings, sending_church.account.church_id, BIG, "347")
    small_account = await register(client)
    small = SendingChurch(
        small_account, await give_number(app, settings, small_account.church_id, 1000)
    )
    small_group = await bulk_members(app, settings, small_account.church_id, 40, "917")
    member = await add_member(client, small_account)
    conversation = await client.post(
        "/api/v1/conversations", json={"member_id": member["id"]}, headers=small.headers
    )
    big = await client.post(
        "/api/v1/messages",
        json={"body": "Big", "group_ids": [big_group]},
        headers=sending_church.headers,
    )
    tiny = await client.post(
        "/api/v1/messages",
        json={"body": "Small", "group_ids": [small_group]},
        headers=small.headers,
    )
    reply = await client.post(
        f"/api/v1/conversations/{conversation.json()['id']}/messages",
        json={"body": "Thanks!"},
        headers=small.headers,
    )
    assert big.status_code == tiny.status_code == reply.status_code == 202
    # One worker slot: the order of jobs alone decides who goes first.
    async with worker(send_time_slice_seconds=0.5) as job:
        del job
        big_id, tiny_id = big.json()["id"], tiny.json()["id"]

        async def both_done() -> Any:
            a = await _completed_at(app, big_id)
            b = await _completed_at(app, tiny_id)
            return (a, b) if a and b else None

        big_done, small_done = await eventually(both_done, within=120, every=0.2)
    assert small_done < big_done, "the 40-member broadcast waited for the big one"
    log = (await sandbox_http.get("/sandbox/messages", params={"to": member["phone"]})).json()
    reply_at = datetime.fromisoformat(log["data"][0]["received_at"])
    assert reply_at < big_done, "the inbox reply waited behind bulk traffic"


async def test_schedule_cancel_and_allowance(
    client: httpx.AsyncClient, app: FastAPI, settings: Settings, sandbox: Any
) -> None:
    account = await register(client)
    church = SendingChurch(account, await give_number(app, settings, account.church_id, 0))
    members = [await add_member(client, account) for _ in range(3)]
    ids = [m["id"] for m in members]
    usage_before = (await client.get("/api/v1/billing/usage", headers=church.headers)).json()
    later = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
    scheduled = await client.post(
        "/api/v1/messages",
        json={"body": "Later", "member_ids": ids, "scheduled_at": later},
        headers=church.headers,
    )
    assert scheduled.status_code == 202, scheduled.text
    assert scheduled.json()["status"] == "scheduled"
    reserved = (await client.get("/api/v1/billing/usage", headers=church.headers)).json()
    assert reserved["remaining"] == usage_before["remaining"] - 3
    cancelled = await client.post(
        f"/api/v1/messages/{scheduled.json()['id']}/cancel", headers=church.headers
    )
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["counts"]["skipped"] == 3
    again = await client.post(
        f"/api/v1/messages/{scheduled.json()['id']}/cancel", headers=church.headers
    )
    assert again.status_code == 409
    refunded = (await client.get("/api/v1/billing/usage", headers=church.headers)).json()
    assert refunded["remaining"] == usage_before["remaining"]
    past = await client.post(
        "/api/v1/messages",
        json={"body": "x", "member_ids": ids, "scheduled_at": "2020-01-01T00:00:00Z"},
        headers=church.headers,
    )
    assert past.status_code == 422
    # More than the allowance: 402 and nothing queued.
    long_body = "a" * 1530  # 10 segments each
    too_much = usage_before["remaining"] // 10 + 1
    group = await client.post("/api/v1/groups", json={"name": "all"}, headers=church.headers)
    extra = [await add_member(client, account) for _ in range(max(0, too_much - 3))]
    await client.post(
        f"/api/v1/groups/{group.json()['id']}/members",
        json={"member_ids": ids + [m["id"] for m in extra]},
        headers=church.headers,
    )
    refused = await client.post(
        "/api/v1/messages",
        json={"body": long_body, "group_ids": [group.json()["id"]]},
        headers=church.headers,
    )
    assert refused.status_code == 402, refused.text
    assert refused.json()["code"] == "quota_exceeded"
    listed = (await client.get("/api/v1/messages", headers=church.headers)).json()["data"]
    assert [m["status"] for m in listed] == ["cancelled"]
    too_long = await client.post(
        "/api/v1/messages",
        json={"body": "a" * 1600 + "€" * 0, "member_ids": ids},
        headers=church.headers,
    )
    assert too_long.status_code == 422
