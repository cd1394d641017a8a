"""Member CRUD, normalisation, encryption at rest, search, filters, pagination."""

from __future__ import annotations

from typing import Any

import httpx
from sqlalchemy import text

from tests.support.api import Account, add_member, random_phone


async def test_create_normalises_phone_and_encrypts_at_rest(
    client: httpx.AsyncClient, owner: Account, app: Any
) -> None:
    member = await add_member(
        client, owner, phone="(415) 555-2671", email="Ada@Example.org", first_name="Ada"
    )
    assert member["phone"] == "+14155552671"
    assert member["email"] == "ada@example.org"
    assert member["opted_out"] is False
    async with app.state.database.sessions() as session:
        row = (
            await session.execute(
                text("SELECT phone_ct, email_ct, phone_hash FROM members WHERE id = :id"),
                {"id": member["id"]},
            )
        ).one()
    assert b"4155552671" not in bytes(row.phone_ct)
    assert b"example.org" not in bytes(row.email_ct)
    assert len(bytes(row.phone_hash)) == 32


async def test_duplicate_phone_is_conflict_in_any_format(
    client: httpx.AsyncClient, owner: Account
) -> None:
    await add_member(client, owner, phone="+14155550199")
    again = await client.post(
        "/api/v1/members", json={"phone": "415.555.0199"}, headers=owner.headers
    )
    assert again.status_code == 409


async def test_same_phone_in_two_churches_is_fine(
    client: httpx.AsyncClient, owner: Account, other_church: Account
) -> None:
    phone = random_phone()
    await add_member(client, owner, phone=phone)
    await add_member(client, other_church, phone=phone)


async def test_invalid_input_is_422_per_field(client: httpx.AsyncClient, owner: Account) -> None:
    response = await client.post(
        "/api/v1/members",
        json={"phone": "12", "email": "not-an-email", "first_name": "x" * 101, "shoe": 1},
        headers=owner.headers,
    )
    assert response.status_code == 422
    fields = {e["field"] for e in response.json()["errors"]}
    assert {"email", "first_name", "shoe"} <= fields
    bad_phone = await client.post(
        "/api/v1/members", json={"phone": "555-0000-000"}, headers=owner.headers
    )
    assert bad_phone.status_code == 422
    assert bad_phone.json()["errors"][0]["field"] == "phone"


async def test_update_opt_out_and_soft_delete(client: httpx.AsyncClient, owner: Account) -> None:
    member = await add_member(client, owner, first_name="Grace")
    url = f"/api/v1/members/{member['id']}"
    updated = await client.patch(
        url, json={"opted_out": True, "last_name": "Hopper"}, headers=owner.headers
    )
    assert updated.status_code == 200
    body = updated.json()
    assert body["opted_out"] is True and body["opted_out_at"] and body["last_name"] == "Hopper"
    assert body["opted_out_source"] == "api"
    assert (await client.delete(url, headers=owner.headers)).status_code == 204
    assert (await client.get(url, headers=owner.headers)).status_code == 404
    listed = (await client.get("/api/v1/members", headers=owner.headers)).json()["data"]
    assert member["id"] not in {m["id"] for m in listed}
    # Added again: the same member comes back and keeps the opt-out.
    revived = await client.post(
        "/api/v1/members",
        json={"phone": member["phone"], "first_name": "G"},
        headers=owner.headers,
    )
    assert revived.status_code == 201
    assert revived.json()["id"] == member["id"]
    assert revived.json()["opted_out"] is True


async def test_phone_change_and_email_clear(client: httpx.AsyncClient, owner: Account) -> None:
    member = await add_member(client, owner, email="x@example.org")
    url = f"/api/v1/members/{member['id']}"
    new_phone = random_phone()
    response = await client.patch(
        url, json={"phone": new_phone, "email": None}, headers=owner.headers
    )
    assert response.json()["phone"] == new_phone
    assert response.json()["email"] is None


async def test_search_filters_and_cursor_pagination(
    client: httpx.AsyncClient, owner: Account
) -> None:
    created = [
        await add_member(client, owner, first_name=f"Person{i}", last_name="Smith")
        for i in range(5)
    ]
    special = await add_member(
        client, owner, first_name="Zebulon", last_name="Quill", email="zq@example.org"
    )
    await client.patch(
        f"/api/v1/members/{created[0]['id']}", json={"opted_out": True}, headers=owner.headers
    )
    headers = owner.headers

    async def ids(params: dict[str, Any]) -> list[str]:
        response = await client.get("/api/v1/members", params=params, headers=headers)
        assert response.status_code == 200, response.text
        return [m["id"] for m in response.json()["data"]]

    assert await ids({"q": "zebul"}) == [special["id"]]
    assert await ids({"q": special["phone"]}) == [special["id"]]
    assert await ids({"q": "ZQ@example.org"}) == [special["id"]]
    assert await ids({"q": "100%_"}) == []
    assert await ids({"opted_out": "true"}) == [created[0]["id"]]
    # Pages of 2 walk all 6, newest first, without repeats.
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = (await client.get("/api/v1/members", params=params, headers=headers)).json()
        seen += [m["id"] for m in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [special["id"], *[m["id"] for m in reversed(created)]]
    bad = await client.get("/api/v1/members", params={"cursor": "garbage"}, headers=headers)
    assert bad.status_code == 422
    too_big = await client.get("/api/v1/members", params={"limit": 500}, headers=headers)
    assert too_big.status_code == 422


async def test_group_filter(client: httpx.AsyncClient, owner: Account) -> None:
    group = (
        await client.post("/api/v1/groups", json={"name": "Choir"}, headers=owner.headers)
    ).json()
    inside = await add_member(client, owner, group_ids=[group["id"]])
    await add_member(client, owner)
    response = await client.get(
        "/api/v1/members", params={"group_id": group["id"]}, headers=owner.headers
    )
    assert [m["id"] for m in response.json()["data"]] == [inside["id"]]
