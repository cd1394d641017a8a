"""Revocation on the next request (issue 12, seen 3), at no extra per-request cost.

Deleting, deactivating or changing the role or password of a user ends their access
tokens on the next request; their API keys are revoked, and a key never has more rights
than its creator has now. A warm request costs the same queries and Redis round trips as
before (measured before the change: 2 statements and 1 round trip for `GET /auth/me`).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis
from sqlalchemy import event

from koinonia.accounts import revocation
from koinonia.app import create_app
from koinonia.settings import Settings
from tests.conftest import make_settings
from tests.support.api import PASSWORD, Account, add_user, register
from tests.support.report import REPORTS
from tests.support.servers import RedisProcess

# Measured on the code before this change, same request, same warm-up.
BASELINE_STATEMENTS = 2  # SELECT churches, SELECT users (the endpoint's own reads)
BASELINE_ROUND_TRIPS = 1  # the rate-limit script


@asynccontextmanager
async def app_client(
    settings: Settings, client_ip: str | None = None, **overrides: Any
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    values: dict[str, Any] = {
        "database_url": settings.database_url,
        "redis_url": settings.redis_url,
        "rate_limit_per_minute": 1000,
        "rate_limit_burst": 1000,
    } | overrides
    app = create_app(make_settings(**values))
    ip = client_ip or f"198.18.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250 + 1}"
    transport = httpx.ASGITransport(app=app, client=(ip, 40000))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://testserver") as client,
    ):
        yield app, client


@contextmanager
def counting_statements(*engines: Any) -> Iterator[list[str]]:
    statements: list[str] = []

    def record(*args: Any) -> None:
        statements.append(args[2])

    for engine in engines:
        event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        for engine in engines:
            event.remove(engine.sync_engine, "before_cursor_execute", record)


@contextmanager
def counting_redis_round_trips(app: FastAPI) -> Iterator[list[str]]:
    """Every command or pipeline checks a connection out of the pool once."""
    pool = app.state.redis.connection_pool
    original: Callable[..., Any] = pool.get_connection
    calls: list[str] = []

    async def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(repr(args[:1]))
        return await original(*args, **kwargs)

    pool.get_connection = counted
    try:
        yield calls
    finally:
        del pool.get_connection


async def _commandstats(redis: Redis) -> dict[str, int]:
    info = await redis.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}


async def _me(client: httpx.AsyncClient, headers: dict[str, str]) -> int:
    return (await client.get("/api/v1/auth/me", headers=headers)).status_code


async def _key(client: httpx.AsyncClient, account: Account, role: str = "admin") -> dict[str, str]:
    created = await client.post(
        "/api/v1/api-keys", json={"name": "integration", "role": role}, headers=account.headers
    )
    assert created.status_code == 201, created.text
    return {"Authorization": f"Bearer {created.json()['key']}"}


# --- cost ---------------------------------------------------------------------------


async def test_warm_request_costs_no_extra_query_or_round_trip(settings: Settings) -> None:
    # A private Redis: its command statistics count this request only.
    server = RedisProcess()
    server.start()
    try:
        async with app_client(settings, redis_url=server.url) as (app, client):
            account = await register(client)
            key = await _key(client, account)
            stats = Redis.from_url(server.url)
            try:
                for headers, what in ((account.headers, "token"), (key, "API key")):
                    for _ in range(2):  # warm: version cached, scripts loaded
                        assert await _me(client, headers) == 200
                    before = await _commandstats(stats)
                    with (
                        counting_statements(
                            app.state.database.engine, app.state.database.read_engine
                        ) as statements,
                        counting_redis_round_trips(app) as trips,
                    ):
                        assert await _me(client, headers) == 200
                    after = await _commandstats(stats)
                    delta = {
                        k: n - before.get(k, 0)
                        for k, n in after.items()
                        if k != "info" and n != before.get(k, 0)
                    }
                    REPORTS.append(
                        f"warm GET /auth/me ({what}): {len(statements)} SQL statements "
                        f"(before: {BASELINE_STATEMENTS}), {len(trips)} Redis round trip(s) "
                        f"(before: {BASELINE_ROUND_TRIPS}); Redis commands {delta}"
                    )
                    assert len(statements) == BASELINE_STATEMENTS, statements
                    assert len(trips) == BASELINE_ROUND_TRIPS, trips
                    # One script call; everything else ran inside it.
                    assert delta.get("evalsha") == 1
                    assert set(delta) <= {"evalsha", "time", "get", "set"}
            finally:
                await stats.aclose()
    finally:
        server.stop()


# --- users --------------------------------------------------------------------------


async def test_deleted_users_token_and_keys_stop_at_once(settings: Settings, redis: Any) -> None:
    async with app_client(settings) as (_, client):
        owner = await register(client)
        admin = await add_user(client, owner, "admin")
        other = await add_user(client, owner, "admin")
        key = await _key(client, admin)
        assert await _me(client, admin.headers) == 200
        assert await _me(client, key) == 200
        deleted = await client.delete(f"/api/v1/users/{admin.user_id}", headers=owner.headers)
        assert deleted.status_code == 204
        refused = await client.get("/api/v1/auth/me", headers=admin.headers)
        assert refused.status_code == 401
        assert refused.json()["code"] == "unauthenticated"
        assert await _me(client, key) == 401
        # Seen: the deleted admin reset another admin's password and logged in as them.
        takeover = await client.patch(
            f"/api/v1/users/{other.user_id}",
            json={"password": "attacker-password-1"},
            headers=admin.headers,
        )
        assert takeover.status_code == 401
        login = await client.post(
            "/api/v1/auth/login", json={"email": other.email, "password": PASSWORD}
        )
        assert login.status_code == 200
        assert await _me(client, owner.headers) == 200  # nobody else is affected


async def test_deactivated_users_token_and_keys_stop_at_once(
    settings: Settings, redis: Any
) -> None:
    async with app_client(settings) as (_, client):
        owner = await register(client)
        admin = await add_user(client, owner, "admin")
        key = await _key(client, admin)
        # A key made by that key acts for the same user and goes with them.
        child = await client.post(
            "/api/v1/api-keys", json={"name": "child", "role": "staff"}, headers=key
        )
        assert child.status_code == 201
        child_key = {"Authorization": f"Bearer {child.json()['key']}"}
        assert await _me(client, child_key) == 200
        off = await client.patch(
            f"/api/v1/users/{admin.user_id}", json={"is_active": False}, headers=owner.headers
        )
        assert off.status_code == 200
        assert await _me(client, admin.headers) == 401
        assert await _me(client, key) == 401
        assert await _me(client, child_key) == 401
        listed = await client.get("/api/v1/api-keys", headers=owner.headers)
        assert all(k["revoked_at"] is not None for k in listed.json()["data"])
        # Reactivated, the user logs in again; the old token stays dead.
        on = await client.patch(
            f"/api/v1/users/{admin.user_id}", json={"is_active": True}, headers=owner.headers
        )
        assert on.status_code == 200
        assert await _me(client, admin.headers) == 401
        login = await client.post(
            "/api/v1/auth/login", json={"email": admin.email, "password": PASSWORD}
        )
        fresh = {"Authorization": f"Bearer {login.json()['access_token']}"}
        assert await _me(client, fresh) == 200


async def test_demoted_admin_loses_admin_rights_at_once(settings: Settings, redis: Any) -> None:
    async with app_client(settings) as (_, client):
        owner = await register(client)
        admin = await add_user(client, owner, "admin")
        key = await _key(client, admin, role="admin")
        assert (await client.get("/api/v1/users", headers=key)).status_code == 200
        demoted = await client.patch(
            f"/api/v1/users/{admin.user_id}", json={"role": "staff"}, headers=owner.headers
        )
        assert demoted.status_code == 200
        # Seen: the demoted admin still created an admin key that outlived the demotion.
        made = await client.post(
            "/api/v1/api-keys", json={"name": "late", "role": "admin"}, headers=admin.headers
        )
        assert made.status_code == 401
        # The refresh token still works and gives a token with the role they have now.
        refreshed = await client.post(
            "/api/v1/auth/refresh", json={"refresh_token": admin.refresh_token}
        )
        assert refreshed.status_code == 200
        staff_headers = {"Authorization": f"Bearer {refreshed.json()['access_token']}"}
        made = await client.post(
            "/api/v1/api-keys", json={"name": "late", "role": "admin"}, headers=staff_headers
        )
        assert made.status_code == 403
        # The admin key they made acts as staff now (checked at use), both ways.
        assert (await client.get("/api/v1/users", headers=key)).status_code == 403
        assert (await client.get("/api/v1/members", headers=key)).status_code == 200
        me = await client.get("/api/v1/auth/me", headers=key)
        assert me.json()["api_key"]["role"] == "staff"
        await client.patch(
            f"/api/v1/users/{admin.user_id}", json={"role": "admin"}, headers=owner.headers
        )
        assert (await client.get("/api/v1/users", headers=key)).status_code == 200


async def test_password_change_ends_access_tokens(settings: Settings, redis: Any) -> None:
    async with app_client(settings) as (_, client):
        owner = await register(client)
        staff = await add_user(client, owner, "staff")
        changed = await client.patch(
            f"/api/v1/users/{staff.user_id}",
            json={"password": "a-new-password-1"},
            headers=owner.headers,
        )
        assert changed.status_code == 200
        assert await _me(client, staff.headers) == 401


async def test_renaming_a_user_keeps_their_token(settings: Settings, redis: Any) -> None:
    async with app_client(settings) as (_, client):
        owner = await register(client)
        staff = await add_user(client, owner, "staff")
        renamed = await client.patch(
            f"/api/v1/users/{staff.user_id}", json={"name": "Renamed"}, headers=owner.headers
        )
        assert renamed.status_code == 200
        assert await _me(client, staff.headers) == 200


async def test_revoked_api_key_stops_at_once(settings: Settings, redis: Any) -> None:
    async with app_client(settings) as (_, client):
        owner = await register(client)
        created = await client.post(
            "/api/v1/api-keys", json={"name": "k", "role": "staff"}, headers=owner.headers
        )
        key = {"Authorization": f"Bearer {created.json()['key']}"}
        assert await _me(client, key) == 200
        revoked = await client.delete(
            f"/api/v1/api-keys/{created.json()['id']}", headers=owner.headers
        )
        assert revoked.status_code == 204
        assert await _me(client, key) == 401


# --- the cache and its fallbacks ----------------------------------------------------


async def test_database_decides_when_the_cached_version_is_missing(
    settings: Settings, redis: Redis
) -> None:
    async with app_client(settings) as (_, client):
        owner = await register(client)
        staff = await add_user(client, owner, "staff")
        assert await _me(client, staff.headers) == 200
        await client.delete(f"/api/v1/users/{staff.user_id}", headers=owner.headers)
        # Redis lost the version (eviction, restart without data): still refused.
        await redis.delete(revocation.version_key(uuid.UUID(staff.user_id)))
        assert await _me(client, staff.headers) == 401
        await redis.delete(revocation.version_key(uuid.UUID(owner.user_id)))
        assert await _me(client, owner.headers) == 200
        # ...and the version is cached again for the next request.
        assert await redis.get(revocation.version_key(uuid.UUID(owner.user_id))) == b"0"


async def test_a_reader_cannot_put_back_an_older_version(settings: Settings, redis: Redis) -> None:
    async with app_client(settings) as (app, client):
        owner = await register(client)
        staff = await add_user(client, owner, "staff")
        assert await _me(client, staff.headers) == 200  # caches version 0
        await client.patch(
            f"/api/v1/users/{staff.user_id}", json={"role": "admin"}, headers=owner.headers
        )
        key = revocation.version_key(uuid.UUID(staff.user_id))
        # A request that read version 0 from the database before the commit writes late:
        await app.state.rate_limiter.raise_version(key, 0, 60)
        assert await redis.get(key) == b"1"
        assert await _me(client, staff.headers) == 401


async def test_failed_commit_after_the_redis_write_revokes_nothing(
    settings: Settings, redis: Redis
) -> None:
    """Redis is raised before the commit; if the commit then fails, nobody is locked out
    (the higher value matches no token, so the database decides)."""
    async with app_client(settings) as (app, client):
        owner = await register(client)
        staff = await add_user(client, owner, "staff")
        assert await _me(client, staff.headers) == 200

        class RollbackError(Exception):
            pass

        with pytest.raises(RollbackError):
            async with app.state.database.unit_of_work() as session:
                await revocation.revoke_user(
                    session, app.state.rate_limiter, uuid.UUID(staff.user_id), api_keys=True
                )
                raise RollbackError
        assert await redis.get(revocation.version_key(uuid.UUID(staff.user_id))) == b"1"
        assert await _me(client, staff.headers) == 200


async def test_redis_down_reads_the_primary_and_refuses_unsafe_changes(
    settings: Settings, redis: Any
) -> None:
    server = RedisProcess()
    server.start()
    try:
        # A "replica" engine (the same database) that the auth path must never use.
        async with app_client(
            settings, redis_url=server.url, database_replica_urls=settings.database_url
        ) as (app, client):
            owner = await register(client)
            staff = await add_user(client, owner, "staff")
            gone = await add_user(client, owner, "staff")
            await client.delete(f"/api/v1/users/{gone.user_id}", headers=owner.headers)
            server.stop()
            replica = app.state.database.replica_engines[0]
            with (
                counting_statements(app.state.database.engine) as primary_sql,
                counting_statements(replica) as replica_sql,
            ):
                assert await _me(client, staff.headers) == 200
                assert await _me(client, gone.headers) == 401
            assert any("auth_version" in s for s in primary_sql)
            assert not any("users" in s for s in replica_sql)
            # Committing a revocation Redis does not know about could let a stale cached
            # version accept the token later: refused, nothing changed.
            refused = await client.delete(f"/api/v1/users/{staff.user_id}", headers=owner.headers)
            assert refused.status_code == 503
            assert await _me(client, staff.headers) == 200
    finally:
        server.stop()
