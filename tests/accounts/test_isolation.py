"""Church A, holding church B's ids, gets 404 from every endpoint and sees none of B's rows."""

from __future__ import annotations

import httpx

from tests.support.api import Account, add_member, add_user


async def test_every_endpoint_hides_other_churches(
    client: httpx.AsyncClient, owner: Account, other_church: Account
) -> None:
    b = other_church
    b_member = await add_member(client, b)
    b_group = (await client.post("/api/v1/groups", json={"name": "B"}, headers=b.headers)).json()
    b_template = (
        await client.post("/api/v1/templates", json={"name": "B", "body": "hi"}, headers=b.headers)
    ).json()
    b_key = (await client.post("/api/v1/api-keys", json={"name": "B"}, headers=b.headers)).json()
    b_staff = await add_user(client, b)
    b_import = (
        await client.post(
            "/api/v1/members/import",
            files={"file": ("b.csv", b"phone\n4155550999\n", "text/csv")},
            headers=b.headers,
        )
    ).json()
    a_member = await add_member(client, owner)
    a_group = (
        await client.post("/api/v1/groups", json={"name": "A"}, headers=owner.headers)
    ).json()

    attempts = [
        ("GET", f"/api/v1/members/{b_member['id']}", None),
        ("PATCH", f"/api/v1/members/{b_member['id']}", {"first_name": "x"}),
        ("DELETE", f"/api/v1/members/{b_member['id']}", None),
        ("GET", f"/api/v1/members?group_id={b_group['id']}", None),
        ("GET", f"/api/v1/members/imports/{b_import['id']}", None),
        ("GET", f"/api/v1/groups/{b_group['id']}", None),
        ("PATCH", f"/api/v1/groups/{b_group['id']}", {"name": "x"}),
        ("DELETE", f"/api/v1/groups/{b_group['id']}", None),
        ("POST", f"/api/v1/groups/{b_group['id']}/members", {"member_ids": [a_member["id"]]}),
        ("DELETE", f"/api/v1/groups/{b_group['id']}/members", {"member_ids": [a_member["id"]]}),
        ("GET", f"/api/v1/templates/{b_template['id']}", None),
        ("PATCH", f"/api/v1/templates/{b_template['id']}", {"name": "x"}),
        ("DELETE", f"/api/v1/templates/{b_template['id']}", None),
        ("POST", f"/api/v1/templates/{b_template['id']}/render", {}),
        ("PATCH", f"/api/v1/users/{b_staff.user_id}", {"name": "x"}),
        ("DELETE", f"/api/v1/users/{b_staff.user_id}", None),
        ("DELETE", f"/api/v1/api-keys/{b_key['id']}", None),
    ]
    for method, url, body in attempts:
        response = await client.request(method, url, json=body, headers=owner.headers)
        assert response.status_code == 404, (method, url, response.status_code, response.text)
        assert response.json()["code"] == "not_found"
    # Another church's member cannot be put into my group either (422, nothing added).
    crossed = await client.post(
        f"/api/v1/groups/{a_group['id']}/members",
        json={"member_ids": [b_member["id"]]},
        headers=owner.headers,
    )
    assert crossed.status_code == 422
    # An import cannot target another church's group.
    import_to_b = await client.post(
        "/api/v1/members/import",
        files={"file": ("a.csv", b"phone\n4155550998\n", "text/csv")},
        data={"group_id": b_group["id"]},
        headers=owner.headers,
    )
    assert import_to_b.status_code == 404
    # Lists show only my rows.
    for url, theirs in [
        ("/api/v1/members", b_member["id"]),
        ("/api/v1/groups", b_group["id"]),
        ("/api/v1/templates", b_template["id"]),
        ("/api/v1/users", b_staff.user_id),
        ("/api/v1/api-keys", b_key["id"]),
    ]:
        listed = await client.get(url, headers=owner.headers)
        assert theirs not in {row["id"] for row in listed.json()["data"]}, url
    # B's search by its member's phone finds nothing in A.
    search = await client.get(
        "/api/v1/members", params={"q": b_member["phone"]}, headers=owner.headers
    )
    assert search.json()["data"] == []
    # And B's data is intact.
    still = await client.get(f"/api/v1/members/{b_member['id']}", headers=b.headers)
    assert still.status_code == 200 and still.json()["first_name"] == "Ada"
