"""Ordinary sequences that broke the promise "every accepted text goes out exactly once,
on time, billed right" (issue 10's "Seen" list), one test each, through the public API
with a real worker, PostgreSQL, Redis and the sandbox over HTTP."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from procrastinate.exceptions import ConnectorException
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia import retry
from koinonia.jobs import build_job_app
from koinonia.messaging import refs
from koinonia.messaging.delivery import SendContext
from koinonia.messaging.reconcile import reconcile
from koinonia.messaging.sending import run_batch
from koinonia.settings import Settings
from koinonia.telnyx.client import TelnyxClient, TelnyxError
from tests.messaging.conftest import SendingChurch, WorkerFactory, eventually
from tests.support.api import add_member, add_user

Json = dict[str, Any]


async def _group(
    client: httpx.AsyncClient, church: SendingChurch, n: int
) -> tuple[str, list[Json]]:
    group = await client.post(
        "/api/v1/groups", json={"name": f"g-{uuid.uuid4().hex[:8]}"}, headers=church.headers
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


async def _send(
    client: httpx.AsyncClient, church: SendingChurch, group_id: str, body: str, **extra: Any
) -> Json:
    sent = await client.post(
        "/api/v1/messages",
        json={"body": body, "group_ids": [group_id], **extra},
        headers=church.headers | {"Idempotency-Key": str(uuid.uuid4())},
    )
    assert sent.status_code == 202, sent.text
    result: Json = sent.json()
    return result


async def _message(client: httpx.AsyncClient, church: SendingChurch, message_id: str) -> Json:
    got = await client.get(f"/api/v1/messages/{message_id}", headers=church.headers)
    assert got.status_code == 200, got.text
    result: Json = got.json()
    return result


def _completed(client: httpx.AsyncClient, church: SendingChurch, message_id: str) -> Any:
    async def check() -> Any:
        message = await _message(client, church, message_id)
        return message if message["status"] == "completed" else None

    return check


async def _texts_with(sandbox_http: httpx.AsyncClient, token: str) -> Counter[str]:
    log = (await sandbox_http.get("/sandbox/messages")).json()["data"]
    return Counter(t["to"][0]["phone_number"] for t in log if token in t["text"])


async def _pending_jobs(app: FastAPI, message_id: str) -> list[str]:
    async with app.state.database.unit_of_work() as session:
        rows = await session.scalars(
            text(
                "SELECT task_name FROM procrastinate_jobs WHERE status IN ('todo', 'doing') "
                "AND args->>'message_id' = :id"
            ),
            {"id": message_id},
        )
        return list(rows)


async def assert_ledger_balanced(app: FastAPI, church_id: str) -> None:
    """Debits − credits = billed segments of texts that went out (broadcasts and staff
    replies) + reservations still in flight."""
    async with app.state.database.unit_of_work() as session:
        net = await session.scalar(
            text(
                "SELECT coalesce(-sum(segments), 0) FROM usage_ledger "
                "WHERE church_id = :c AND kind IN ('debit', 'credit')"
            ),
            {"c": uuid.UUID(church_id)},
        )
        broadcasts = await session.scalar(
            text(
                "SELECT coalesce(sum(segments), 0) FROM message_recipients WHERE church_id = :c "
                "AND status IN ('queued', 'sending', 'sent', 'delivered', 'undelivered', "
                "'unconfirmed')"
            ),
            {"c": uuid.UUID(church_id)},
        )
        replies = await session.scalar(
            text(
                "SELECT coalesce(sum(segments), 0) FROM conversation_messages WHERE church_id = :c "
                "AND kind = 'reply' AND status <> 'failed'"
            ),
            {"c": uuid.UUID(church_id)},
        )
    assert int(net or 0) == int(broadcasts or 0) + int(replies or 0)


# --- 1. A scheduled broadcast never blocks the church ---------------------------------


async def test_a_scheduled_broadcast_holds_no_lock_and_cancel_removes_its_jobs(
    client: httpx.AsyncClient,
    app: FastAPI,
    sending_church: SendingChurch,
    sandbox_http: httpx.AsyncClient,
    worker: WorkerFactory,
) -> None:
    group_id, _ = await _group(client, sending_church, 3)
    tomorrow = datetime.now(UTC) + timedelta(days=1)
    scheduled = await _send(
        client, sending_church, group_id, "Tomorrow's text", scheduled_at=tomorrow.isoformat()
    )
    assert scheduled["status"] == "scheduled" and scheduled["starts_at"] is not None
    assert await _pending_jobs(app, scheduled["id"]) == ["messaging:start_broadcast"]
    token = uuid.uuid4().hex[:10]
    now = await _send(client, sending_church, group_id, f"Now {token}")
    async with worker():
        done = await eventually(_completed(client, sending_church, now["id"]), within=20)
    assert done["counts"]["queued"] == 0
    assert sorted((await _texts_with(sandbox_http, token)).values()) == [1, 1, 1]
    cancelled = await client.post(
        f"/api/v1/messages/{scheduled['id']}/cancel", headers=sending_church.headers
    )
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert await _pending_jobs(app, scheduled["id"]) == []
    await assert_ledger_balanced(app, sending_church.account.church_id)


# --- 2. Nothing stranded: transient errors are recognised; a sweeper re-defers -------


def test_transient_errors_are_recognised_however_wrapped() -> None:
    refused = psycopg.OperationalError("connection refused")
    wrapped = ConnectorException("defer failed")
    wrapped.__cause__ = refused
    assert retry.is_transient_db_error(wrapped)
    assert retry.is_transient_db_error(OperationalError("SELECT 1", {}, refused))

    class Shutdown(psycopg.OperationalError):
        sqlstate = "57P01"

    assert retry.is_transient_db_error(OperationalError("SELECT 1", {}, Shutdown()))
    unique = psycopg.errors.UniqueViolation("duplicate")
    assert not retry.is_transient_db_error(IntegrityError("INSERT", {}, unique))
    assert not retry.is_transient_db_error(ValueError("no"))


async def test_a_broadcast_whose_jobs_failed_for_good_is_swept_and_finished(
    client: httpx.AsyncClient,
    app: FastAPI,
    sending_church: SendingChurch,
    sandbox_http: httpx.AsyncClient,
    worker: WorkerFactory,
) -> None:
    group_id, _ = await _group(client, sending_church, 3)
    token = uuid.uuid4().hex[:10]
    message = await _send(client, sending_church, group_id, f"Stranded {token}")
    async with app.state.database.unit_of_work() as session:
        # As a job that raised past its retries leaves it: failed, nothing else queued.
        await session.execute(
            text(
                "UPDATE procrastinate_jobs SET status = 'failed' "
                "WHERE args->>'message_id' = :id AND status = 'todo'"
            ),
            {"id": message["id"]},
        )
        await session.execute(
            text("UPDATE messages SET updated_at = now() - interval '1 minute' WHERE id = :id"),
            {"id": uuid.UUID(message["id"])},
        )
    # The reconcile loop (and its sweeper) runs every half second; the lease stays long
    # enough that no send in flight is taken for abandoned.
    async with worker(send_reconcile_after_seconds=1.0):
        await eventually(_completed(client, sending_church, message["id"]), within=30)
    recipients = await client.get(
        f"/api/v1/messages/{message['id']}/recipients", headers=sending_church.headers
    )
    rows = [(r["status"], r["skip_reason"], r["error_code"]) for r in recipients.json()["data"]]
    assert sorted((await _texts_with(sandbox_http, token)).values()) == [1, 1, 1], rows


# --- 3. An account-level refusal pauses; it fails, refunds and dead-letters nobody ---


async def test_an_account_refusal_pauses_sending_until_cleared(
    client: httpx.AsyncClient,
    app: FastAPI,
    redis: Redis,
    sending_church: SendingChurch,
    sandbox_http: httpx.AsyncClient,
    worker: WorkerFactory,
    tenant_factory: Any,
) -> None:
    operator = await tenant_factory(is_operator=True)
    await redis.delete("cb:telnyx", "cb:telnyx:failures", "cb:telnyx:probe")
    group_id, _ = await _group(client, sending_church, 4)
    token = uuid.uuid4().hex[:10]
    await sandbox_http.post("/sandbox/faults", json={"error_rate": 1.0, "status": 401})
    message = await _send(client, sending_church, group_id, f"Paused {token}")
    try:
        async with worker():

            async def paused() -> Any:
                got = await _message(client, sending_church, message["id"])
                return got if got["paused_reason"] else None

            seen = await eventually(paused, within=20)
            assert "10009" in seen["paused_reason"]
            assert seen["counts"]["failed"] == 0 and seen["counts"]["queued"] == 4
            pauses = await client.get("/api/v1/admin/sending-pauses", headers=operator.headers)
            assert [(p["scope"], p["key"]) for p in pauses.json()["data"]] == [
                ("account", "telnyx")
            ]
            health = (await client.get("/api/v1/health")).json()
            assert health["checks"]["sending"]["status"] == "degraded"
            metrics = (await client.get("/metrics")).text
            assert 'koinonia_sending_paused{scope="account"} 1.0' in metrics
            async with app.state.database.unit_of_work() as session:
                letters = await session.scalar(
                    text("SELECT count(*) FROM dead_letters WHERE church_id = :c"),
                    {"c": uuid.UUID(sending_church.account.church_id)},
                )
            assert letters == 0
            await sandbox_http.delete("/sandbox/faults")
            cleared = await client.delete(
                "/api/v1/admin/sending-pauses/account/telnyx", headers=operator.headers
            )
            assert cleared.status_code == 204, cleared.text
            done = await eventually(_completed(client, sending_church, message["id"]), within=30)
    finally:
        async with app.state.database.unit_of_work() as session:
            await session.execute(text("DELETE FROM sender_pauses"))
    assert done["counts"]["failed"] == 0 and done["paused_reason"] is None
    assert sorted((await _texts_with(sandbox_http, token)).values()) == [1, 1, 1, 1]
    await assert_ledger_balanced(app, sending_church.account.church_id)


# --- 4. Cancel is final, even against a batch that read the message just before -------


async def test_a_cancel_committed_while_a_batch_starts_stays_final(
    client: httpx.AsyncClient,
    app: FastAPI,
    settings: Settings,
    redis: Redis,
    sending_church: SendingChurch,
    sandbox_http: httpx.AsyncClient,
) -> None:
    group_id, _ = await _group(client, sending_church, 2)
    token = uuid.uuid4().hex[:10]
    message = await _send(client, sending_church, group_id, f"Cancel race {token}")
    message_id = uuid.UUID(message["id"])
    admin_url = settings.database_url.replace("postgresql+psycopg://", "postgresql://")
    telnyx = TelnyxClient(settings)
    job_app = build_job_app(settings)
    async with (
        await psycopg.AsyncConnection.connect(admin_url) as holder,
        job_app.open_async(),
    ):
        async with holder.transaction():
            await holder.execute("SELECT 1 FROM messages WHERE id = %s FOR UPDATE", (message_id,))
            created_at = datetime.fromisoformat(message["created_at"].replace("Z", "+00:00"))
            batch = asyncio.create_task(
                run_batch(
                    SendContext.build(settings, redis, telnyx),
                    app.state.database,
                    job_app,
                    message_id,
                    created_at,
                    0,
                )
            )

            async def batch_waits_on_the_row() -> Any:
                # pg_stat_activity is snapshotted once per transaction: ask outside it.
                async with await psycopg.AsyncConnection.connect(
                    admin_url, autocommit=True
                ) as watcher:
                    found = await watcher.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND query LIKE 'UPDATE messages SET status%%'"
                    )
                    row = await found.fetchone()
                return row is not None and row[0] > 0

            await eventually(batch_waits_on_the_row, within=10, every=0.02)
            await holder.execute(
                "UPDATE message_recipients SET status = 'skipped', skip_reason = 'cancelled' "
                "WHERE message_id = %s",
                (message_id,),
            )
            await holder.execute(
                "UPDATE messages SET status = 'cancelled', cancelled_at = now() WHERE id = %s",
                (message_id,),
            )
        await batch
    await telnyx.aclose()
    assert (await _message(client, sending_church, message["id"]))["status"] == "cancelled"
    assert await _texts_with(sandbox_http, token) == Counter()


# --- 5. A COMMIT whose outcome is unknown is never re-run blindly --------------------


class _LostAfterCommit:
    """Makes the next COMMIT land (or not) and then report a lost connection."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, lands: bool) -> None:
        self.calls = 0
        original = AsyncSession.commit

        async def commit(session: AsyncSession) -> None:
            self.calls += 1
            if self.calls == 1:
                if lands:
                    await original(session)
                lost = psycopg.OperationalError("server closed the connection unexpectedly")
                raise OperationalError("COMMIT", {}, lost, connection_invalidated=True)
            await original(session)

        monkeypatch.setattr(AsyncSession, "commit", commit)


async def _scratch_table(app: FastAPI) -> str:
    name = f"t_{uuid.uuid4().hex[:10]}"
    async with app.state.database.unit_of_work() as session:
        await session.execute(text(f"CREATE TABLE {name} (n int)"))
    return name


@pytest.mark.parametrize("lands", [True, False])
async def test_a_lost_commit_is_settled_by_its_transaction_id(
    app: FastAPI, monkeypatch: pytest.MonkeyPatch, lands: bool
) -> None:
    table = await _scratch_table(app)
    runs = 0

    async def work(session: AsyncSession) -> str:
        nonlocal runs
        runs += 1
        await session.execute(text(f"INSERT INTO {table} VALUES (1)"))  # noqa: S608
        return "done"

    _LostAfterCommit(monkeypatch, lands=lands)
    outcome = await retry.in_transaction(app.state.database, "READ COMMITTED", work, operation="t")
    monkeypatch.undo()
    assert outcome.value == "done"
    assert runs == (1 if lands else 2)  # landed: never re-run; aborted: re-run once
    async with app.state.database.unit_of_work() as session:
        assert await session.scalar(text(f"SELECT count(*) FROM {table}")) == 1  # noqa: S608


async def test_an_unknowable_commit_answers_503_commit_unknown(
    client: httpx.AsyncClient,
    sending_church: SendingChurch,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    group_id, _ = await _group(client, sending_church, 1)

    async def unknowable(*_: Any, **__: Any) -> None:
        return None

    _LostAfterCommit(monkeypatch, lands=True)
    monkeypatch.setattr(retry, "commit_status", unknowable)
    key = {"Idempotency-Key": str(uuid.uuid4())}
    body = {"body": "Commit unknown", "group_ids": [group_id]}
    first = await client.post("/api/v1/messages", json=body, headers=sending_church.headers | key)
    monkeypatch.undo()
    assert first.status_code == 503, first.text
    assert first.json()["code"] == "commit_unknown"
    # The client retries under its key and learns the first attempt did land.
    again = await client.post("/api/v1/messages", json=body, headers=sending_church.headers | key)
    assert again.status_code == 202 and again.headers.get("Idempotent-Replayed") == "true"
    listed = await client.get("/api/v1/messages", headers=sending_church.headers)
    assert [m["body"] for m in listed.json()["data"]].count("Commit unknown") == 1


class _LookupFailsFor(TelnyxClient):
    def __init__(self, settings: Settings, failing_id: str) -> None:
        super().__init__(settings)
        self.failing_id = failing_id

    async def get_message(self, message_id: str) -> dict[str, Any]:
        if message_id == self.failing_id:
            raise TelnyxError("get_message: ConnectError")
        return await super().get_message(message_id)


# --- 6 and 12. In doubt: receipts (applied or not) and lookups before any resend -----


async def test_in_doubt_rows_are_settled_by_receipts_and_lookups_never_blindly_resent(
    client: httpx.AsyncClient,
    app: FastAPI,
    settings: Settings,
    redis: Redis,
    sending_church: SendingChurch,
) -> None:
    group_id, _ = await _group(client, sending_church, 4)
    message = await _send(client, sending_church, group_id, "In doubt")
    message_id = uuid.UUID(message["id"])
    async with app.state.database.unit_of_work() as session:
        rows = list(
            await session.execute(
                text(
                    "SELECT id, created_at FROM message_recipients WHERE message_id = :m "
                    "ORDER BY id"
                ),
                {"m": message_id},
            )
        )
        claimed = "now() - interval '1 hour'"
        # a: Telnyx gave an id it no longer knows (404) → unconfirmed, never resent.
        # b: no id, but a stored receipt (not applied yet) names it → waits for it.
        # c: no id, no receipt → queued again.
        # d: an id, but the lookup fails → stays in doubt.
        for (row_id, _), provider_id in zip(
            rows, ["gone-id", None, None, "lookup-fails"], strict=True
        ):
            await session.execute(
                text(
                    f"UPDATE message_recipients SET status = 'sending', claimed_at = {claimed}, "  # noqa: S608
                    "in_doubt_since = now() - interval '1 hour', provider_message_id = :p, "
                    "attempts = 1 WHERE id = :id"
                ),
                {"p": provider_id, "id": row_id},
            )
        ref_key = refs.ref_key(settings.member_hmac_key.get_secret_value())
        pending_ref = refs.encode(ref_key, refs.RowRef("r", int(rows[1][0]), rows[1][1]))
        event_id = str(uuid.uuid4())
        await session.execute(
            text(
                "INSERT INTO webhook_events (provider, event_id, event_type, payload) "
                "VALUES ('telnyx', :e, 'message.sent', CAST(:p AS jsonb))"
            ),
            {"e": event_id, "p": f'{{"koinonia_ref": "{pending_ref}"}}'},
        )
    fast = settings.model_copy(update={"send_reconcile_after_seconds": 1.0})
    job_app = build_job_app(fast)
    failing = _LookupFailsFor(fast, "lookup-fails")
    try:
        async with job_app.open_async():
            context = SendContext.build(fast, redis, failing)
            outcome = await reconcile(context, app.state.database, job_app)
    finally:
        await failing.aclose()
        async with app.state.database.unit_of_work() as session:
            await session.execute(
                text("DELETE FROM webhook_events WHERE event_id = :e"), {"e": event_id}
            )
    async with app.state.database.unit_of_work() as session:
        states = [
            str(s)
            for (s,) in await session.execute(
                text("SELECT status FROM message_recipients WHERE message_id = :m ORDER BY id"),
                {"m": message_id},
            )
        ]
    assert states == ["unconfirmed", "sending", "queued", "sending"]
    assert outcome.unconfirmed == 1 and outcome.requeued == 1 and outcome.kept_in_doubt == 2


# --- 8. Blank texts -------------------------------------------------------------------


async def test_blank_texts_are_refused_and_blank_renderings_skipped_unbilled(
    client: httpx.AsyncClient,
    app: FastAPI,
    sending_church: SendingChurch,
    sandbox_http: httpx.AsyncClient,
    worker: WorkerFactory,
) -> None:
    group_id, members = await _group(client, sending_church, 2)
    blank = await client.post(
        "/api/v1/messages",
        json={"body": "  \n\t ", "group_ids": [group_id]},
        headers=sending_church.headers,
    )
    assert blank.status_code == 422 and blank.json()["errors"][0]["field"] == "body"
    async with app.state.database.unit_of_work() as session:
        await session.execute(
            text("UPDATE members SET first_name = ' ' WHERE id = :id"),
            {"id": uuid.UUID(members[0]["id"])},
        )
    message = await _send(client, sending_church, group_id, "{{first_name}}")
    async with worker():
        done = await eventually(_completed(client, sending_church, message["id"]), within=20)
    assert done["counts"]["skipped"] == 1
    recipients = await client.get(
        f"/api/v1/messages/{message['id']}/recipients", headers=sending_church.headers
    )
    reasons = sorted(str(r["skip_reason"]) for r in recipients.json()["data"])
    assert reasons == ["None", "empty_body"]
    await assert_ledger_balanced(app, sending_church.account.church_id)


# --- 9. Billing: staff replies are billed; 402 when the subscription cannot ----------


async def test_staff_replies_are_debited_and_refused_when_inactive(
    client: httpx.AsyncClient,
    app: FastAPI,
    sending_church: SendingChurch,
    worker: WorkerFactory,
) -> None:
    member = await add_member(client, sending_church.account)
    usage = await client.get("/api/v1/billing/usage", headers=sending_church.headers)
    used = usage.json()["used"]
    started = await client.post(
        "/api/v1/conversations",
        json={"member_id": member["id"], "body": "Hello from the office"},
        headers=sending_church.headers,
    )
    assert started.status_code in (200, 201), started.text
    after = await client.get("/api/v1/billing/usage", headers=sending_church.headers)
    assert after.json()["used"] == used + 1
    async with worker():

        async def replied() -> Any:
            thread = await client.get(
                f"/api/v1/conversations/{started.json()['id']}/messages",
                headers=sending_church.headers,
            )
            return all(m["status"] in ("sent", "delivered") for m in thread.json()["data"])

        await eventually(replied, within=20)
    await assert_ledger_balanced(app, sending_church.account.church_id)
    async with app.state.database.unit_of_work() as session:
        await session.execute(
            text("UPDATE subscriptions SET status = 'past_due' WHERE church_id = :c"),
            {"c": uuid.UUID(sending_church.account.church_id)},
        )
    refused = await client.post(
        f"/api/v1/conversations/{started.json()['id']}/messages",
        json={"body": "Another"},
        headers=sending_church.headers,
    )
    assert refused.status_code == 402, refused.text
    assert refused.json()["code"] == "subscription_inactive"


# --- 10. The church's sending window ---------------------------------------------------


async def test_outside_the_window_a_broadcast_is_held_and_urgent_is_for_managers(
    client: httpx.AsyncClient,
    app: FastAPI,
    sending_church: SendingChurch,
    sandbox_http: httpx.AsyncClient,
    worker: WorkerFactory,
) -> None:
    now = datetime.now(UTC)
    opens = (now + timedelta(hours=2)).replace(second=0, microsecond=0)
    closes = opens + timedelta(hours=1)
    patched = await client.patch(
        "/api/v1/church",
        json={
            "timezone": "UTC",
            "send_window_start": opens.strftime("%H:%M"),
            "send_window_end": closes.strftime("%H:%M"),
        },
        headers=sending_church.headers,
    )
    assert patched.status_code == 200, patched.text
    group_id, _ = await _group(client, sending_church, 2)
    held = await _send(client, sending_church, group_id, "Held for the window")
    assert held["status"] == "scheduled"
    assert datetime.fromisoformat(held["starts_at"].replace("Z", "+00:00")) == opens
    assert await _pending_jobs(app, held["id"]) == ["messaging:start_broadcast"]
    staff = await add_user(client, sending_church.account, role="staff")
    refused = await client.post(
        "/api/v1/messages",
        json={"body": "Snow!", "group_ids": [group_id], "urgent": True},
        headers=staff.headers,
    )
    assert refused.status_code == 403, refused.text
    token = uuid.uuid4().hex[:10]
    urgent = await _send(client, sending_church, group_id, f"Snow {token}", urgent=True)
    assert urgent["status"] == "queued" and urgent["urgent"] is True
    async with worker():
        await eventually(_completed(client, sending_church, urgent["id"]), within=20)
    assert sorted((await _texts_with(sandbox_http, token)).values()) == [1, 1]
    assert (await _message(client, sending_church, held["id"]))["status"] == "scheduled"


# --- 13. Concurrent broadcasts don't fail each other ----------------------------------


async def test_concurrent_broadcasts_are_all_accepted(
    client: httpx.AsyncClient, app: FastAPI, sending_church: SendingChurch
) -> None:
    group_id, _ = await _group(client, sending_church, 5)

    async def one(i: int) -> httpx.Response:
        return await client.post(
            "/api/v1/messages",
            json={"body": f"Concurrent {i}", "group_ids": [group_id]},
            headers=sending_church.headers | {"Idempotency-Key": str(uuid.uuid4())},
        )

    answers = await asyncio.gather(*(one(i) for i in range(24)))
    assert Counter(a.status_code for a in answers) == {202: 24}
    await assert_ledger_balanced(app, sending_church.account.church_id)


# --- 14. Throttling slows us down and fails nobody ------------------------------------


async def test_provider_throttling_fails_nobody(
    client: httpx.AsyncClient,
    app: FastAPI,
    redis: Redis,
    sending_church: SendingChurch,
    sandbox_http: httpx.AsyncClient,
    worker: WorkerFactory,
) -> None:
    await redis.delete("cb:telnyx", "cb:telnyx:failures", "cb:telnyx:probe")
    group_id, _ = await _group(client, sending_church, 5)
    token = uuid.uuid4().hex[:10]
    await sandbox_http.post("/sandbox/faults", json={"error_rate": 1.0, "status": 429})
    message = await _send(client, sending_church, group_id, f"Throttled {token}")
    message_id = uuid.UUID(message["id"])
    async with worker(telnyx_max_retries=1):

        async def throttled_several_times() -> Any:
            async with app.state.database.unit_of_work() as session:
                return await session.scalar(
                    text(
                        "SELECT count(*) FROM message_recipients WHERE message_id = :m "
                        "AND error_code = '10011' AND status = 'queued' AND attempts = 0"
                    ),
                    {"m": message_id},
                )

        await eventually(throttled_several_times, within=20)
        # Longer than the retries of a recipient would last if throttling counted.
        await sandbox_http.delete("/sandbox/faults")
        done = await eventually(_completed(client, sending_church, message["id"]), within=30)
    assert done["counts"]["failed"] == 0
    assert sorted((await _texts_with(sandbox_http, token)).values()) == [1] * 5


# --- 15. `sent` rows without a final receipt are looked up and settled ----------------


async def test_sent_rows_without_a_final_receipt_are_settled(
    client: httpx.AsyncClient,
    app: FastAPI,
    settings: Settings,
    redis: Redis,
    sending_church: SendingChurch,
    sandbox_http: httpx.AsyncClient,
    worker: WorkerFactory,
) -> None:
    group_id, _ = await _group(client, sending_church, 2)
    message = await _send(client, sending_church, group_id, "Lost receipts")
    async with worker():
        await eventually(_completed(client, sending_church, message["id"]), within=20)
    message_id = uuid.UUID(message["id"])
    async with app.state.database.unit_of_work() as session:
        ids = [
            int(i)
            for (i,) in await session.execute(
                text("SELECT id FROM message_recipients WHERE message_id = :m ORDER BY id"),
                {"m": message_id},
            )
        ]
        # As if the final receipts were lost: one row Telnyx knows, one it does not.
        await session.execute(
            text(
                "UPDATE message_recipients SET status = 'sent', finalized_at = NULL, "
                "sent_at = now() - interval '2 hours' WHERE message_id = :m"
            ),
            {"m": message_id},
        )
        await session.execute(
            text("UPDATE message_recipients SET provider_message_id = 'unknown' WHERE id = :i"),
            {"i": ids[1]},
        )
        await session.execute(
            text("UPDATE messages SET sent_count = 2, delivered_count = 0 WHERE id = :m"),
            {"m": message_id},
        )
    fast = settings.model_copy(update={"send_settle_after_seconds": 60.0})
    job_app = build_job_app(fast)
    telnyx = TelnyxClient(fast)
    async with job_app.open_async():
        await reconcile(SendContext.build(fast, redis, telnyx), app.state.database, job_app)
    await telnyx.aclose()
    async with app.state.database.unit_of_work() as session:
        states = [
            str(s)
            for (s,) in await session.execute(
                text("SELECT status FROM message_recipients WHERE message_id = :m ORDER BY id"),
                {"m": message_id},
            )
        ]
    assert states == ["delivered", "unconfirmed"]
