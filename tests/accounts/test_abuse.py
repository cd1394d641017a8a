"""Abuse paths (issue 12, seen 8 and 11): failed authentications limited per client IP
before any database work, the login lockout keyed by email AND IP, `/auth/refresh`
limited, and `Cache-Control: no-store` on authenticated answers."""

from __future__ import annotations

import secrets
import string
import uuid
from typing import Any

from prometheus_client import REGISTRY

from koinonia.settings import Settings
from tests.accounts.test_revocation import app_client, counting_statements
from tests.support.api import PASSWORD, register


def _ip() -> str:
    return f"198.19.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250 + 1}"


def _random_key() -> str:
    alphabet = string.ascii_letters + string.digits
    pick = lambda n: "".join(secrets.choice(alphabet) for _ in range(n))  # noqa: E731
    return f"kn_{pick(8)}_{pick(32)}"


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_garbage_api_keys_are_limited_per_ip_before_the_database(
    settings: Settings, redis: Any
) -> None:
    async with app_client(settings, rate_limit_auth_failures_per_minute=3) as (app, client):
        statuses, queries = [], []
        for _ in range(6):
            with counting_statements(app.state.database.engine) as statements:
                response = await client.get("/api/v1/members", headers=_bearer(_random_key()))
            statuses.append(response.status_code)
            queries.append(len(statements))
        assert statuses == [401, 401, 401, 429, 429, 429]
        assert queries[3:] == [0, 0, 0]  # refused before any database work
        refused = await client.get("/api/v1/members", headers=_bearer(_random_key()))
        assert refused.json()["code"] == "rate_limited"
        assert int(refused.headers["Retry-After"]) >= 1
    rejected = REGISTRY.get_sample_value(
        "koinonia_rate_limit_rejections_total", {"policy": "auth_failures"}
    )
    assert rejected is not None and rejected >= 3


async def test_garbage_tokens_count_and_valid_tokens_keep_working(
    settings: Settings, redis: Any
) -> None:
    ip = _ip()
    async with app_client(settings, client_ip=ip) as (_, client):
        account = await register(client)
        assert (await client.get("/api/v1/auth/me", headers=account.headers)).status_code == 200
    async with app_client(settings, client_ip=ip, rate_limit_auth_failures_per_minute=3) as (
        _,
        client,
    ):
        statuses = [
            (await client.get("/api/v1/members", headers=_bearer(f"garbage.{i}.x"))).status_code
            for i in range(5)
        ]
        assert statuses == [401, 401, 401, 429, 429]
        # A genuine token whose version Redis holds costs no database work to check, so
        # it is not refused (one that would need the database is, like an API key).
        me = await client.get("/api/v1/auth/me", headers=account.headers)
        assert me.status_code == 200


async def test_failed_logins_and_refreshes_share_the_ip_failure_limit(
    settings: Settings, redis: Any
) -> None:
    ip = _ip()
    async with app_client(settings, client_ip=ip) as (_, client):
        account = await register(client)
    async with app_client(settings, client_ip=ip, rate_limit_auth_failures_per_minute=3) as (
        app,
        client,
    ):
        for i in range(2):
            wrong = await client.post(
                "/api/v1/auth/login", json={"email": f"n{i}@example.org", "password": "nope"}
            )
            assert wrong.status_code == 401
        bad = await client.post("/api/v1/auth/refresh", json={"refresh_token": "x" * 64})
        assert bad.status_code == 401
        # Over the limit: refused before the password is checked or the database read.
        with counting_statements(app.state.database.engine) as statements:
            login = await client.post(
                "/api/v1/auth/login", json={"email": account.email, "password": PASSWORD}
            )
            refresh = await client.post(
                "/api/v1/auth/refresh", json={"refresh_token": account.refresh_token}
            )
        assert (login.status_code, refresh.status_code) == (429, 429)
        assert statements == []


async def test_lockout_is_keyed_by_email_and_ip(settings: Settings, redis: Any) -> None:
    async with app_client(settings, client_ip=_ip()) as (_, victim_client):
        victim = await register(victim_client)
        # Seen: anyone could keep a known staff member locked out from anywhere.
        async with app_client(settings, client_ip=_ip(), login_lockout_failures=3) as (
            _,
            attacker,
        ):
            for _ in range(3):
                wrong = await attacker.post(
                    "/api/v1/auth/login", json={"email": victim.email, "password": "guess-1234"}
                )
                assert wrong.status_code == 401
            locked = await attacker.post(
                "/api/v1/auth/login", json={"email": victim.email, "password": PASSWORD}
            )
            assert locked.status_code == 429
            assert int(locked.headers["Retry-After"]) > 0
        login = await victim_client.post(
            "/api/v1/auth/login", json={"email": victim.email, "password": PASSWORD}
        )
        assert login.status_code == 200


async def test_refresh_is_limited_per_ip(settings: Settings, redis: Any) -> None:
    ip = _ip()
    async with app_client(settings, client_ip=ip) as (_, client):
        account = await register(client)
    async with app_client(settings, client_ip=ip, rate_limit_refresh_per_minute=3) as (
        _,
        client,
    ):
        token, statuses = account.refresh_token, []
        for _ in range(4):
            response = await client.post("/api/v1/auth/refresh", json={"refresh_token": token})
            statuses.append(response.status_code)
            if response.status_code == 200:
                token = response.json()["refresh_token"]
                assert response.headers["RateLimit-Limit"] == "3"
        assert statuses == [200, 200, 200, 429]


async def test_authenticated_answers_are_not_stored(settings: Settings, redis: Any) -> None:
    origin = "http://localhost:3000"
    async with app_client(settings) as (_, client):
        registered = await client.post(
            "/api/v1/auth/register",
            json={
                "church_name": "No Store",
                "name": "Ruth",
                "email": f"ns-{uuid.uuid4().hex[:8]}@example.org",
                "password": PASSWORD,
            },
        )
        assert registered.headers["cache-control"] == "no-store"  # it carries tokens
        headers = _bearer(registered.json()["access_token"]) | {
            "Origin": origin,
            "X-Request-ID": "req-no-store-1",
        }
        answers = [
            await client.get("/api/v1/auth/me", headers=headers),
            await client.get(f"/api/v1/members/{uuid.uuid4()}", headers=headers),
            await client.get("/api/v1/auth/me", headers=_bearer("garbage")),
        ]
        assert [a.status_code for a in answers] == [200, 404, 401]
        for answer in answers:
            assert answer.headers["cache-control"] == "no-store"
            # Every other header the middleware adds is still there.
            assert answer.headers["x-content-type-options"] == "nosniff"
            assert answer.headers["content-security-policy"].startswith("default-src 'none'")
            assert "x-request-id" in answer.headers
        assert answers[0].headers["x-request-id"] == "req-no-store-1"
        assert answers[0].headers["access-control-allow-origin"] == origin
        assert answers[0].headers["ratelimit-limit"] == "1000"
        big = await client.get(
            "/api/v1/members?limit=200", headers=headers | {"Accept-Encoding": "gzip"}
        )
        assert big.headers["cache-control"] == "no-store"
        # Public answers keep their own caching.
        spec = await client.get("/api/openapi.json", headers={"Accept-Encoding": "gzip"})
        assert "cache-control" not in spec.headers
        assert spec.headers["content-encoding"] == "gzip"
