"""Every bad input is a clear 4xx, validated once at the edge (issue 12, input part).

Text PostgreSQL or SMS cannot carry, Unicode digits in phones, tampered cursors, unknown
phone regions, preview vs send, and CSV cells — all through the HTTP API.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from koinonia.settings import Settings
from tests.messaging.conftest import give_number
from tests.support.api import Account, add_member, add_user, random_phone

NUL = "\u0000"


def _assert_refused(response: httpx.Response, field: str) -> None:
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["code"] == "validation_error", problem
    assert field in [e["field"] for e in problem["errors"]], problem


# --- text fields and query parameters -------------------------------------------------


async def _targets(client: httpx.AsyncClient, owner: Account) -> dict[str, str]:
    """Real resources of `owner`'s church to PATCH and reply to."""
    member = await add_member(client, owner)
    group = await client.post("/api/v1/groups", json={"name": "Choir"}, headers=owner.headers)
    template = await client.post(
        "/api/v1/templates", json={"name": "Hi", "body": "Hello"}, headers=owner.headers
    )
    staff = await add_user(client, owner)
    return {
        "member": member["id"],
        "group": group.json()["id"],
        "template": template.json()["id"],
        "user": staff.user_id,
    }


def _cases(ids: dict[str, str], bad: str) -> list[tuple[str, str, dict[str, Any], str]]:
    member, group, template, user = ids["member"], ids["group"], ids["template"], ids["user"]
    return [
        ("POST", "/api/v1/members", {"first_name": bad, "phone": random_phone()}, "first_name"),
        ("POST", "/api/v1/members", {"last_name": f"Lee{bad}", "phone": "4155550100"}, "last_name"),
        ("PATCH", f"/api/v1/members/{member}", {"first_name": bad}, "first_name"),
        ("POST", "/api/v1/groups", {"name": f"Youth{bad}"}, "name"),
        ("POST", "/api/v1/groups", {"name": "Youth", "description": bad}, "description"),
        ("PATCH", f"/api/v1/groups/{group}", {"description": bad}, "description"),
        ("POST", "/api/v1/templates", {"name": bad, "body": "Hi"}, "name"),
        ("POST", "/api/v1/templates", {"name": "T", "body": f"Hi{bad}"}, "body"),
        ("PATCH", f"/api/v1/templates/{template}", {"body": bad}, "body"),
        ("PATCH", "/api/v1/church", {"name": f"Grace{bad}"}, "name"),
        ("PATCH", "/api/v1/church", {"help_text": bad}, "help_text"),
        (
            "POST",
            "/api/v1/users",
            {
                "email": f"s-{uuid.uuid4().hex[:8]}@example.org",
                "name": bad,
                "role": "staff",
                "password": "correct horse battery",
            },
            "name",
        ),
        ("PATCH", f"/api/v1/users/{user}", {"name": bad}, "name"),
        ("POST", "/api/v1/api-keys", {"name": bad}, "name"),
        ("POST", "/api/v1/messages", {"body": bad, "member_ids": [member]}, "body"),
        ("POST", "/api/v1/messages/preview", {"body": bad, "member_ids": [member]}, "body"),
        ("POST", "/api/v1/conversations", {"member_id": member, "body": bad}, "body"),
        ("POST", f"/api/v1/conversations/{uuid.uuid4()}/messages", {"body": bad}, "body"),
        ("POST", f"/api/v1/groups/{group}/members", {"member_ids": [member, bad]}, "member_ids.1"),
    ]


@pytest.mark.parametrize(
    "bad",
    [NUL, f"Ada{NUL}", "\u0007", "Ada\u001bLovelace"],
    ids=["nul", "nul-inside", "bell", "escape"],
)
async def test_unsafe_text_in_any_body_field_is_422_naming_it(
    client: httpx.AsyncClient, owner: Account, bad: str
) -> None:
    ids = await _targets(client, owner)
    for method, url, body, field in _cases(ids, bad):
        response = await client.request(method, url, json=body, headers=owner.headers)
        _assert_refused(response, field)
    # Tab, line feed and carriage return stay allowed (multi-line texts).
    text = "Hi {{first_name}},\r\n\tsee you Sunday"
    created = await client.post(
        "/api/v1/templates", json={"name": f"Multi {bad!r}", "body": text}, headers=owner.headers
    )
    assert created.status_code == 201, created.text
    assert created.json()["body"] == text


async def test_registration_and_login_text_is_checked_too(client: httpx.AsyncClient) -> None:
    registered = await client.post(
        "/api/v1/auth/register",
        json={
            "church_name": f"Grace{NUL}",
            "name": "Ruth",
            "email": f"o-{uuid.uuid4().hex[:8]}@example.org",
            "password": "correct horse battery",
        },
    )
    _assert_refused(registered, "church_name")
    login = await client.post(
        "/api/v1/auth/login", json={"email": "a@example.org", "password": f"pw{NUL}pw-long"}
    )
    _assert_refused(login, "password")
    # JSON can spell a lone surrogate; UTF-8 (PostgreSQL, SMS) cannot carry it.
    surrogate = await client.post(
        "/api/v1/auth/login",
        content=b'{"email": "a@example.org", "password": "long-password\\ud800"}',
        headers={"Content-Type": "application/json"},
    )
    _assert_refused(surrogate, "password")


@pytest.mark.parametrize(
    ("url", "params", "field"),
    [
        ("/api/v1/members", {"q": f"Ada{NUL}"}, "q"),
        ("/api/v1/members", {"q": "\u0002"}, "q"),
        ("/api/v1/messages", {"status": NUL}, "status"),
    ],
)
async def test_unsafe_text_in_query_parameters_is_422_naming_it(
    client: httpx.AsyncClient, owner: Account, url: str, params: dict[str, str], field: str
) -> None:
    response = await client.get(url, params=params, headers=owner.headers)
    _assert_refused(response, field)


# --- CSV import: a bad cell is a row error ---------------------------------------------


async def _upload(client: httpx.AsyncClient, account: Account, content: bytes) -> httpx.Response:
    return await client.post(
        "/api/v1/members/import",
        files={"file": ("people.csv", content, "text/csv")},
        headers=account.headers,
    )


async def test_nul_in_one_csv_cell_is_a_row_error_and_the_rest_is_imported(
    client: httpx.AsyncClient, owner: Account
) -> None:
    content = (
        b"first_name,last_name,phone\n"
        b"Ada,Lovelace,+14155550301\n"
        b"Gr\x00ace,Hopper,+14155550302\n"
        b"Alan,Tur\x07ing,+14155550303\n"
        b"Edsger,Dijkstra,+14155550304\n"
    )
    response = await _upload(client, owner, content)
    assert response.status_code == 201, response.text
    result = response.json()
    assert result["status"] == "completed", result
    assert result["created"] == 2
    assert result["skipped"] == 2
    assert [(e["row"], e["field"]) for e in result["errors"]] == [
        (3, "first_name"),
        (4, "last_name"),
    ]
    assert "NUL" in result["errors"][0]["message"]


async def test_nul_in_a_csv_cell_of_a_job_import_is_a_row_error(
    settings: Settings, redis: Any
) -> None:
    from koinonia.app import create_app
    from koinonia.jobs import build_job_app, open_resources
    from tests.conftest import make_settings
    from tests.support.api import register

    job_settings = make_settings(database_url=settings.database_url, import_inline_max_bytes=10)
    app = create_app(job_settings)
    rows = "".join(f"Person{i},+1415556{i:04d}\n" for i in range(300))
    rows += "Bad\x00Name,+14155569999\n"
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        account = await register(client)
        accepted = await _upload(client, account, ("name,phone\n" + rows).encode())
        assert accepted.status_code == 202, accepted.text
        job_app = build_job_app(job_settings)
        async with job_app.open_async(), open_resources(job_settings, job_app):
            await job_app.run_worker_async(queues=["imports"], wait=False)
        done = (await client.get(accepted.headers["Location"], headers=account.headers)).json()
    assert done["status"] == "completed", done
    assert {"row": 302, "field": "name"} in [
        {"row": e["row"], "field": e["field"]} for e in done["errors"]
    ]
    assert done["created"] + done["skipped"] == 301
    assert done["created"] > 0


async def test_nul_in_column_map_is_422(client: httpx.AsyncClient, owner: Account) -> None:
    response = await client.post(
        "/api/v1/members/import",
        files={"file": ("people.csv", b"Cell\n4155550101\n", "text/csv")},
        data={"column_map": json.dumps({"phone": "Cell\u0000"})},
        headers=owner.headers,
    )
    _assert_refused(response, "column_map")


# --- phones: Unicode digits are the same phone ----------------------------------------


async def test_unicode_digits_are_stored_as_ascii_e164(
    client: httpx.AsyncClient, owner: Account
) -> None:
    written = ["+1 212 5٥٥ ٠١٢٣", "+1 ２１２ ５５５ ０１２３", "(२१२) ५५५-०१२३", "212 5５5 0123"]
    created = await client.post(
        "/api/v1/members", json={"first_name": "Twin", "phone": written[0]}, headers=owner.headers
    )
    assert created.status_code == 201, created.text
    assert created.json()["phone"] == "+12125550123"
    for again in [*written[1:], "+1 (212) 555-0123"]:
        duplicate = await client.post(
            "/api/v1/members", json={"phone": again}, headers=owner.headers
        )
        assert duplicate.status_code == 409, (again, duplicate.text)
    found = await client.get("/api/v1/members", params={"q": "+12125550123"}, headers=owner.headers)
    assert [m["id"] for m in found.json()["data"]] == [created.json()["id"]]


# --- cursors ---------------------------------------------------------------------------


def _cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


TAMPERED = {
    "true": _cursor([True]),
    "huge": _cursor([10**30]),
    "huge-pair": _cursor(["2024-01-01T00:00:00+00:00", 10**30]),
    "bool-pair": _cursor(["2024-01-01T00:00:00+00:00", True]),
    "number-as-uuid": _cursor(["2024-01-01T00:00:00+00:00", 10**31]),
    "garbage": "%%%not-base64%%%",
    "not-json": base64.urlsafe_b64encode(b"\xff\xfe").decode(),
    "object": _cursor({"a": 1}),
    "empty": _cursor([]),
    "too-many": _cursor(["2024-01-01T00:00:00+00:00", str(uuid.uuid4()), 1]),
    "too-few": _cursor(["2024-01-01T00:00:00+00:00"]),
}
LISTS = [
    "/api/v1/members",
    "/api/v1/groups",
    "/api/v1/templates",
    "/api/v1/users",
    "/api/v1/api-keys",
    "/api/v1/messages",
    "/api/v1/conversations",
]


def _assert_bad_cursor(response: httpx.Response) -> None:
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "invalid_cursor", response.text
    assert response.json()["errors"][0]["field"] == "cursor"


async def test_every_tampered_cursor_is_422_invalid_cursor(
    client: httpx.AsyncClient, owner: Account
) -> None:
    for url in LISTS:
        for name, cursor in TAMPERED.items():
            response = await client.get(url, params={"cursor": cursor}, headers=owner.headers)
            try:
                _assert_bad_cursor(response)
            except AssertionError as error:
                raise AssertionError(f"{url} with the {name} cursor: {error}") from None


async def test_tampered_recipient_cursors_are_422(
    client: httpx.AsyncClient, app: FastAPI, settings: Settings, owner: Account
) -> None:
    await give_number(app, settings, owner.church_id, 100)
    member = await add_member(client, owner)
    sent = await client.post(
        "/api/v1/messages",
        json={"body": "Choir at 7", "member_ids": [member["id"]]},
        headers=owner.headers,
    )
    assert sent.status_code in (201, 202), sent.text
    url = f"/api/v1/messages/{sent.json()['id']}/recipients"
    for cursor in (_cursor([True]), _cursor([10**30]), _cursor([1, 2]), _cursor(["1"])):
        _assert_bad_cursor(await client.get(url, params={"cursor": cursor}, headers=owner.headers))
    fine = await client.get(url, params={"cursor": _cursor([0])}, headers=owner.headers)
    assert fine.status_code == 200, fine.text


# --- church settings -------------------------------------------------------------------


async def test_default_region_must_be_known_to_the_phone_library(
    client: httpx.AsyncClient, owner: Account
) -> None:
    refused = await client.patch(
        "/api/v1/church", json={"default_region": "ZZ"}, headers=owner.headers
    )
    _assert_refused(refused, "default_region")
    accepted = await client.patch(
        "/api/v1/church", json={"default_region": "GB"}, headers=owner.headers
    )
    assert accepted.status_code == 200, accepted.text
    member = await add_member(client, owner, phone="020 7946 0958")
    assert member["phone"] == "+442079460958"
    registered = await client.post(
        "/api/v1/auth/register",
        json={
            "church_name": "Nowhere",
            "name": "Ruth",
            "email": f"o-{uuid.uuid4().hex[:8]}@example.org",
            "password": "correct horse battery",
            "default_region": "ZZ",
        },
    )
    _assert_refused(registered, "default_region")


# --- preview validates exactly as send -------------------------------------------------


async def test_preview_refuses_what_send_refuses(
    client: httpx.AsyncClient, app: FastAPI, settings: Settings, owner: Account
) -> None:
    await give_number(app, settings, owner.church_id, 10_000)
    member = await add_member(client, owner)
    audience = {"member_ids": [member["id"]]}
    ten_segments = "a" * 1530  # GSM-7: 153 characters a segment once split
    for body, field in ((" \n ", "body"), ("a" * 1531, "body"), ("b" * 1600, "body")):
        for url in ("/api/v1/messages/preview", "/api/v1/messages"):
            response = await client.post(url, json={"body": body} | audience, headers=owner.headers)
            _assert_refused(response, field)
    preview = await client.post(
        "/api/v1/messages/preview", json={"body": ten_segments} | audience, headers=owner.headers
    )
    assert preview.status_code == 200, preview.text
    assert preview.json()["segments"] == 10
    sent = await client.post(
        "/api/v1/messages", json={"body": ten_segments} | audience, headers=owner.headers
    )
    assert sent.status_code in (201, 202), sent.text
