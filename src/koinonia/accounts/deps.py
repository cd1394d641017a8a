"""Authentication and authorisation dependencies used by every feature's routes."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from sqlalchemy import select, update

from koinonia.accounts import api_keys
from koinonia.accounts.principal import Principal
from koinonia.accounts.tables import ApiKey
from koinonia.accounts.tokens import decode_access_token
from koinonia.errors import AuthenticationError, AuthorizationError
from koinonia.http.deps import get_app_settings, get_database
from koinonia.http.ratelimits import apply_limit, user_policy

LAST_USED_GRANULARITY = timedelta(minutes=1)


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("Send 'Authorization: Bearer <access token or API key>'")
    return token.strip()


async def _principal_from_api_key(request: Request, token: str) -> Principal:
    prefix = api_keys.split_api_key(token)
    if prefix is None:
        raise AuthenticationError("The API key is not valid")
    database = get_database(request)
    async with database.sessions() as session:
        key = (
            await session.execute(
                select(ApiKey).where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))
            )
        ).scalar_one_or_none()
        if key is None or not api_keys.matches(token, key.key_hash):
            raise AuthenticationError("The API key is not valid")
        now = datetime.now(UTC)
        # Write last-used at most once a minute per key, not on every request.
        if key.last_used_at is None or now - key.last_used_at > LAST_USED_GRANULARITY:
            await session.execute(
                update(ApiKey).where(ApiKey.id == key.id).values(last_used_at=now)
            )
            await session.commit()
        return Principal(church_id=key.church_id, role=key.role, api_key_id=key.id)


async def get_principal(request: Request, response: Response) -> Principal:
    token = _bearer(request)
    if api_keys.looks_like_api_key(token):
        principal = await _principal_from_api_key(request, token)
    else:
        principal = decode_access_token(get_app_settings(request), token)
    request.state.principal = principal
    # Bound to the access log line of this request (ids only, never names or emails).
    request.scope.setdefault("state", {})["church_id"] = str(principal.church_id)
    if principal.user_id:
        request.scope["state"]["user_id"] = str(principal.user_id)
    settings = get_app_settings(request)
    await apply_limit(request, response, principal.rate_limit_key, user_policy(settings))
    return principal


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]


def require_roles(*roles: str) -> Callable[[Principal], Coroutine[Any, Any, Principal]]:
    allowed = frozenset(roles)

    async def dependency(principal: CurrentPrincipal) -> Principal:
        if principal.role not in allowed:
            raise AuthorizationError(f"This action needs one of the roles: {', '.join(roles)}")
        return principal

    return dependency


async def require_operator(principal: CurrentPrincipal) -> Principal:
    if not principal.is_operator:
        raise AuthorizationError("This action is for platform operators")
    return principal


Manager = Annotated[Principal, Depends(require_roles("owner", "admin"))]
Owner = Annotated[Principal, Depends(require_roles("owner"))]
Operator = Annotated[Principal, Depends(require_operator)]
