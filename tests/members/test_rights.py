"""Member data rights through the API: export everything held on a member, erase it
everywhere (provider events and conversation texts included, counts kept, audited), an
erased opt-out that stays suppressed, and the consent history of every opt-out path."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import text

from koinonia.members.crypto import ContactCipher
from koinonia.settings import Settings
from tests.conftest import TELNYX_TEST_SEED
from tests.messaging import conftest as messaging
from tests.messaging.conftest import SendingChurch, WorkerFactory, eventually
from tests.support.api import Account, add_member, add_user

API = "/api/v1"
# The sending fixtures of tests/messaging (a church with a number, the in-process worker,
# the sandbox's log), used here too.
sending_church = messaging.sending_church
sandbox_http = messaging.sandbox_http
worker = messaging.worker


async def _group(client: httpx.AsyncClient, church: SendingChurch) -> str:
    group = await client.post(
        f"{API}/groups", json={"name": f"g-{uuid.uuid4().hex[:8]}"}, headers=church.headers
    )
    assert group.status_code == 201, group.text
    return str(group.json()["id"])


async def _texts_to(sandbox_http: httpx.AsyncClient, phone: str) -> list[dict[str, Any]]:
    log = (await sandbox_http.get("/sandbox/messages", params={"to": phone})).json()
    return list(log["data"] if isinstance(log, dict) else log)


async def _inbound(sandbox_http: httpx.AsyncClient, sender: str, to: str, body: str) -> None:
    sent = await sandbox_http.post(
        "/sandbox/inbound", json={"from": sender, "to": to, "text": body}
    )
    assert sent.status_code in (200, 202), sent.text


async def _pending_inbound(client: httpx.AsyncClient, sender: str, to: str, body: str) -> str:
    """A signed `message.received` stored by the webhook and not applied (no worker)."""
    from koinonia.sandbox.signing import load_telnyx_key, telnyx_headers

    event_id = str(uuid.uuid4())
    event = {
        "data": {
            "event_type": "message.received",
            "id": event_id,
            "occurred_at": datetime.now(UTC).isoformat(),
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
    raw = json.dumps(event).encode()
    headers = telnyx_headers(load_telnyx_key(TELNYX_TEST_SEED), raw, int(time.time()))
    stored = await client.post(
        f"{API}/webhooks/telnyx",
        content=raw,
        headers=headers | {"Content-Type": "application/json"},
    )
    assert stored.status_code in (200, 202), stored.text
    return event_id


async def _broadcast(
    client: httpx.AsyncClient, church: SendingChurch, body: str, member_ids: list[str]
) -> str:
    sent = await client.post(
        f"{API}/messages",
        json={"body": body, "member_ids": member_ids},
        headers=church.headers | {"Idempotency-Key": str(uuid.uuid4())},
    )
    assert sent.status_code == 202, sent.text
    return str(sent.json()["id"])


async def _completed(client: httpx.AsyncClient, church: SendingChurch, message_id: str) -> Any:
    async def done() -> Any:
        got = (await client.get(f"{API}/messages/{message_id}", headers=church.headers)).json()
        return got if got["status"] == "completed" and got["counts"]["sent"] == 0 else None

    return await eventually(done)


async def _conversation_with(
    client: httpx.AsyncClient, church: SendingChurch, phone: str, texts: int
) -> dict[str, Any]:
    async def found() -> Any:
        page = (await client.get(f"{API}/conversations", headers=church.headers)).json()
        for item in page["data"]:
            if item["member"]["phone"] == phone:
                messages = await client.get(
                    f"{API}/conversations/{item['id']}/messages", headers=church.headers
                )
                data = messages.json()["data"]
                settled = all(m["status"] in ("delivered", "received") for m in data)
                if len(data) == texts and settled:
                    return item
        return None

    result: dict[str, Any] = await eventually(found)
    return result


async def _reply(
    client: httpx.AsyncClient, church: SendingChurch, conversation_id: str, body: str
) -> None:
    sent = await client.post(
        f"{API}/conversations/{conversation_id}/messages",
        json={"body": body},
        headers=church.headers,
    )
    assert sent.status_code == 202, sent.text


async def _audit(app: FastAPI, action: str, member_id: str) -> list[Any]:
    async with app.state.database.unit_of_work() as session:
        rows = await session.execute(
            text(
                "SELECT church_id, actor_id, actor_kind, details FROM audit_log "
                "WHERE action = :action AND target_type = 'member' AND target_id = :id "
                "ORDER BY id"
            ),
            {"action": action, "id": member_id},
        )
        return list(rows)


async def _tables_holding(app: FastAPI, needles: list[str]) -> dict[str, int]:
    """Every table (partitioned ones through their parent) whose rows' text holds any of
    `needles` — bytea appears there as hex, so ciphertexts are found too."""
    found: dict[str, int] = {}
    async with app.state.database.unit_of_work() as session:
        tables = await session.scalars(
            text(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition"
            )
        )
        for table in list(tables):
            count = await session.scalar(
                text(
                    f'SELECT count(*) FROM "{table}" x '  # noqa: S608 - catalog names
                    "WHERE EXISTS (SELECT 1 FROM unnest(CAST(:needles AS text[])) AS n(v) "
                    "WHERE strpos(CAST(x AS text), n.v) > 0)"
                ),
                {"needles": needles},
            )
            if count:
                found[table] = int(count)
    return found


async def test_export_holds_everything_isolated_by_role_and_audited(
    client: httpx.AsyncClient,
    app: FastAPI,
    sending_church: SendingChurch,
    sandbox_http: httpx.AsyncClient,
    worker: WorkerFactory,
    other_church: Account,
) -> None:
    headers = sending_church.headers
    account = sending_church.account
    admin = await add_user(client, account, role="admin")
    staff = await add_user(client, account, role="staff")
    group_id = await _group(client, sending_church)
    member = await add_member(
        client, account, first_name="Lydia", email="lydia@example.org", group_ids=[group_id]
    )
    mid = member["id"]
    for state in (True, False):
        patched = await client.patch(
            f"{API}/members/{mid}", json={"opted_out": state}, headers=headers
        )
        assert patched.status_code == 200, patched.text
    message_id = await _broadcast(
        client, sending_church, "Hi {{first_name}}, see you Sunday at {{church_name}}", [mid]
    )
    async with worker():
        await _completed(client, sending_church, message_id)
        await _inbound(sandbox_http, member["phone"], sending_church.number, "Thanks!")
        conversation = await _conversation_with(client, sending_church, member["phone"], 1)
        await _reply(client, sending_church, conversation["id"], "You're welcome")
        await _conversation_with(client, sending_church, member["phone"], 2)

    exported = await client.get(f"{API}/members/{mid}/export", headers=headers)
    assert exported.status_code == 200, exported.text
    document = exported.json()
    assert document["church_id"] == account.church_id
    profile = document["member"]
    assert (profile["id"], profile["first_name"], profile["phone"], profile["email"]) == (
        mid,
        "Lydia",
        member["phone"],
        "lydia@example.org",
    )
    assert [g["id"] for g in document["groups"]] == [group_id]
    history = document["consent_history"]
    assert [(e["opted_out"], e["source"], e["actor_id"]) for e in history] == [
        (True, "api", account.user_id),
        (False, "api", account.user_id),
    ]
    [broadcast] = document["broadcasts"]
    church_name = (await client.get(f"{API}/auth/me", headers=headers)).json()["church"]["name"]
    assert broadcast["message_id"] == message_id and broadcast["status"] == "delivered"
    assert broadcast["template"] == "Hi {{first_name}}, see you Sunday at {{church_name}}"
    assert broadcast["body"] == f"Hi Lydia, see you Sunday at {church_name}"
    assert broadcast["provider_message_id"]
    texts = document["conversation"]["texts"]
    assert [(t["direction"], t["body"]) for t in texts] == [
        ("inbound", "Thanks!"),
        ("outbound", "You're welcome"),
    ]
    consent = await client.get(f"{API}/members/{mid}/consent", headers=staff.headers)
    assert consent.status_code == 200
    assert [e["opted_out"] for e in consent.json()] == [False, True]  # newest first

    # Owner and admin export; staff cannot. Only the owner erases.
    assert (await client.get(f"{API}/members/{mid}/export", headers=admin.headers)).is_success
    denied = await client.get(f"{API}/members/{mid}/export", headers=staff.headers)
    assert denied.status_code == 403
    for who in (admin, staff):
        refused = await client.post(f"{API}/members/{mid}/erase", headers=who.headers)
        assert refused.status_code == 403, refused.text
    # Another church's member does not exist for them.
    for method, path in (
        ("GET", f"{API}/members/{mid}/export"),
        ("GET", f"{API}/members/{mid}/consent"),
        ("POST", f"{API}/members/{mid}/erase"),
    ):
        foreign = await client.request(method, path, headers=other_church.headers)
        assert foreign.status_code == 404, (path, foreign.text)
    still = await client.get(f"{API}/members/{mid}", headers=headers)
    assert still.status_code == 200 and still.json()["first_name"] == "Lydia"

    entries = await _audit(app, "member.exported", mid)
    assert [str(e.actor_id) for e in entries] == [account.user_id, admin.user_id]
    assert all(str(e.church_id) == account.church_id for e in entries)
    assert entries[0].details == {"broadcasts": 1, "conversation_texts": 2}


async def test_erase_removes_personal_data_everywhere_and_keeps_counts(
    client: httpx.AsyncClient,
    app: FastAPI,
    settings: Settings,
    sending_church: SendingChurch,
    sandbox_http: httpx.AsyncClient,
    worker: WorkerFactory,
) -> None:
    headers = sending_church.headers
    account = sending_church.account
    token = uuid.uuid4().hex[:10]
    first, last, email = f"Zebedee{token}", f"Fisher{token}", f"zeb-{token}@example.org"
    group_id = await _group(client, sending_church)
    member = await add_member(
        client, account, first_name=first, last_name=last, email=email, group_ids=[group_id]
    )
    keeper = await add_member(client, account, first_name="Martha", group_ids=[group_id])
    mid, phone = member["id"], member["phone"]
    message_id = await _broadcast(
        client, sending_church, "Hi {{first_name}} {{last_name}}!", [mid, keeper["id"]]
    )
    async with worker():
        before = await _completed(client, sending_church, message_id)
        await _inbound(sandbox_http, phone, sending_church.number, f"It is {first} here")
        await _inbound(sandbox_http, keeper["phone"], sending_church.number, "Martha here")
        conversation = await _conversation_with(client, sending_church, phone, 1)
        await _reply(client, sending_church, conversation["id"], f"Welcome {first} {last}")
        await _conversation_with(client, sending_church, phone, 2)
        await _conversation_with(client, sending_church, keeper["phone"], 1)
    # Stored but not applied: a text naming the phone in plain text.
    pending_id = await _pending_inbound(client, phone, sending_church.number, "one more")
    exported = (await client.get(f"{API}/members/{mid}/export", headers=headers)).json()
    provider_ids = [b["provider_message_id"] for b in exported["broadcasts"]] + [
        t["provider_message_id"] for t in exported["conversation"]["texts"]
    ]
    assert all(provider_ids) and len(provider_ids) == 3
    async with app.state.database.unit_of_work() as session:
        stored = (
            await session.execute(
                text("SELECT phone_ct, email_ct FROM members WHERE id = :id"), {"id": mid}
            )
        ).one()
        named = await session.scalar(
            text(
                "SELECT count(*) FROM webhook_events WHERE provider = 'telnyx' AND "
                "(payload->'data'->'payload'->>'id' = ANY(:ids) OR event_id = :pending)"
            ),
            {"ids": provider_ids, "pending": pending_id},
        )
    assert named and named >= 4  # receipts of both texts out, the inbound, the pending one
    needles = [phone, phone.lstrip("+"), first, last, email]
    needles += [bytes(stored.phone_ct).hex(), bytes(stored.email_ct).hex()]
    assert await _tables_holding(app, needles)  # the scan does see them before

    erased = await client.post(f"{API}/members/{mid}/erase", headers=headers)
    assert erased.status_code == 200, erased.text
    result = erased.json()
    assert result["member_id"] == mid and result["suppression_kept"] is False
    assert result["group_memberships"] == 1
    assert result["conversation_texts"] == 2
    assert result["broadcast_recipients"] == 1
    assert result["provider_events"] >= named

    # Nothing left anywhere: no phone (plain or sealed), name, email or text.
    assert await _tables_holding(app, needles) == {}
    async with app.state.database.unit_of_work() as session:
        left = await session.scalar(
            text(
                "SELECT count(*) FROM webhook_events WHERE provider = 'telnyx' AND "
                "(payload->'data'->'payload'->>'id' = ANY(:ids) OR event_id = :pending)"
            ),
            {"ids": provider_ids, "pending": pending_id},
        )
        assert left == 0
        tombstone = (
            await session.execute(
                text(
                    "SELECT first_name, last_name, email_ct, email_hash, phone_hash, "
                    "deleted_at, erased_at FROM members WHERE id = :id"
                ),
                {"id": mid},
            )
        ).one()
        groups = await session.scalar(
            text("SELECT count(*) FROM group_members WHERE member_id = :id"), {"id": mid}
        )
        bodies = list(
            await session.scalars(
                text("SELECT body FROM conversation_messages WHERE conversation_id = :c"),
                {"c": conversation["id"]},
            )
        )
    cipher = ContactCipher.from_settings(settings)
    assert (tombstone.first_name, tombstone.last_name, tombstone.email_ct) == ("", "", None)
    assert tombstone.email_hash is None and tombstone.erased_at and tombstone.deleted_at
    # Never opted out: not even the keyed hash of the phone is left.
    assert bytes(tombstone.phone_hash) != cipher.phone_hash(phone, uuid.UUID(account.church_id))
    assert groups == 0 and bodies == ["", ""]

    # Counts and the other member stay.
    after = (await client.get(f"{API}/messages/{message_id}", headers=headers)).json()
    assert after["counts"] == before["counts"] and after["recipients_total"] == 2
    assert after["counts"]["delivered"] == 2
    recipients = await client.get(f"{API}/messages/{message_id}/recipients", headers=headers)
    assert sorted(r["status"] for r in recipients.json()["data"]) == ["delivered", "delivered"]
    kept = (await client.get(f"{API}/members/{keeper['id']}/export", headers=headers)).json()
    assert [t["body"] for t in kept["conversation"]["texts"]] == ["Martha here"]
    assert [g["id"] for g in kept["groups"]] == [group_id]
    inbox = (await client.get(f"{API}/conversations", headers=headers)).json()["data"]
    gone = next(c for c in inbox if c["id"] == conversation["id"])
    assert gone["last_message"] is None and gone["status"] == "archived"

    # Gone for the API; cannot be erased twice.
    for method, path in (
        ("GET", f"{API}/members/{mid}"),
        ("GET", f"{API}/members/{mid}/export"),
        ("POST", f"{API}/members/{mid}/erase"),
    ):
        assert (await client.request(method, path, headers=headers)).status_code == 404
    [entry] = await _audit(app, "member.erased", mid)
    assert str(entry.actor_id) == account.user_id and entry.actor_kind == "user"
    assert entry.details["conversation_texts"] == 2 and entry.details["group_memberships"] == 1


async def test_erased_opt_out_stays_suppressed_for_imports_creation_and_broadcasts(
    client: httpx.AsyncClient,
    app: FastAPI,
    settings: Settings,
    sending_church: SendingChurch,
    sandbox_http: httpx.AsyncClient,
    worker: WorkerFactory,
) -> None:
    headers = sending_church.headers
    account = sending_church.account
    stopped = await add_member(client, account, first_name="Silas", email="silas@example.org")
    fresh = await add_member(client, account, first_name="Tabitha")
    again = await add_member(client, account, first_name="Eunice")
    for member in (stopped, again):
        patched = await client.patch(
            f"{API}/members/{member['id']}", json={"opted_out": True}, headers=headers
        )
        assert patched.status_code == 200
    opted_at = (await client.get(f"{API}/members/{stopped['id']}", headers=headers)).json()[
        "opted_out_at"
    ]
    # A soft-deleted member still holds personal data: it can be erased too.
    deleted = await client.delete(f"{API}/members/{again['id']}", headers=headers)
    assert deleted.status_code == 204
    for member, kept in ((stopped, True), (fresh, False), (again, True)):
        erased = await client.post(f"{API}/members/{member['id']}/erase", headers=headers)
        assert erased.status_code == 200, erased.text
        assert erased.json()["suppression_kept"] is kept

    # What an erased opt-out keeps: the church's keyed hash of the phone and the opt-out
    # time, no plain text, no ciphertext of the phone.
    cipher = ContactCipher.from_settings(settings)
    church = uuid.UUID(account.church_id)
    async with app.state.database.unit_of_work() as session:
        row = (
            await session.execute(
                text(
                    "SELECT phone_ct, phone_hash, opted_out, opted_out_at, first_name, "
                    "email_ct FROM members WHERE id = :id"
                ),
                {"id": stopped["id"]},
            )
        ).one()
    assert bytes(row.phone_hash) == cipher.phone_hash(stopped["phone"], church)
    assert cipher.decrypt(row.phone_ct, church) == "" and row.email_ct is None
    assert row.opted_out and row.opted_out_at.isoformat().startswith(opted_at[:19])
    assert await _tables_holding(app, [stopped["phone"], "Silas", "silas@example.org"]) == {}

    # A later import of the same phones: the opted-out one comes back opted out.
    csv_text = f"first_name,phone\nSilas,{stopped['phone']}\nTabitha,{fresh['phone']}\n"
    imported = await client.post(
        f"{API}/members/import",
        files={"file": ("people.csv", csv_text.encode(), "text/csv")},
        headers=headers,
    )
    assert imported.status_code == 201, imported.text
    assert (imported.json()["created"], imported.json()["updated"]) == (1, 1)
    found = {}
    for phone in (stopped["phone"], fresh["phone"]):
        listed = await client.get(f"{API}/members", params={"q": phone}, headers=headers)
        [found[phone]] = listed.json()["data"]
    back = found[stopped["phone"]]
    assert back["opted_out"] is True and back["opted_out_source"] == "api"
    assert back["first_name"] == "Silas"
    assert found[fresh["phone"]]["opted_out"] is False
    assert found[fresh["phone"]]["id"] != fresh["id"]  # a new person: nothing linked them
    history = (await client.get(f"{API}/members/{back['id']}/consent", headers=headers)).json()
    assert [(e["source"], e["opted_out"]) for e in history] == [("erase", True), ("api", True)]

    # … and so does one added through the API.
    recreated = await client.post(
        f"{API}/members", json={"first_name": "Eunice", "phone": again["phone"]}, headers=headers
    )
    assert recreated.status_code == 201, recreated.text
    assert recreated.json()["opted_out"] is True

    # A broadcast to all three skips both opt-outs and texts only the new member.
    ids = [back["id"], found[fresh["phone"]]["id"], recreated.json()["id"]]
    message_id = await _broadcast(client, sending_church, "Hello {{first_name}}", ids)
    async with worker():
        final = await _completed(client, sending_church, message_id)
    assert final["counts"]["delivered"] == 1 and final["counts"]["skipped"] == 2
    recipients = (
        await client.get(f"{API}/messages/{message_id}/recipients", headers=headers)
    ).json()["data"]
    reasons = {r["member_id"]: r["skip_reason"] for r in recipients}
    assert reasons[back["id"]] == "opted_out" and reasons[recreated.json()["id"]] == "opted_out"
    assert await _texts_to(sandbox_http, stopped["phone"]) == []
    assert await _texts_to(sandbox_http, again["phone"]) == []
    assert len(await _texts_to(sandbox_http, fresh["phone"])) == 1


async def test_consent_history_of_keywords_and_the_provider(
    client: httpx.AsyncClient,
    sending_church: SendingChurch,
    sandbox_http: httpx.AsyncClient,
    worker: WorkerFactory,
) -> None:
    headers = sending_church.headers
    texter = await add_member(client, sending_church.account)
    # The sandbox refuses numbers ending 0000 with 40300 (texted STOP at the carrier).
    refused = await add_member(
        client, sending_church.account, phone=f"+1415{200 + uuid.uuid4().int % 700}0000"
    )
    message_id = await _broadcast(client, sending_church, "Hello", [refused["id"]])
    async with worker():
        await _completed(client, sending_church, message_id)
        await _inbound(sandbox_http, texter["phone"], sending_church.number, "STOP")

        async def opted_out() -> Any:
            got = (await client.get(f"{API}/members/{texter['id']}", headers=headers)).json()
            return got["opted_out"]

        await eventually(opted_out)
        await _inbound(sandbox_http, texter["phone"], sending_church.number, "START")

        async def opted_in() -> Any:
            got = (await client.get(f"{API}/members/{texter['id']}", headers=headers)).json()
            return not got["opted_out"]

        await eventually(opted_in)
    history = (await client.get(f"{API}/members/{texter['id']}/consent", headers=headers)).json()
    assert [(e["source"], e["opted_out"], e["actor_id"]) for e in history] == [
        ("keyword", False, None),
        ("keyword", True, None),
    ]
    provider = (await client.get(f"{API}/members/{refused['id']}/consent", headers=headers)).json()
    assert [(e["source"], e["opted_out"]) for e in provider] == [("provider", True)]


async def test_unknown_member_is_404(client: httpx.AsyncClient, owner: Account) -> None:
    missing = uuid.uuid4()
    for method, path in (
        ("GET", f"{API}/members/{missing}/export"),
        ("GET", f"{API}/members/{missing}/consent"),
        ("POST", f"{API}/members/{missing}/erase"),
    ):
        assert (await client.request(method, path, headers=owner.headers)).status_code == 404
