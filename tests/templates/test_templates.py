"""Templates: merge-field validation on save, CRUD, rendering."""

from __future__ import annotations

import httpx
from hypothesis import given
from hypothesis import strategies as st

from koinonia.templates.rendering import problems, render
from tests.support.api import Account


def test_render_fills_fields_and_collapses_gaps() -> None:
    body = "Hi {{ first_name }} {{last_name}}, welcome to {{church_name}}!"
    values = {"first_name": "Ada", "last_name": None, "church_name": "Grace"}
    assert render(body, values) == "Hi Ada , welcome to Grace!"
    assert render("No fields", {}) == "No fields"


def test_problems_found() -> None:
    assert problems("Hi {{first_name}}") == []
    assert "unknown merge field" in problems("Hi {{nickname}}")[0].message
    assert "unmatched" in problems("Hi {{first_name}")[0].message
    assert "unmatched" in problems("Hi }} there")[0].message


@given(st.text(max_size=200))
def test_render_never_fails_on_valid_bodies(body: str) -> None:
    if not problems(body):
        render(body, {"first_name": "A", "last_name": "B", "church_name": "C"})


async def test_template_crud_and_validation(client: httpx.AsyncClient, owner: Account) -> None:
    headers = owner.headers
    bad = await client.post(
        "/api/v1/templates", json={"name": "x", "body": "Hi {{nick}}"}, headers=headers
    )
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["field"] == "body"
    created = await client.post(
        "/api/v1/templates",
        json={"name": "Reminder", "body": "Hi {{first_name}}, see you at {{church_name}}"},
        headers=headers,
    )
    assert created.status_code == 201
    template = created.json()
    assert template["merge_fields"] == ["church_name", "first_name"]
    url = f"/api/v1/templates/{template['id']}"
    dup = await client.post(
        "/api/v1/templates", json={"name": "reminder", "body": "x"}, headers=headers
    )
    assert dup.status_code == 409
    rendered = await client.post(f"{url}/render", json={"first_name": "Ada"}, headers=headers)
    me = (await client.get("/api/v1/auth/me", headers=headers)).json()
    assert rendered.json()["text"] == f"Hi Ada, see you at {me['church']['name']}"
    bad_patch = await client.patch(url, json={"body": "{{oops"}, headers=headers)
    assert bad_patch.status_code == 422
    patched = await client.patch(url, json={"body": "Bye {{last_name}}"}, headers=headers)
    assert patched.json()["merge_fields"] == ["last_name"]
    listed = (await client.get("/api/v1/templates", headers=headers)).json()["data"]
    assert [t["id"] for t in listed] == [template["id"]]
    assert (await client.delete(url, headers=headers)).status_code == 204
    assert (await client.get(url, headers=headers)).status_code == 404
