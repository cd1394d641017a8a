"""`GET /api/v1/admin/slow-queries`, `/cache` and `/circuit-breakers` (operators only)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from prometheus_client import REGISTRY
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from koinonia.accounts.deps import Operator
from koinonia.breaker import CircuitBreaker
from koinonia.cache import PREFIX
from koinonia.errors import ServiceUnavailableError, problem_responses
from koinonia.http.deps import AppSettings, DbSession, RedisClient

router = APIRouter(prefix="/api/v1/admin", tags=["operations"])


class SlowQuery(BaseModel):
    query: str
    calls: int
    mean_ms: float
    max_ms: float
    total_ms: float
    rows: int


class SlowQueryReport(BaseModel):
    threshold_ms: int
    source: str
    data: list[SlowQuery]


class CacheStats(BaseModel):
    name: str
    hits: int
    misses: int
    stale: int
    errors: int
    hit_ratio: float | None


class CacheReport(BaseModel):
    caches: list[CacheStats]
    keys: int
    redis_used_memory_bytes: int | None


class BreakerOut(BaseModel):
    provider: str
    state: str  # closed, half_open, open; unknown when Redis does not answer
    retry_after: float  # seconds until an open circuit lets a probe through


class BreakerReport(BaseModel):
    data: list[BreakerOut]


BREAKER_PROVIDERS = ("telnyx", "stripe")


@router.get(
    "/slow-queries",
    response_model=SlowQueryReport,
    summary="Statements whose mean time is over the slow-query threshold",
    description="From `pg_stat_statements` (statement shapes with `$n` placeholders; "
    "parameters are never shown). Needs `shared_preload_libraries = pg_stat_statements`.",
    responses=problem_responses(401, 403, 503),
)
async def slow_queries(
    _: Operator,
    session: DbSession,
    settings: AppSettings,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
) -> SlowQueryReport:
    try:
        rows = (
            await session.execute(
                text(
                    "SELECT query, calls, mean_exec_time, max_exec_time, total_exec_time, rows "
                    "FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database "
                    "WHERE datname = current_database()) AND mean_exec_time >= :threshold "
                    "ORDER BY mean_exec_time DESC LIMIT :limit"
                ),
                {"threshold": settings.slow_query_ms, "limit": limit},
            )
        ).all()
    except DBAPIError:
        raise ServiceUnavailableError(
            "pg_stat_statements is not available on this database server"
        ) from None
    return SlowQueryReport(
        threshold_ms=settings.slow_query_ms,
        source="pg_stat_statements",
        data=[
            SlowQuery(
                query=" ".join(r[0].split())[:2000],
                calls=r[1],
                mean_ms=round(r[2], 2),
                max_ms=round(r[3], 2),
                total_ms=round(r[4], 2),
                rows=r[5],
            )
            for r in rows
        ],
    )


def _cache_counters() -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for metric in REGISTRY.collect():
        if metric.name != "koinonia_cache_requests":
            continue
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                labels: dict[str, Any] = sample.labels
                counts.setdefault(labels["cache"], {})[labels["result"]] = int(sample.value)
    return counts


@router.get(
    "/cache",
    response_model=CacheReport,
    summary="Cache hit ratios (this process) and Redis usage",
    responses=problem_responses(401, 403),
)
async def cache_stats(_: Operator, redis: RedisClient, request: Request) -> CacheReport:
    caches = []
    for name, c in sorted(_cache_counters().items()):
        hits, stale = c.get("hit", 0), c.get("stale", 0)
        misses, errors = c.get("miss", 0), c.get("error", 0)
        total = hits + stale + misses + errors
        caches.append(
            CacheStats(
                name=name,
                hits=hits,
                misses=misses,
                stale=stale,
                errors=errors,
                hit_ratio=round((hits + stale) / total, 4) if total else None,
            )
        )
    keys = 0
    memory: int | None = None
    try:
        async for _key in redis.scan_iter(match=f"{PREFIX}*", count=1000):
            keys += 1
        info = await redis.info("memory")
        memory = int(info.get("used_memory", 0))
    except Exception:  # the report still shows the counters when Redis is down
        keys = 0
    return CacheReport(caches=caches, keys=keys, redis_used_memory_bytes=memory)


@router.get(
    "/circuit-breakers",
    response_model=BreakerReport,
    summary="The state of each provider's circuit breaker",
    responses=problem_responses(401, 403),
)
async def circuit_breakers(_: Operator, redis: RedisClient) -> BreakerReport:
    data = []
    for provider in BREAKER_PROVIDERS:
        status = await CircuitBreaker(redis, provider).status()
        data.append(
            BreakerOut(
                provider=status.provider,
                state=status.state,
                retry_after=round(status.retry_after, 3),
            )
        )
    return BreakerReport(data=data)
