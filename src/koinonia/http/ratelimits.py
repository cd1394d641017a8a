"""FastAPI dependencies applying the rate-limit policies of `koinonia.ratelimit`."""

from __future__ import annotations

from fastapi import Request, Response

from koinonia.ratelimit import Policy, RateLimiter
from koinonia.settings import Settings


def client_ip(request: Request) -> str | None:
    # uvicorn already resolved X-Forwarded-For for the trusted proxies only.
    return request.client.host if request.client else None


def user_policy(settings: Settings) -> Policy:
    return Policy("principal", settings.rate_limit_per_minute, settings.rate_limit_burst)


def ip_policy(settings: Settings, name: str) -> Policy:
    per_minute = settings.rate_limit_login_per_minute
    return Policy(name, per_minute, per_minute)


async def apply_limit(request: Request, response: Response, key: str, policy: Policy) -> None:
    limiter: RateLimiter = request.app.state.rate_limiter
    ip = client_ip(request)
    if limiter.is_allowlisted(ip):
        return
    decision = await limiter.enforce(key, policy, client_ip=ip)
    response.headers.update(decision.headers())


def limit_per_ip(name: str):  # type: ignore[no-untyped-def]
    """A dependency limiting an unauthenticated endpoint (login, register) per client IP."""

    async def dependency(request: Request, response: Response) -> None:
        settings: Settings = request.app.state.settings
        await apply_limit(request, response, f"ip:{client_ip(request)}", ip_policy(settings, name))

    return dependency
