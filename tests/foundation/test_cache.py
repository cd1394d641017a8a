"""The Redis read-through cache against the real Redis."""

from __future__ import annotations

import asyncio
import uuid

import httpx
from redis.asyncio import Redis

from koinonia.cache import Cache, CachePolicy
from tests.support.servers import free_port


def _policy(**kwargs: float) -> CachePolicy:
    return CachePolicy(name=f"t{uuid.uuid4().hex[:6]}", **kwargs)  # type: ignore[arg-type]


async def test_read_through_and_tag_invalidation(redis: Redis) -> None:
    cache, policy, calls = Cache(redis), _policy(ttl=60, beta=0), []

    async def load() -> dict[str, int]:
        calls.append(1)
        return {"count": len(calls)}

    assert await cache.get_or_load(policy, "k", load, tags=["church:1:groups"]) == {"count": 1}
    assert await cache.get_or_load(policy, "k", load, tags=["church:1:groups"]) == {"count": 1}
    await cache.invalidate("church:1:groups")
    assert await cache.get_or_load(policy, "k", load, tags=["church:1:groups"]) == {"count": 2}
    await cache.invalidate("church:2:groups")  # another church's tag changes nothing
    assert await cache.get_or_load(policy, "k", load, tags=["church:1:groups"]) == {"count": 2}


async def test_stampede_runs_the_loader_once(redis: Redis) -> None:
    cache, policy, calls = Cache(redis), _policy(ttl=60, beta=0), []

    async def slow_load() -> int:
        calls.append(1)
        await asyncio.sleep(0.1)
        return 42

    results = await asyncio.gather(
        *(cache.get_or_load(policy, "hot", slow_load) for _ in range(50))
    )
    assert results == [42] * 50
    assert len(calls) == 1


async def test_stale_while_revalidate_serves_old_value_then_refreshes(redis: Redis) -> None:
    cache, policy = Cache(redis), _policy(ttl=0.05, stale_ttl=30, beta=0)
    values = iter([1, 2, 3])

    async def load() -> int:
        return next(values)

    assert await cache.get_or_load(policy, "k", load) == 1
    await asyncio.sleep(0.1)
    assert await cache.get_or_load(policy, "k", load) == 1  # stale, refresh started
    await asyncio.sleep(0.1)
    assert await cache.get_or_load(policy, "k", load) == 2


async def test_redis_down_falls_back_to_the_loader() -> None:
    dead = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.2)
    cache = Cache(dead)

    async def load() -> str:
        return "from-db"

    assert await cache.get_or_load(_policy(ttl=60), "k", load) == "from-db"
    await cache.invalidate("x")  # logged, not raised
    await dead.aclose()


async def test_admin_cache_and_slow_query_reports(
    client: httpx.AsyncClient, tenant_factory: object
) -> None:
    operator = await tenant_factory(is_operator=True)  # type: ignore[operator]
    staff = await tenant_factory(role="staff")  # type: ignore[operator]
    report = await client.get("/api/v1/admin/cache", headers=operator.headers)
    assert report.status_code == 200
    assert {"caches", "keys", "redis_used_memory_bytes"} <= report.json().keys()
    denied = await client.get("/api/v1/admin/cache", headers=staff.headers)
    assert denied.status_code == 403
    slow = await client.get("/api/v1/admin/slow-queries", headers=operator.headers)
    assert slow.status_code == 200, slow.text
    assert slow.json()["source"] == "pg_stat_statements"
    assert (await client.get("/api/v1/admin/slow-queries")).status_code == 401
