"""The published OpenAPI document: security, operation ids, every answer documented
(issue 12, item 14), and the findings of the contract fuzzing (scripts/contract-test)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

SPEC = "/api/openapi.json"


@pytest.fixture(scope="module")
async def spec(client: httpx.AsyncClient) -> dict[str, Any]:
    answer = await client.get(SPEC)
    assert answer.status_code == 200
    document: dict[str, Any] = answer.json()
    return document


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, operation)
        for path, methods in spec["paths"].items()
        for method, operation in methods.items()
    ]


async def test_bearer_security_scheme(spec: dict[str, Any]) -> None:
    schemes = spec["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schemes["bearerAuth"]["description"],
    }
    by_id = {op["operationId"]: op for _, _, op in operations(spec)}
    assert by_id["members.list_members"]["security"] == [{"bearerAuth": []}]
    assert by_id["operations.list_dead_letters"]["security"] == [{"bearerAuth": []}]
    # Either a token or a challenge in the body.
    assert by_id["auth.mfa_enrol"]["security"] == [{"bearerAuth": []}, {}]
    for public in ("auth.register", "auth.login", "health.livez", "webhooks.stripe_webhook"):
        assert "security" not in by_id[public], public


async def test_short_unique_operation_ids(spec: dict[str, Any]) -> None:
    ids = [op.get("operationId") for _, _, op in operations(spec)]
    assert all(ids), "every operation has an operationId"
    assert len(ids) == len(set(ids))
    for op_id in ids:
        assert "_api_v1_" not in op_id and not op_id.endswith(("_get", "_post")), op_id
    assert "auth.register" in ids
    assert "members.list_members" in ids


async def test_every_answer_is_documented(spec: dict[str, Any]) -> None:
    for method, path, operation in operations(spec):
        documented = operation["responses"]
        assert "422" in documented, (method, path)
        assert {"414", "500"} <= set(documented), (method, path)
        if "application/json" in operation.get("requestBody", {}).get("content", {}):
            assert {"400", "413"} <= set(documented), (method, path)
        if "security" in operation:
            assert {"401", "429"} <= set(documented), (method, path)
    start = spec["paths"]["/api/v1/conversations"]["post"]["responses"]
    assert {"200", "201"} <= set(start)
    assert start["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ConversationOut"
    }


async def test_links_lead_from_create_to_the_item(spec: dict[str, Any]) -> None:
    created = spec["paths"]["/api/v1/groups"]["post"]["responses"]["201"]["links"]
    assert created["groups.get_group"] == {
        "operationId": "groups.get_group",
        "parameters": {"group_id": "$response.body#/id"},
    }
    register = spec["paths"]["/api/v1/auth/register"]["post"]["responses"]["201"]["links"]
    assert register["auth.login"]["requestBody"]["email"] == "$request.body#/email"


async def test_malformed_json_answers_the_documented_400(
    client: httpx.AsyncClient, owner: Any, spec: dict[str, Any]
) -> None:
    # A body that cannot be read as JSON text at all (not UTF-8): FastAPI answers 400.
    answer = await client.post(
        "/api/v1/groups",
        content=b'{"name": "\xff"}',
        headers={**owner.headers, "Content-Type": "application/json"},
    )
    assert answer.status_code == 400, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert "400" in spec["paths"]["/api/v1/groups"]["post"]["responses"]


async def test_dead_letter_ids_beyond_bigint_are_422(
    client: httpx.AsyncClient, tenant_factory: Any
) -> None:
    """Found by the contract fuzzing: `GET /admin/dlq/9822740596199788642304` was a 500
    (`database_error`: the id overflowed PostgreSQL's bigint)."""
    operator = await tenant_factory(is_operator=True)
    huge = 9822740596199788642304
    for method, path in [
        ("GET", f"/api/v1/admin/dlq/{huge}"),
        ("DELETE", f"/api/v1/admin/dlq/{huge}"),
        ("POST", f"/api/v1/admin/dlq/{huge}/replay"),
        ("GET", f"/api/v1/admin/dlq/{2**63}"),
        ("GET", "/api/v1/admin/dlq/0"),
    ]:
        answer = await client.request(method, path, headers=operator.headers)
        assert answer.status_code == 422, (method, path, answer.text)
        assert answer.json()["code"] == "validation_error"
    largest = await client.get(f"/api/v1/admin/dlq/{2**63 - 1}", headers=operator.headers)
    assert largest.status_code == 404
    bulk = await client.post(
        "/api/v1/admin/dlq/replay", json={"ids": [huge]}, headers=operator.headers
    )
    assert bulk.status_code == 422, bulk.text
