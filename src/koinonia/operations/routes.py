"""`GET /api/v1/admin/slow-queries`, `/cache`, `/circuit-breakers` and
`/sending-pauses` (operators only)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Path, Query, Request, Response
from prometheus_client import REGISTRY
from pydantic import BaseModel
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from koinonia.accounts.deps import Operator
from koinonia.audit import service as audit
from koinonia.breaker import CircuitBreaker
from koinonia.cache import PREFIX
from koinonia.errors import NotFoundError, ServiceUnavailableError, problem_responses
from koinonia.http.deps import AppSettings, DbSession, RedisClient
from koinonia.http.routing import FeatureRouter
from koinonia.messaging import pauses
from koinonia.messaging.tables import SenderPause

router = FeatureRouter(prefix="/api/v1/admin", tags=["operations"])


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


class PauseOut(BaseModel):
    scope: Literal["account", "number"]
    key: str  # "telnyx" for the account, the sending number for a number pause
    reason: str
    error_code: str | None
    paused_at: datetime
    next_probe_at: datetime
    probes: int


class PauseReport(BaseModel):
    data: list[PauseOut]


@router.get(
    "/sending-pauses",
    response_model=PauseReport,
    summary="Senders paused after the provider refused a whole account or number",
    description="Sending stops for the scope (nobody is failed or refunded); a probe "
    "retries after a growing wait and lifts the pause when the provider accepts again.",
    responses=problem_responses(401, 403),
)
async def sending_pauses(_: Operator, session: DbSession) -> PauseReport:
    rows = await session.scalars(select(SenderPause).order_by(SenderPause.paused_at))
    return PauseReport(
        data=[
            PauseOut(
                scope="account" if p.scope == pauses.ACCOUNT else "number",
                key=p.key,
                reason=p.reason,
                error_code=p.error_code,
                paused_at=p.paused_at,
                next_probe_at=p.next_probe_at,
                probes=p.probes,
            )
            for p in rows
        ]
    )


@router.delete(
    "/sending-pauses/{scope}/{key}",
    status_code=204,
    summary="Lift a sending pause (after fixing the account or number at the provider)",
    description="Waiting batches are woken at once.",
    responses=problem_responses(401, 403, 404),
)
async def clear_sending_pause(
    scope: Literal["account", "number"],
    key: Annotated[str, Path(max_length=64, pattern=r"^(telnyx|\+[1-9][0-9]{7,14})$")],
    principal: Operator,
    session: DbSession,
) -> Response:
    if not await pauses.clear(session, scope, key):
        raise NotFoundError("No such pause")
    audit.record(
        session,
        action="sending_pause.cleared",
        church_id=None,
        actor_id=principal.actor_id,
        actor_kind=principal.actor_kind,
        target_type=f"sending_pause.{scope}",
        target_id=key if scope == pauses.ACCOUNT else f"…{key[-4:]}",
    )
    return Response(status_code=204)
