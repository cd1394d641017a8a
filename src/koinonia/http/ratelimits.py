"""FastAPI dependencies applying the rate-limit policies of `koinonia.ratelimit`."""

from __future__ import annotations

from fastapi import Request, Response

from koinonia.ratelimit import GATE_FAILURES, GATE_OK, GATE_VERSION_UNKNOWN, Policy, RateLimiter
from koinonia.settings import Settings


def client_ip(request: Request) -> str | None:
    # uvicorn already resolved X-Forwarded-For for the trusted proxies only.
    return request.client.host if request.client else None


def user_policy(settings: Settings) -> Policy:
    return Policy("principal", settings.rate_limit_per_minute, settings.rate_limit_burst)


def ip_policy(settings: Settings, name: str) -> Policy:
    per_minute = (
        settings.rate_limit_refresh_per_minute
        if name == "refresh"
        else settings.rate_limit_login_per_minute
    )
    return Policy(name, per_minute, per_minute)


def failure_policy(settings: Settings) -> Policy:
    """Failed authentications (bad tokens, keys, passwords, refresh tokens) per client IP."""
    per_minute = settings.rate_limit_auth_failures_per_minute
    return Policy("auth_failures", per_minute, per_minute)


def _limiter(request: Request) -> RateLimiter:
    limiter: RateLimiter = request.app.state.rate_limiter
    return limiter


async def apply_limit(request: Request, response: Response, key: str, policy: Policy) -> None:
    limiter = _limiter(request)
    ip = client_ip(request)
    if limiter.is_allowlisted(ip):
        return
    decision = await limiter.enforce(key, policy, client_ip=ip)
    response.headers.update(decision.headers())


async def apply_gate(
    request: Request,
    response: Response,
    key: str,
    policy: Policy,
    *,
    version_key: str = "",
    version: int | None = None,
    refuse_failing: bool = False,
) -> int:
    """`policy` for `key`, the client IP's failure limit and a version check, in one Redis
    call (see `RateLimiter.gate`). Answers the gate status; raises 429 when refused.

    Allow-listed callers skip the limits, but not the version check."""
    limiter = _limiter(request)
    settings: Settings = request.app.state.settings
    ip = client_ip(request)
    failures = failure_policy(settings)
    allowlisted = limiter.is_allowlisted(ip)
    if allowlisted and version is None:
        return GATE_OK
    result = await limiter.gate(
        key,
        policy,
        failure_key=f"ip:{ip}",
        failure_policy=failures,
        version_key=version_key,
        version=version,
        refuse_failing=refuse_failing and not allowlisted,
    )
    if allowlisted:
        return GATE_VERSION_UNKNOWN if result.status == GATE_VERSION_UNKNOWN else GATE_OK
    if result.status == GATE_FAILURES:
        limiter.refuse(f"ip:{ip}", failures, result.decision, ip)
    if not result.decision.allowed:
        limiter.refuse(key, policy, result.decision, ip)
    response.headers.update(result.decision.headers())
    return result.status


async def record_failure(request: Request) -> None:
    """Count a failed authentication against the client IP; 429 once over the limit.

    Called on the failure path only (after a cheap check failed, or after the database
    said no), so it never costs the steady state anything."""
    limiter = _limiter(request)
    ip = client_ip(request)
    if limiter.is_allowlisted(ip):
        return
    policy = failure_policy(get_settings(request))
    decision = await limiter.hit(f"ip:{ip}", policy)
    if not decision.allowed:
        limiter.refuse(f"ip:{ip}", policy, decision, ip)


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def limit_per_ip(name: str, *, refuse_failing: bool = False):  # type: ignore[no-untyped-def]
    """A dependency limiting an unauthenticated endpoint (login, register, refresh) per
    client IP; with `refuse_failing` an IP over its failed-authentication limit is refused
    here too, before the endpoint does any database work (same Redis call)."""

    async def dependency(request: Request, response: Response) -> None:
        settings: Settings = request.app.state.settings
        policy = ip_policy(settings, name)
        key = f"ip:{client_ip(request)}"
        if refuse_failing:
            await apply_gate(request, response, key, policy, refuse_failing=True)
        else:
            await apply_limit(request, response, key, policy)

    return dependency
