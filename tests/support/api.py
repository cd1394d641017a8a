"""Helpers that drive the public API the way a client does."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import httpx

PASSWORD = "correct horse battery"


@dataclass
class Account:
    church_id: str
    user_id: str
    email: str
    access_token: str
    refresh_token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"}


async def register(client: httpx.AsyncClient, **overrides: Any) -> Account:
    body = {
        "church_name": f"Church {uuid.uuid4().hex[:6]}",
        "name": "Ruth Miller",
        "email": f"owner-{uuid.uuid4().hex[:10]}@example.org",
        "password": PASSWORD,
    } | overrides
    response = await client.post("/api/v1/auth/register", json=body)
    assert response.status_code == 201, response.text
    data = response.json()
    return Account(
        church_id=data["church"]["id"],
        user_id=data["user"]["id"],
        email=body["email"],
        access_token=data["access_token"],
        refresh_token=data["refresh_token"],
    )


async def add_user(client: httpx.AsyncClient, manager: Account, role: str = "staff") -> Account:
    email = f"{role}-{uuid.uuid4().hex[:10]}@example.org"
    created = await client.post(
        "/api/v1/users",
        json={"email": email, "name": "Staff Person", "role": role, "password": PASSWORD},
        headers=manager.headers,
    )
    assert created.status_code == 201, created.text
    login = await client.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD})
    assert login.status_code == 200, login.text
    tokens = login.json()
    return Account(
        manager.church_id,
        created.json()["id"],
        email,
        tokens["access_token"],
        tokens["refresh_token"],
    )


async def add_member(
    client: httpx.AsyncClient, account: Account, phone: str | None = None, **fields: Any
) -> dict[str, Any]:
    body = {"first_name": "Ada", "last_name": "Lovelace", "phone": phone or random_phone()}
    response = await client.post("/api/v1/members", json=body | fields, headers=account.headers)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


def random_phone() -> str:
    """A valid US mobile-shaped number (area code 415, exchange 2xx-9xx, line ≥ 1000)."""
    digits = uuid.uuid4().int
    # Never ending in 0000-0002: the sandbox plays those as opted out, landline, invalid.
    return f"+1415{200 + digits % 800}{1000 + (digits >> 16) % 9000:04d}"
