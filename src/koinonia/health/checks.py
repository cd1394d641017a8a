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


class Down(Exception):  # noqa: N818 - a state, not an error
    """Raised by a check that knows its dependency is down and why (the detail)."""


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
    except Down as reason:
        status, detail = "down", str(reason) or None
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


class BackgroundCheck:
    """A provider checked in the background, so that probes never call it.

    `start()` runs the check once (bounded by the health timeout) and then every
    `interval` seconds in a task of this process; `served()` is the check the health
    routes run: it answers the last result at once, plus `live` — a cheap local probe
    (the circuit breaker's state in Redis), run on every request. Any number of probes
    cost at most one provider call per interval per process."""

    def __init__(
        self,
        check: HealthCheck,
        interval: float,
        timeout: float,
        live: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.check = check
        self.interval = interval
        self.timeout = timeout
        self.live = live
        self.last: CheckResult | None = None
        self.checked_at: float | None = None
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> CheckResult:
        self.last = await run_check(self.check, self.timeout)
        self.checked_at = time.monotonic()
        return self.last

    async def _forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.refresh()
            except Exception as error:  # run_check never raises; keep the loop alive anyway
                log.warning(
                    "background_check_failed", dependency=self.check.name, error=repr(error)
                )

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._forever(), name=f"health-{self.check.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def served(self) -> HealthCheck:
        async def probe() -> None:
            last = self.last
            if last is None:
                raise Degraded("not checked yet")
            if last.status == "down":
                raise Down(last.detail or "down")
            if self.live is not None:
                await self.live()
            if last.status == "degraded":
                raise Degraded(last.detail or "degraded")

        return HealthCheck(self.check.name, probe, self.check.critical)


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
