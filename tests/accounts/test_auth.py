"""Registration, login, refresh rotation and reuse detection, logout, me."""

from __future__ import annotations

import httpx

from tests.support.api import PASSWORD, Account, register


async def test_register_creates_church_and_owner(client: httpx.AsyncClient) -> None:
    account = await register(client, church_name="Grace Chapel")
    me = await client.get("/api/v1/auth/me", headers=account.headers)
    assert me.status_code == 200
    body = me.json()
    assert body["church"]["name"] == "Grace Chapel"
    assert body["church"]["id"] == account.church_id
    assert "phone_number" in body["church"]
    assert body["user"]["role"] == "owner"
    assert "password_hash" not in body["user"]


async def test_register_validates_and_refuses_taken_email(
    client: httpx.AsyncClient, owner: Account
) -> None:
    bad = await client.post(
        "/api/v1/auth/register",
        json={"church_name": "", "name": "x", "email": "nope", "password": "short"},
    )
    assert bad.status_code == 422
    fields = {e["field"] for e in bad.json()["errors"]}
    assert {"church_name", "email", "password"} <= fields
    taken = await client.post(
        "/api/v1/auth/register",
        json={"church_name": "X", "name": "Y", "email": owner.email.upper(), "password": PASSWORD},
    )
    assert taken.status_code == 409
    assert taken.json()["code"] == "conflict"


async def test_register_rejects_unknown_timezone(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/v1/auth/register",
        json={
            "church_name": "X",
            "name": "Y",
            "email": "tz@example.org",
            "password": PASSWORD,
            "timezone": "Mars/Olympus",
        },
    )
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "timezone"


async def test_login_success_and_same_answer_for_unknown_email(
    client: httpx.AsyncClient, owner: Account
) -> None:
    ok = await client.post("/api/v1/auth/login", json={"email": owner.email, "password": PASSWORD})
    assert ok.status_code == 200
    tokens = ok.json()
    assert tokens["token_type"] == "bearer"
    assert tokens["expires_in"] == 900
    wrong = await client.post(
        "/api/v1/auth/login", json={"email": owner.email, "password": "wrong password!"}
    )
    unknown = await client.post(
        "/api/v1/auth/login", json={"email": "nobody@example.org", "password": "whatever123"}
    )
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json()["detail"] == unknown.json()["detail"]
    assert wrong.json()["code"] == "unauthenticated"


async def test_refresh_rotates_and_reuse_revokes_the_family(
    client: httpx.AsyncClient, owner: Account
) -> None:
    first = await client.post("/api/v1/auth/refresh", json={"refresh_token": owner.refresh_token})
    assert first.status_code == 200
    second_token = first.json()["refresh_token"]
    assert second_token != owner.refresh_token
    # The first token again: reuse → 401 and the whole family is revoked …
    reused = await client.post("/api/v1/auth/refresh", json={"refresh_token": owner.refresh_token})
    assert reused.status_code == 401
    assert "already used" in reused.json()["detail"]
    # … so even the legitimate newest token stops working.
    after = await client.post("/api/v1/auth/refresh", json={"refresh_token": second_token})
    assert after.status_code == 401


async def test_refresh_with_garbage_is_401(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/v1/auth/refresh", json={"refresh_token": "x" * 40})
    assert response.status_code == 401


async def test_logout_revokes_the_session(client: httpx.AsyncClient, owner: Account) -> None:
    out = await client.post(
        "/api/v1/auth/logout", json={"refresh_token": owner.refresh_token}, headers=owner.headers
    )
    assert out.status_code == 204
    again = await client.post("/api/v1/auth/refresh", json={"refresh_token": owner.refresh_token})
    assert again.status_code == 401
    wrong = await client.post(
        "/api/v1/auth/logout", json={"refresh_token": "y" * 40}, headers=owner.headers
    )
    assert wrong.status_code == 401


async def test_me_needs_a_valid_token(client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/v1/auth/me")).status_code == 401
    bad = await client.get("/api/v1/auth/me", headers={"Authorization": "Bearer not.a.jwt"})
    assert bad.status_code == 401
    assert bad.headers["content-type"].startswith("application/problem+json")


async def test_church_profile_update(client: httpx.AsyncClient, owner: Account) -> None:
    response = await client.patch(
        "/api/v1/church",
        json={"help_text": "Grace Chapel: reply STOP to opt out.", "timezone": "America/Chicago"},
        headers=owner.headers,
    )
    assert response.status_code == 200, response.text
    assert response.json()["timezone"] == "America/Chicago"
    assert response.json()["help_text"].startswith("Grace Chapel")
