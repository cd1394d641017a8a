"""Dependency checks run concurrently, each under its own timeout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import structlog
from redis.asyncio import Redis
from sqlalchemy import text

from koinonia.db import Database
from koinonia.observability import DEPENDENCY_UP

Status = Literal["ok", "degraded", "down"]

log = structlog.get_logger("koinonia.health")


class Degraded(Exception):  # noqa: N818 - a state, not an error
    """Raised by a check whose dependency answers but works in a reduced mode."""


@dataclass(frozen=True, slots=True)
class HealthCheck:
    name: str
    probe: Callable[[], Awaitable[None]]
    critical: bool = True


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    status: Status
    latency_ms: float
    critical: bool
    detail: str | None = None


async def run_check(check: HealthCheck, limit_s: float) -> CheckResult:
    started = time.perf_counter()
    status: Status = "ok"
    detail: str | None = None
    try:
        await asyncio.wait_for(check.probe(), limit_s)
    except Degraded as reason:
        status, detail = "degraded", str(reason) or None
    except TimeoutError:
        status, detail = "down", f"no answer within {limit_s:g}s"
    except Exception as error:  # a health check reports any failure, it never raises
        status, detail = "down", type(error).__name__
    latency = round((time.perf_counter() - started) * 1000, 2)
    DEPENDENCY_UP.labels(check.name).set(0 if status == "down" else 1)
    if status != "ok":
        log.warning("dependency_unhealthy", dependency=check.name, status=status, detail=detail)
    return CheckResult(check.name, status, latency, check.critical, detail)


async def run_checks(checks: Sequence[HealthCheck], limit_s: float) -> list[CheckResult]:
    return list(await asyncio.gather(*(run_check(c, limit_s) for c in checks)))


def overall(results: Sequence[CheckResult]) -> Status:
    if any(r.status == "down" and r.critical for r in results):
        return "down"
    if any(r.status != "ok" for r in results):
        return "degraded"
    return "ok"


def database_check(database: Database) -> HealthCheck:
    async def probe() -> None:
        async with database.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    return HealthCheck("database", probe)


def redis_check(redis: Redis) -> HealthCheck:
    async def probe() -> None:
        await redis.ping()

    return HealthCheck("redis", probe)


def replica_check(index: int, lags: list[float | None], max_lag: float) -> HealthCheck:
    """Non-critical: reads fall back to the primary when a replica is down or behind."""

    async def probe() -> None:
        lag = lags[index]
        if lag is None:
            raise ConnectionError("replica unreachable")
        if lag > max_lag:
            raise Degraded(f"lag {lag:.1f}s over {max_lag:g}s; reads go to the primary")

    return HealthCheck(f"replica{index}", probe, critical=False)
