"""`/api/v1/health`, `/livez` and `/readyz`."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from koinonia.health.checks import HealthCheck, overall, run_checks
from koinonia.http.routing import FeatureRouter
from koinonia.settings import Settings

router = FeatureRouter(prefix="/api/v1", tags=["health"])
probes = APIRouter(tags=["health"])


class DependencyStatus(BaseModel):
    status: Literal["ok", "degraded", "down"]
    latency_ms: float
    critical: bool
    detail: str | None = None


class HealthReport(BaseModel):
    status: Literal["ok", "degraded", "down"]
    checks: dict[str, DependencyStatus]


async def _report(request: Request) -> tuple[HealthReport, int]:
    checks: list[HealthCheck] = request.app.state.health_checks
    settings: Settings = request.app.state.settings
    results = await run_checks(checks, settings.health_check_timeout)
    status = overall(results)
    report = HealthReport(
        status=status,
        checks={
            r.name: DependencyStatus(
                status=r.status, latency_ms=r.latency_ms, critical=r.critical, detail=r.detail
            )
            for r in results
        },
    )
    return report, 503 if status == "down" else 200


@router.get(
    "/health",
    response_model=HealthReport,
    summary="Dependency health",
    description="Checks every dependency concurrently, each under a timeout. Answers `503` "
    "when a critical dependency (database, Redis) is down and `degraded` when a "
    "non-critical one is.",
    responses={503: {"description": "A critical dependency is down", "model": HealthReport}},
)
async def health(request: Request) -> JSONResponse:
    report, status = await _report(request)
    return JSONResponse(
        report.model_dump(mode="json"), status_code=status, headers={"Cache-Control": "no-store"}
    )


@probes.get("/livez", summary="Liveness (no dependencies)")
async def livez() -> dict[str, str]:
    return {"status": "ok"}


@probes.get(
    "/readyz",
    summary="Readiness",
    responses={503: {"description": "Not ready: a critical dependency is down"}},
)
async def readyz(request: Request) -> JSONResponse:
    report, status = await _report(request)
    return JSONResponse(
        {"status": report.status}, status_code=status, headers={"Cache-Control": "no-store"}
    )
