"""Staff management, roles and API keys."""

from __future__ import annotations

import httpx

from tests.support.api import PASSWORD, Account, add_user


async def test_owner_manages_staff(client: httpx.AsyncClient, owner: Account) -> None:
    staff = await add_user(client, owner, "staff")
    listed = await client.get("/api/v1/users", headers=owner.headers)
    assert listed.status_code == 200
    assert {u["id"] for u in listed.json()["data"]} == {owner.user_id, staff.user_id}
    promoted = await client.patch(
        f"/api/v1/users/{staff.user_id}", json={"role": "admin"}, headers=owner.headers
    )
    assert promoted.json()["role"] == "admin"
    deactivated = await client.patch(
        f"/api/v1/users/{staff.user_id}", json={"is_active": False}, headers=owner.headers
    )
    assert deactivated.json()["is_active"] is False
    # A deactivated user can no longer log in, and their refresh tokens are revoked.
    login = await client.post(
        "/api/v1/auth/login", json={"email": staff.email, "password": PASSWORD}
    )
    assert login.status_code == 401
    refresh = await client.post("/api/v1/auth/refresh", json={"refresh_token": staff.refresh_token})
    assert refresh.status_code == 401
    deleted = await client.delete(f"/api/v1/users/{staff.user_id}", headers=owner.headers)
    assert deleted.status_code == 204
    gone = await client.patch(
        f"/api/v1/users/{staff.user_id}", json={"name": "x"}, headers=owner.headers
    )
    assert gone.status_code == 404


async def test_staff_cannot_manage_users_or_keys(client: httpx.AsyncClient, owner: Account) -> None:
    staff = await add_user(client, owner, "staff")
    for method, url, body in [
        ("GET", "/api/v1/users", None),
        ("POST", "/api/v1/users", {"email": "a@b.org", "name": "x", "password": PASSWORD}),
        ("PATCH", f"/api/v1/users/{owner.user_id}", {"name": "x"}),
        ("DELETE", f"/api/v1/users/{owner.user_id}", None),
        ("GET", "/api/v1/api-keys", None),
        ("POST", "/api/v1/api-keys", {"name": "k"}),
        ("PATCH", "/api/v1/church", {"name": "x"}),
    ]:
        response = await client.request(method, url, json=body, headers=staff.headers)
        assert response.status_code == 403, (method, url, response.text)
        assert response.json()["code"] == "forbidden"
    # Staff do the daily work.
    assert (await client.get("/api/v1/members", headers=staff.headers)).status_code == 200


async def test_admin_cannot_touch_the_owner(client: httpx.AsyncClient, owner: Account) -> None:
    admin = await add_user(client, owner, "admin")
    for body in ({"role": "staff"}, {"is_active": False}, {"name": "Renamed"}):
        response = await client.patch(
            f"/api/v1/users/{owner.user_id}", json=body, headers=admin.headers
        )
        assert response.status_code == 403, body
    assert (
        await client.delete(f"/api/v1/users/{owner.user_id}", headers=admin.headers)
    ).status_code == 403
    # Nor promote anyone to owner.
    bad = await client.post(
        "/api/v1/users",
        json={"email": "o2@example.org", "name": "x", "role": "owner", "password": PASSWORD},
        headers=admin.headers,
    )
    assert bad.status_code == 422


async def test_manager_cannot_change_own_role(client: httpx.AsyncClient, owner: Account) -> None:
    admin = await add_user(client, owner, "admin")
    response = await client.patch(
        f"/api/v1/users/{admin.user_id}", json={"role": "staff"}, headers=admin.headers
    )
    assert response.status_code == 403


async def test_duplicate_user_email_is_conflict(client: httpx.AsyncClient, owner: Account) -> None:
    response = await client.post(
        "/api/v1/users",
        json={"email": owner.email, "name": "x", "password": PASSWORD},
        headers=owner.headers,
    )
    assert response.status_code == 409


async def test_api_key_lifecycle(client: httpx.AsyncClient, owner: Account) -> None:
    created = await client.post(
        "/api/v1/api-keys", json={"name": "Website form", "role": "staff"}, headers=owner.headers
    )
    assert created.status_code == 201
    body = created.json()
    key = body["key"]
    assert key.startswith("kn_") and body["prefix"] in key
    headers = {"Authorization": f"Bearer {key}"}
    me = await client.get("/api/v1/auth/me", headers=headers)
    assert me.status_code == 200
    assert me.json()["user"] is None
    assert me.json()["api_key"]["role"] == "staff"
    assert me.json()["church"]["id"] == owner.church_id
    listed = (await client.get("/api/v1/api-keys", headers=owner.headers)).json()["data"]
    (entry,) = [k for k in listed if k["id"] == body["id"]]
    assert "key" not in entry  # shown once only
    assert entry["last_used_at"] is not None
    # A staff key cannot manage keys.
    assert (await client.get("/api/v1/api-keys", headers=headers)).status_code == 403
    revoked = await client.delete(f"/api/v1/api-keys/{body['id']}", headers=owner.headers)
    assert revoked.status_code == 204
    assert (await client.get("/api/v1/auth/me", headers=headers)).status_code == 401


async def test_malformed_and_forged_api_keys_are_401(client: httpx.AsyncClient) -> None:
    for token in ("kn_short", "kn_AAAAAAAA_" + "B" * 32):
        response = await client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401


async def test_other_church_users_and_keys_are_404(
    client: httpx.AsyncClient, owner: Account, other_church: Account
) -> None:
    key = await client.post("/api/v1/api-keys", json={"name": "k"}, headers=other_church.headers)
    key_id = key.json()["id"]
    assert (
        await client.patch(
            f"/api/v1/users/{other_church.user_id}", json={"name": "x"}, headers=owner.headers
        )
    ).status_code == 404
    assert (
        await client.delete(f"/api/v1/users/{other_church.user_id}", headers=owner.headers)
    ).status_code == 404
    assert (
        await client.delete(f"/api/v1/api-keys/{key_id}", headers=owner.headers)
    ).status_code == 404
    users = (await client.get("/api/v1/users", headers=owner.headers)).json()["data"]
    assert other_church.user_id not in {u["id"] for u in users}
