"""Groups: CRUD, counts, bulk membership (one statement, idempotent), concurrency."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx

from tests.support.api import Account, add_member


async def _group(client: httpx.AsyncClient, account: Account, name: str = "Youth") -> Any:
    response = await client.post("/api/v1/groups", json={"name": name}, headers=account.headers)
    assert response.status_code == 201, response.text
    return response.json()


async def test_group_crud_and_unique_names(client: httpx.AsyncClient, owner: Account) -> None:
    group = await _group(client, owner, "Youth")
    assert group["member_count"] == 0
    dup = await client.post("/api/v1/groups", json={"name": "YOUTH"}, headers=owner.headers)
    assert dup.status_code == 409
    url = f"/api/v1/groups/{group['id']}"
    renamed = await client.patch(
        url, json={"name": "Youth Group", "description": "Ages 12-18"}, headers=owner.headers
    )
    assert renamed.json()["name"] == "Youth Group"
    assert (await client.get(url, headers=owner.headers)).json()["description"] == "Ages 12-18"
    listed = (await client.get("/api/v1/groups", headers=owner.headers)).json()
    assert [g["id"] for g in listed["data"]] == [group["id"]]
    assert (await client.delete(url, headers=owner.headers)).status_code == 204
    assert (await client.get(url, headers=owner.headers)).status_code == 404


async def test_bulk_add_remove_is_idempotent_and_counts_follow(
    client: httpx.AsyncClient, owner: Account
) -> None:
    group = await _group(client, owner)
    members = [await add_member(client, owner) for _ in range(4)]
    ids = [m["id"] for m in members]
    url = f"/api/v1/groups/{group['id']}/members"
    added = await client.post(url, json={"member_ids": ids + ids[:1]}, headers=owner.headers)
    assert added.status_code == 200, added.text
    assert added.json() | {} == {
        "group_id": group["id"],
        "requested": 4,
        "changed": 4,
        "member_count": 4,
    }
    again = await client.post(url, json={"member_ids": ids}, headers=owner.headers)
    assert again.json()["changed"] == 0 and again.json()["member_count"] == 4
    listed = (await client.get("/api/v1/groups", headers=owner.headers)).json()["data"]
    assert listed[0]["member_count"] == 4  # the cached count was invalidated
    removed = await client.request(
        "DELETE", url, json={"member_ids": ids[:2]}, headers=owner.headers
    )
    assert removed.json()["changed"] == 2 and removed.json()["member_count"] == 2
    removed_again = await client.request(
        "DELETE", url, json={"member_ids": ids[:2]}, headers=owner.headers
    )
    assert removed_again.json()["changed"] == 0
    listed = (await client.get("/api/v1/groups", headers=owner.headers)).json()["data"]
    assert listed[0]["member_count"] == 2
    # Deleting a member takes them out of the group.
    await client.delete(f"/api/v1/members/{ids[2]}", headers=owner.headers)
    listed = (await client.get("/api/v1/groups", headers=owner.headers)).json()["data"]
    assert listed[0]["member_count"] == 1


async def test_bulk_add_with_unknown_id_adds_nothing(
    client: httpx.AsyncClient, owner: Account, other_church: Account
) -> None:
    group = await _group(client, owner)
    mine = await add_member(client, owner)
    theirs = await add_member(client, other_church)
    url = f"/api/v1/groups/{group['id']}/members"
    for stranger in (theirs["id"], str(uuid.uuid4())):
        response = await client.post(
            url, json={"member_ids": [mine["id"], stranger]}, headers=owner.headers
        )
        assert response.status_code == 422
        assert stranger in response.json()["errors"][0]["message"]
    assert (await client.get(f"/api/v1/groups/{group['id']}", headers=owner.headers)).json()[
        "member_count"
    ] == 0
    empty = await client.post(url, json={"member_ids": []}, headers=owner.headers)
    assert empty.status_code == 422


async def test_concurrent_bulk_adds_converge(client: httpx.AsyncClient, owner: Account) -> None:
    group = await _group(client, owner)
    ids = [(await add_member(client, owner))["id"] for _ in range(20)]
    url = f"/api/v1/groups/{group['id']}/members"
    responses = await asyncio.gather(
        *(
            client.post(url, json={"member_ids": ids[i : i + 10]}, headers=owner.headers)
            for i in range(0, 15, 1)
        )
    )
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    final = await client.get(f"/api/v1/groups/{group['id']}", headers=owner.headers)
    assert final.json()["member_count"] == 20
    assert sum(r.json()["changed"] for r in responses) == 20
