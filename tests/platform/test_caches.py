"""The caches of the hot reads (docs/scaling.md, "Caches"), through the HTTP routes against
the real Redis and PostgreSQL: for each cache, the second read is a hit
(`koinonia_cache_requests_total`), and the cached answer changes right after every kind of
write — HTTP writes, and the paths with no request: a signed Telnyx inbound text applied by
the worker's event job, a reply the worker fails to send (opt-out and refund), a Stripe
webhook, a CSV import run by the import job. Two churches never see each other's answers.

"Right after": a write in a request is invalidated before its answer goes out, so the very
next read is a miss with the new data. A job invalidates after its own commit; the test
waits (with a deadline) for the job to have run or for the tag's version to move, then
reads once: a miss, with the new data — never a TTL expiring (TTLs are 30 s and more).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.app import create_app
from koinonia.billing import ledger
from koinonia.cache import TAG_PREFIX, inbox_tag, invalidate_on_commit, usage_tag
from koinonia.jobs import build_job_app, open_resources
from koinonia.members.crypto import ContactCipher
from koinonia.messaging.jobs import send_context
from koinonia.messaging.suppressions import suppression_key
from koinonia.retry import in_transaction
from koinonia.sandbox.signing import load_telnyx_key, telnyx_headers
from koinonia.settings import Settings
from koinonia.telnyx.events import apply_pending
from tests.conftest import TELNYX_TEST_SEED, make_settings
from tests.messaging.conftest import eventually, give_number, running_worker
from tests.support.api import Account, add_member, add_user, random_phone, register
from tests.support.servers import LiveServer

Read = Callable[[], Awaitable[Any]]
RESULTS = ("hit", "miss", "stale", "error")


def _counts(cache: str) -> dict[str, float]:
    return {
        result: REGISTRY.get_sample_value(
            "koinonia_cache_requests_total", {"cache": cache, "result": result}
        )
        or 0.0
        for result in RESULTS
    }


async def _read(cache: str, read: Read) -> tuple[Any, dict[str, float]]:
    """The answer of one read, and how the cache counted it (only what changed)."""
    before = _counts(cache)
    answer = await read()
    after = _counts(cache)
    return answer, {r: after[r] - before[r] for r in RESULTS if after[r] != before[r]}


async def _cached(cache: str, read: Read) -> Any:
    """Read until the answer is cached: the second read is a hit with the same answer."""
    first, _ = await _read(cache, read)
    second, counted = await _read(cache, read)
    assert counted == {"hit": 1}, counted
    assert second == first
    return second


async def _fresh(cache: str, read: Read) -> Any:
    """The read right after a write: the write invalidated the entry (a miss)."""
    answer, counted = await _read(cache, read)
    assert counted == {"miss": 1}, counted
    return answer


async def _tag_version(redis: Redis, tag: str) -> int:
    return int(await redis.get(TAG_PREFIX + tag) or 0)


def _get(client: httpx.AsyncClient, account: Account, path: str, **params: Any) -> Read:
    async def read() -> Any:
        response = await client.get(f"/api/v1{path}", params=params, headers=account.headers)
        assert response.status_code == 200, response.text
        return response.json()

    return read


def _phone_ending(ending: str) -> str:
    """A phone the sandbox plays specially: 0000 opted out (40300 at send)."""
    return f"+1415{200 + uuid.uuid4().int % 800}{ending}"


async def _post_inbound(client: httpx.AsyncClient, sender: str, to: str, body_text: str) -> None:
    """A signed Telnyx `message.received`, as Telnyx delivers it, into the API."""
    body = json.dumps(
        {
            "data": {
                "event_type": "message.received",
                "id": str(uuid.uuid4()),
                "occurred_at": "2026-11-25T12:00:00.000+00:00",
                "record_type": "event",
                "payload": {
                    "id": str(uuid.uuid4()),
                    "from": {"phone_number": sender},
                    "to": [{"phone_number": to}],
                    "text": body_text,
                },
            }
        }
    ).encode()
    headers = telnyx_headers(load_telnyx_key(TELNYX_TEST_SEED), body, int(time.time()))
    stored = await client.post(
        "/api/v1/webhooks/telnyx",
        content=body,
        headers=headers | {"Content-Type": "application/json"},
    )
    assert stored.status_code == 200, stored.text


async def _apply_telnyx_events(settings: Settings) -> None:
    """What the worker's event loop does (telnyx/loops.py), until nothing is pending; with
    the worker's own resources, so its Redis invalidates."""
    async with open_resources(settings, build_job_app(settings)) as job:
        cipher = ContactCipher.from_settings(settings)
        context = send_context(job)
        while (
            await apply_pending(
                job.database,
                cipher,
                job.job_app,
                context.ref_key,
                100,
                suppression_key=suppression_key(settings),
            )
        ).events:
            pass


async def test_the_helper_invalidates_after_commit_only(app: FastAPI, redis: Redis) -> None:
    database, tag = app.state.database, f"test:{uuid.uuid4().hex}"
    async with database.unit_of_work() as session:
        await session.execute(text("SELECT 1"))
        invalidate_on_commit(session, tag)
        assert await _tag_version(redis, tag) == 0  # not before the commit
    assert await _tag_version(redis, tag) == 1
    with pytest.raises(RuntimeError):
        async with database.unit_of_work() as session:
            invalidate_on_commit(session, tag)
            raise RuntimeError("rolled back")
    assert await _tag_version(redis, tag) == 1  # a rollback invalidates nothing
    async with database.unit_of_work() as session:  # a SAVEPOINT rolled back keeps the tag
        invalidate_on_commit(session, tag)
        with pytest.raises(RuntimeError):
            async with session.begin_nested():
                raise RuntimeError("savepoint")
    assert await _tag_version(redis, tag) == 2

    async def work(session: AsyncSession) -> None:
        await session.execute(text("SELECT 1"))
        invalidate_on_commit(session, tag)

    await in_transaction(database, "READ COMMITTED", work, operation="test_cache_helper")
    assert await _tag_version(redis, tag) == 3


async def test_inbox_cache(client: httpx.AsyncClient, app: FastAPI, settings: Settings) -> None:
    owner = await register(client)
    number = await give_number(app, settings, owner.church_id, 100)
    member = await add_member(client, owner, first_name="Grace")
    started = await client.post(
        "/api/v1/conversations", json={"member_id": member["id"]}, headers=owner.headers
    )
    assert started.status_code == 201, started.text
    conversation_id = started.json()["id"]
    inbox = _get(client, owner, "/conversations")
    unread = _get(client, owner, "/conversations", unread="true")
    page = await _cached("inbox", inbox)
    assert [c["id"] for c in page["data"]] == [conversation_id]
    assert page["data"][0]["last_message"] is None
    assert (await _cached("inbox", unread))["data"] == []
    # No role sees the inbox differently: staff get the owner's cached answer.
    staff = await add_user(client, owner, "staff")
    answer, counted = await _read("inbox", _get(client, staff, "/conversations"))
    assert counted == {"hit": 1} and answer == page

    # Job path: an inbound text through a signed webhook, applied by the event job.
    await _post_inbound(client, member["phone"], number, "Is choir on tonight?")
    await _apply_telnyx_events(settings)
    row = (await _fresh("inbox", inbox))["data"][0]
    assert row["unread_count"] == 1
    assert row["last_message"] == {"body": "Is choir on tonight?", "direction": "inbound"}
    assert [c["id"] for c in (await _fresh("inbox", unread))["data"]] == [conversation_id]
    await _cached("inbox", inbox)
    await _cached("inbox", unread)

    # Marking read.
    read = await client.patch(
        f"/api/v1/conversations/{conversation_id}", json={"read": True}, headers=owner.headers
    )
    assert read.status_code == 200, read.text
    assert (await _fresh("inbox", inbox))["data"][0]["unread_count"] == 0
    assert (await _fresh("inbox", unread))["data"] == []

    # A status change, seen through a status filter too.
    open_only = _get(client, owner, "/conversations", status="open")
    assert len((await _cached("inbox", open_only))["data"]) == 1
    closed = await client.patch(
        f"/api/v1/conversations/{conversation_id}",
        json={"status": "closed"},
        headers=owner.headers,
    )
    assert closed.status_code == 200, closed.text
    assert (await _fresh("inbox", inbox))["data"][0]["status"] == "closed"
    assert (await _fresh("inbox", open_only))["data"] == []

    # A reply (a write in the request; its send happens later in a job).
    await _cached("inbox", inbox)
    reply = await client.post(
        f"/api/v1/conversations/{conversation_id}/messages",
        json={"body": "Yes, 7pm!"},
        headers=owner.headers,
    )
    assert reply.status_code == 202, reply.text
    row = (await _fresh("inbox", inbox))["data"][0]
    assert row["last_message"] == {"body": "Yes, 7pm!", "direction": "outbound"}

    # A member update: the inbox shows the member's name.
    await _cached("inbox", inbox)
    renamed = await client.patch(
        f"/api/v1/members/{member['id']}", json={"first_name": "Gracie"}, headers=owner.headers
    )
    assert renamed.status_code == 200, renamed.text
    assert (await _fresh("inbox", inbox))["data"][0]["member"]["first_name"] == "Gracie"

    # The limit is part of the key; a page after a cursor is read from the database.
    other = await add_member(client, owner)
    await client.post(
        "/api/v1/conversations", json={"member_id": other["id"]}, headers=owner.headers
    )
    first = await _cached("inbox", _get(client, owner, "/conversations", limit=1))
    assert [c["id"] for c in first["data"]] == [
        c["id"] for c in (await _cached("inbox", inbox))["data"][:1]
    ]
    assert first["next_cursor"] is not None
    after, counted = await _read(
        "inbox", _get(client, owner, "/conversations", limit=1, cursor=first["next_cursor"])
    )
    assert counted == {}
    assert [c["id"] for c in after["data"]] == [conversation_id]


async def test_usage_cache(
    client: httpx.AsyncClient,
    app: FastAPI,
    settings: Settings,
    redis: Redis,
    sandbox: LiveServer,
) -> None:
    owner = await register(client)
    church_id = uuid.UUID(owner.church_id)
    await give_number(app, settings, owner.church_id, 100)
    usage = _get(client, owner, "/billing/usage")
    first = await _cached("usage", usage)
    assert (first["used"], first["included"]) == (0, settings.trial_segments + 100)

    # A write outside any request, committed by Database.unit_of_work (a grant).
    async with app.state.database.unit_of_work() as session:
        subscription = await ledger.ensure_subscription(session, settings, church_id)
        await ledger.grant(session, church_id, subscription.period_start, 5, "test-cache-grant")
    assert (await _fresh("usage", usage))["included"] == settings.trial_segments + 105
    await _cached("usage", usage)

    # HTTP writes: replies debit their segments.
    reached = await add_member(client, owner)
    blocked = await add_member(client, owner, phone=_phone_ending("0000"))
    for member in (reached, blocked):
        sent = await client.post(
            "/api/v1/conversations",
            json={"member_id": member["id"], "body": "See you Sunday"},
            headers=owner.headers,
        )
        assert sent.status_code == 201, sent.text
        assert (await _fresh("usage", usage))["used"] == [reached, blocked].index(member) + 1
    assert (await _cached("usage", usage))["used"] == 2
    inbox = _get(client, owner, "/conversations")
    assert not any(c["member"]["opted_out"] for c in (await _cached("inbox", inbox))["data"])

    # Job path: the worker sends; Telnyx refuses the opted-out phone (40300), so the
    # reply's segment is refunded and the member opted out, in the job's transaction.
    versions = (
        await _tag_version(redis, usage_tag(church_id)),
        await _tag_version(redis, inbox_tag(church_id)),
    )
    async with running_worker(settings):

        async def invalidated() -> bool:
            now = (
                await _tag_version(redis, usage_tag(church_id)),
                await _tag_version(redis, inbox_tag(church_id)),
            )
            return all(later > earlier for later, earlier in zip(now, versions, strict=True))

        await eventually(invalidated, within=60)
        assert (await _fresh("usage", usage))["used"] == 1
        rows = (await _fresh("inbox", inbox))["data"]
        assert {c["member"]["id"]: c["member"]["opted_out"] for c in rows} == {
            reached["id"]: False,
            blocked["id"]: True,
        }

    # A Stripe webhook: the paid plan's period and allowance replace the trial's.
    await _cached("usage", usage)
    now = int(time.time())
    subscription_object = {
        "id": f"sub_{uuid.uuid4().hex[:10]}",
        "object": "subscription",
        "status": "active",
        "customer": f"cus_{uuid.uuid4().hex[:8]}",
        "metadata": {"church_id": owner.church_id},
        "cancel_at_period_end": False,
        "items": {
            "data": [
                {
                    "price": {"id": "price_starter"},
                    "current_period_start": now,
                    "current_period_end": now + 30 * 86400,
                }
            ]
        },
    }
    async with httpx.AsyncClient(base_url=sandbox.url, timeout=30) as stripe:
        emitted = await stripe.post(
            "/sandbox/stripe/events",
            json={"type": "customer.subscription.updated", "data": {"object": subscription_object}},
        )
    assert emitted.status_code == 202 and emitted.json()["delivered_status"] == 200
    paid = await _fresh("usage", usage)
    assert (paid["used"], paid["included"], paid["remaining"]) == (0, 2000, 2000)


async def test_group_counts_cache(settings: Settings) -> None:
    # Imports of any size run as a job here (the import job path).
    job_settings = make_settings(database_url=settings.database_url, import_inline_max_bytes=10)
    app = create_app(job_settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        owner = await register(client)
        created = await client.post("/api/v1/groups", json={"name": "Choir"}, headers=owner.headers)
        group_id = created.json()["id"]
        groups = _get(client, owner, "/groups")

        async def count() -> int:
            page = await groups()
            return int({g["id"]: g["member_count"] for g in page["data"]}[group_id])

        async def fresh_count() -> int:
            page = await _fresh("group_counts", groups)
            return int({g["id"]: g["member_count"] for g in page["data"]}[group_id])

        await _cached("group_counts", groups)
        first = await add_member(client, owner, group_ids=[group_id])  # created into the group
        assert await fresh_count() == 1
        second = await add_member(client, owner)
        await _cached("group_counts", groups)
        added = await client.post(
            f"/api/v1/groups/{group_id}/members",
            json={"member_ids": [second["id"]]},
            headers=owner.headers,
        )
        assert added.status_code == 200, added.text
        assert await fresh_count() == 2
        await _cached("group_counts", groups)
        removed = await client.request(
            "DELETE",
            f"/api/v1/groups/{group_id}/members",
            json={"member_ids": [first["id"]]},
            headers=owner.headers,
        )
        assert removed.status_code == 200, removed.text
        assert await fresh_count() == 1
        await _cached("group_counts", groups)
        deleted = await client.delete(f"/api/v1/members/{second['id']}", headers=owner.headers)
        assert deleted.status_code == 204
        assert await fresh_count() == 0

        # The import job: members created into the group, and a name the inbox shows.
        third = await add_member(client, owner, first_name="Old", group_ids=[group_id])
        await client.post(
            "/api/v1/conversations", json={"member_id": third["id"]}, headers=owner.headers
        )
        inbox = _get(client, owner, "/conversations")
        await _cached("group_counts", groups)
        await _cached("inbox", inbox)
        csv = f"first_name,phone\nNew,{third['phone']}\nA,{random_phone()}\nB,{random_phone()}\n"
        accepted = await client.post(
            "/api/v1/members/import",
            files={"file": ("people.csv", csv.encode(), "text/csv")},
            data={"group_id": group_id},
            headers=owner.headers,
        )
        assert accepted.status_code == 202, accepted.text
        job_app = build_job_app(job_settings)
        async with job_app.open_async(), open_resources(job_settings, job_app):
            await job_app.run_worker_async(queues=["imports"], wait=False)  # runs, then returns
        done = await _get(client, owner, f"/members/imports/{accepted.json()['id']}")()
        assert (done["status"], done["created"], done["updated"]) == ("completed", 2, 1)
        assert await fresh_count() == 3
        assert (await _fresh("inbox", inbox))["data"][0]["member"]["first_name"] == "New"

        # Erasure (owner): out of the group, and out of the inbox's answer.
        await _cached("group_counts", groups)
        erased = await client.post(f"/api/v1/members/{third['id']}/erase", headers=owner.headers)
        assert erased.status_code == 200, erased.text
        assert await fresh_count() == 2
        assert (await _fresh("inbox", inbox))["data"][0]["member"]["first_name"] == ""
        assert await count() == 2


async def test_two_churches_never_share_cached_answers(
    client: httpx.AsyncClient, app: FastAPI, settings: Settings
) -> None:
    a, b = await register(client), await register(client)
    seen: dict[str, dict[str, Any]] = {}
    for account, size in ((a, 2), (b, 1)):
        group = (
            await client.post("/api/v1/groups", json={"name": "Youth"}, headers=account.headers)
        ).json()
        members = [await add_member(client, account, group_ids=[group["id"]]) for _ in range(size)]
        for member in members:
            await client.post(
                "/api/v1/conversations", json={"member_id": member["id"]}, headers=account.headers
            )
        seen[account.church_id] = {"group": group["id"], "members": {m["id"] for m in members}}
    async with app.state.database.unit_of_work() as session:  # A's allowance differs
        church = uuid.UUID(a.church_id)
        subscription = await ledger.ensure_subscription(session, settings, church)
        await ledger.grant(session, church, subscription.period_start, 7, "test-cache-a")

    async def answers(account: Account) -> tuple[Any, Any, Any]:
        return (
            await _cached("group_counts", _get(client, account, "/groups")),
            await _cached("inbox", _get(client, account, "/conversations")),
            await _cached("usage", _get(client, account, "/billing/usage")),
        )

    for _ in range(2):  # the second round is all hits; each church still sees its own
        trial = settings.trial_segments
        for account, size, included in ((a, 2, trial + 7), (b, 1, trial)):
            groups, inbox, usage = await answers(account)
            mine = seen[account.church_id]
            assert {g["id"]: g["member_count"] for g in groups["data"]} == {mine["group"]: size}
            assert {c["member"]["id"] for c in inbox["data"]} == mine["members"]
            assert usage["included"] == included

    # A write in one church invalidates that church's answers only.
    extra = await add_member(client, a)
    added = await client.post(
        f"/api/v1/groups/{seen[a.church_id]['group']}/members",
        json={"member_ids": [extra["id"]]},
        headers=a.headers,
    )
    assert added.status_code == 200, added.text
    fresh = await _fresh("group_counts", _get(client, a, "/groups"))
    assert fresh["data"][0]["member_count"] == 3
    untouched, counted = await _read("group_counts", _get(client, b, "/groups"))
    assert counted == {"hit": 1} and untouched["data"][0]["member_count"] == 1
