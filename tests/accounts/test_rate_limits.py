"""Rate limits: per principal (sustained + burst), per IP on login/registration, lockout,
allow-list, and the in-process fallback when Redis is down."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from koinonia.app import create_app
from koinonia.ratelimit import InProcessLimiter, Policy, gcra
from koinonia.settings import Settings
from tests.conftest import make_settings
from tests.support.api import PASSWORD, register
from tests.support.servers import RedisProcess


@asynccontextmanager
async def strict_client(
    settings: Settings, client_ip: str = "203.0.113.7", **overrides: Any
) -> AsyncIterator[httpx.AsyncClient]:
    values: dict[str, Any] = {
        "database_url": settings.database_url,
        "redis_url": settings.redis_url,
        "rate_limit_per_minute": 10,
        "rate_limit_burst": 10,
        "rate_limit_login_per_minute": 3,
        "login_lockout_failures": 3,
    } | overrides
    app = create_app(make_settings(**values))
    transport = httpx.ASGITransport(app=app, client=(client_ip, 40000))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://testserver") as client,
    ):
        yield client


def test_gcra_allows_burst_then_sustained_rate() -> None:
    policy = Policy("t", per_minute=60, burst=5)  # one per second, burst of 5
    tat, now = 0, 1_000_000
    decisions = []
    for _ in range(6):
        decision, tat = gcra(tat, now, policy)
        decisions.append(decision.allowed)
    assert decisions == [True] * 5 + [False]
    denied, _ = gcra(tat, now, policy)
    assert 0 < denied.retry_after_ms <= 1000
    allowed, _ = gcra(tat, now + 1000, policy)  # one interval later: one more
    assert allowed.allowed
    assert denied.headers()["Retry-After"] == "1"


def test_in_process_limiter_is_per_key() -> None:
    limiter = InProcessLimiter()
    policy = Policy("t", per_minute=1, burst=1)
    assert limiter.hit("a", policy).allowed
    assert not limiter.hit("a", policy).allowed
    assert limiter.hit("b", policy).allowed


@pytest.mark.parametrize("start_ms", [0, 1, 999, 123_456_789, 2**41 + 7, 10**15 + 3])
def test_in_process_limiter_is_exact_at_any_clock_value(start_ms: int) -> None:
    clock = [start_ms]
    limiter = InProcessLimiter(clock_ms=lambda: clock[0])
    policy = Policy("t", per_minute=60, burst=1)  # one per 1,000 ms
    assert limiter.hit("a", policy).allowed
    assert not limiter.hit("a", policy).allowed
    clock[0] += 999
    assert not limiter.hit("a", policy).allowed
    clock[0] += 1
    assert limiter.hit("a", policy).allowed


async def test_burst_gets_429_with_headers(settings: Settings, redis: Any) -> None:
    async with strict_client(settings) as client:
        account = await register(client)
        statuses = []
        last = None
        for _ in range(12):
            last = await client.get("/api/v1/auth/me", headers=account.headers)
            statuses.append(last.status_code)
        assert statuses[:10] == [200] * 10
        assert statuses[-1] == 429
        assert last is not None
        assert last.json()["code"] == "rate_limited"
        assert int(last.headers["Retry-After"]) >= 1
        assert last.headers["RateLimit-Limit"] == "10"
        assert last.headers["RateLimit-Remaining"] == "0"
        assert "RateLimit-Reset" in last.headers
    ok_headers = (await _fresh_request(settings)).headers
    assert int(ok_headers["RateLimit-Remaining"]) >= 0


async def _fresh_request(settings: Settings) -> httpx.Response:
    async with strict_client(settings, client_ip="203.0.113.8") as client:
        account = await register(client)
        return await client.get("/api/v1/auth/me", headers=account.headers)


async def test_login_is_limited_per_ip(settings: Settings, redis: Any) -> None:
    async with strict_client(settings, client_ip="198.51.100.20") as client:
        statuses = [
            (
                await client.post(
                    "/api/v1/auth/login", json={"email": f"x{i}@example.org", "password": "p"}
                )
            ).status_code
            for i in range(5)
        ]
    assert statuses[:3] == [401, 401, 401]
    assert statuses[3:] == [429, 429]
    rejected = REGISTRY.get_sample_value(
        "koinonia_rate_limit_rejections_total", {"policy": "login"}
    )
    assert rejected is not None and rejected >= 2


async def test_lockout_after_failed_logins(settings: Settings, redis: Any) -> None:
    async with strict_client(settings, rate_limit_login_per_minute=1000) as client:
        account = await register(client)
        for _ in range(3):
            wrong = await client.post(
                "/api/v1/auth/login", json={"email": account.email, "password": "wrong-pass"}
            )
            assert wrong.status_code == 401
        locked = await client.post(
            "/api/v1/auth/login", json={"email": account.email, "password": PASSWORD}
        )
        assert locked.status_code == 429
        assert int(locked.headers["Retry-After"]) > 0


async def test_allowlisted_callers_are_not_limited(settings: Settings, redis: Any) -> None:
    async with strict_client(
        settings, client_ip="10.9.9.5", rate_limit_allowlist="10.9.9.0/24"
    ) as client:
        account = await register(client)
        for _ in range(15):
            response = await client.get("/api/v1/auth/me", headers=account.headers)
            assert response.status_code == 200
            assert "RateLimit-Limit" not in response.headers


async def test_redis_down_falls_back_to_in_process_limits(settings: Settings) -> None:
    server = RedisProcess()
    server.start()
    try:
        async with strict_client(settings, redis_url=server.url) as client:
            account = await register(client)
            server.stop()
            statuses = [
                (await client.get("/api/v1/auth/me", headers=account.headers)).status_code
                for _ in range(12)
            ]
            assert statuses[:10] == [200] * 10
            assert statuses[-1] == 429
            assert REGISTRY.get_sample_value("koinonia_rate_limit_degraded") == 1
    finally:
        server.stop()
