"""The church's sending window and time zone through `PATCH /church` and `GET /auth/me`."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.support.api import Account, add_user, register


async def patch_church(client: httpx.AsyncClient, account: Account, **body: Any) -> httpx.Response:
    return await client.patch("/api/v1/church", json=body, headers=account.headers)


async def me_church(client: httpx.AsyncClient, account: Account) -> dict[str, Any]:
    response = await client.get("/api/v1/auth/me", headers=account.headers)
    assert response.status_code == 200, response.text
    church: dict[str, Any] = response.json()["church"]
    return church


async def test_a_new_church_shows_the_default_window(client: httpx.AsyncClient) -> None:
    account = await register(client, timezone="Pacific/Auckland")
    church = await me_church(client, account)
    assert church["timezone"] == "Pacific/Auckland"
    assert church["send_window_start"] == "08:00"
    assert church["send_window_end"] == "20:00"
    assert "quiet_hours_start" not in church


async def test_owner_sets_window_and_timezone(client: httpx.AsyncClient, owner: Account) -> None:
    response = await patch_church(
        client,
        owner,
        send_window_start="09:30",
        send_window_end="21:05",
        timezone="Australia/Lord_Howe",
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["send_window_start"] == "09:30"
    assert body["send_window_end"] == "21:05"
    assert body["timezone"] == "Australia/Lord_Howe"
    church = await me_church(client, owner)
    assert (church["send_window_start"], church["send_window_end"]) == ("09:30", "21:05")
    assert church["timezone"] == "Australia/Lord_Howe"


async def test_window_wrapping_midnight_or_always_open_is_accepted(
    client: httpx.AsyncClient, owner: Account
) -> None:
    wraps = await patch_church(client, owner, send_window_start="22:00", send_window_end="06:00")
    assert wraps.status_code == 200, wraps.text
    assert (wraps.json()["send_window_start"], wraps.json()["send_window_end"]) == (
        "22:00",
        "06:00",
    )
    always = await patch_church(client, owner, send_window_start="00:00", send_window_end="00:00")
    assert always.status_code == 200, always.text
    assert always.json()["send_window_end"] == "00:00"


async def test_one_bound_alone_leaves_the_other(client: httpx.AsyncClient, owner: Account) -> None:
    response = await patch_church(client, owner, send_window_end="23:59")
    assert response.status_code == 200, response.text
    assert response.json()["send_window_start"] == "08:00"
    assert response.json()["send_window_end"] == "23:59"
    renamed = await patch_church(client, owner, name="Grace Chapel")
    assert renamed.json()["send_window_end"] == "23:59"


@pytest.mark.parametrize(
    "value",
    ["24:00", "8:00", "08:60", "08:00:00", "0800", "08:00 PM", "", "noon", 800, None, "08:00Z"],
)
async def test_bad_window_times_answer_422_naming_the_field(
    client: httpx.AsyncClient, owner: Account, value: object
) -> None:
    response = await patch_church(client, owner, send_window_start=value)
    if value is None:  # null leaves the field as it is, like the other profile fields
        assert response.status_code == 200, response.text
        assert response.json()["send_window_start"] == "08:00"
        return
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["code"] == "validation_error"
    assert [e["field"] for e in problem["errors"]] == ["send_window_start"]
    assert "HH:MM" in problem["errors"][0]["message"]
    assert (await me_church(client, owner))["send_window_start"] == "08:00"


async def test_bad_end_is_refused_and_nothing_changes(
    client: httpx.AsyncClient, owner: Account
) -> None:
    response = await patch_church(client, owner, send_window_start="07:00", send_window_end="25:00")
    assert response.status_code == 422
    assert [e["field"] for e in response.json()["errors"]] == ["send_window_end"]
    church = await me_church(client, owner)
    assert (church["send_window_start"], church["send_window_end"]) == ("08:00", "20:00")


@pytest.mark.parametrize(
    "zone", ["Mars/Olympus", "america/new_york", "localtime", "posixrules", "right/UTC", ""]
)
async def test_timezone_must_be_an_iana_zone(
    client: httpx.AsyncClient, owner: Account, zone: str
) -> None:
    response = await patch_church(client, owner, timezone=zone)
    assert response.status_code == 422, response.text
    assert [e["field"] for e in response.json()["errors"]] == ["timezone"]
    assert (await me_church(client, owner))["timezone"] == "America/New_York"


async def test_register_refuses_a_file_that_is_not_a_zone(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/v1/auth/register",
        json={
            "church_name": "X",
            "name": "Y",
            "email": "posix-zone@example.org",
            "password": "correct horse battery",
            "timezone": "posix/America/New_York",
        },
    )
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "timezone"


async def test_admin_may_change_the_window_and_staff_may_not(
    client: httpx.AsyncClient, owner: Account
) -> None:
    admin = await add_user(client, owner, role="admin")
    staff = await add_user(client, owner, role="staff")
    allowed = await patch_church(client, admin, send_window_start="10:00", timezone="UTC")
    assert allowed.status_code == 200, allowed.text
    refused = await patch_church(client, staff, send_window_start="05:00")
    assert refused.status_code == 403
    refused_tz = await patch_church(client, staff, timezone="Asia/Kolkata")
    assert refused_tz.status_code == 403
    church = await me_church(client, staff)  # staff still see the window
    assert church["send_window_start"] == "10:00"
    assert church["timezone"] == "UTC"


async def test_a_church_changes_only_its_own_window(
    client: httpx.AsyncClient, owner: Account, other_church: Account
) -> None:
    assert (await patch_church(client, owner, send_window_end="18:00")).status_code == 200
    assert (await me_church(client, other_church))["send_window_end"] == "20:00"


async def test_openapi_documents_the_window_as_hh_mm(client: httpx.AsyncClient) -> None:
    schemas = (await client.get("/api/openapi.json")).json()["components"]["schemas"]
    update = schemas["ChurchUpdate"]["properties"]["send_window_start"]
    assert any(option.get("pattern") for option in update["anyOf"])
    shown = schemas["ChurchOut"]["properties"]["send_window_end"]
    assert shown["type"] == "string"
