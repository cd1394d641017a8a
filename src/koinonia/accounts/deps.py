"""Authentication and authorisation dependencies used by every feature's routes."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from sqlalchemy import select, update

from koinonia.accounts import api_keys, revocation
from koinonia.accounts.principal import Principal
from koinonia.accounts.tables import ApiKey, User
from koinonia.accounts.tokens import TokenExpiredError, decode_access_token
from koinonia.errors import AuthenticationError, AuthorizationError
from koinonia.http.deps import get_app_settings, get_database
from koinonia.http.ratelimits import apply_gate, record_failure, user_policy
from koinonia.ratelimit import GATE_VERSION_UNKNOWN

LAST_USED_GRANULARITY = timedelta(minutes=1)


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("Send 'Authorization: Bearer <access token or API key>'")
    return token.strip()


async def _principal_from_api_key(request: Request, response: Response, token: str) -> Principal:
    prefix = api_keys.split_api_key(token)
    if prefix is None:
        await record_failure(request)
        raise AuthenticationError("The API key is not valid")
    settings = get_app_settings(request)
    # Before any database work: the key's limit and its IP's failure limit, in the one
    # Redis call the request makes. The bucket is per whole key (prefix + hash), so
    # garbage sent with a real key's public prefix cannot drain that key's limit.
    bucket = f"key:{prefix}:{api_keys.hash_api_key(token).hex()[:16]}"
    await apply_gate(request, response, bucket, user_policy(settings), refuse_failing=True)
    database = get_database(request)
    async with database.sessions() as session:  # the primary: revocations count at once
        found = (
            await session.execute(
                # The creator's role and status NOW, in the same query: a key never has
                # more rights than the user who made it has today.
                select(ApiKey, User.role, User.is_active)
                .outerjoin(User, User.id == ApiKey.created_by)
                .where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))
            )
        ).one_or_none()
        if (
            found is None
            or not api_keys.matches(token, found[0].key_hash)
            or found[2] is False  # the creator was deactivated
        ):
            await record_failure(request)
            raise AuthenticationError("The API key is not valid")
        key, creator_role = found[0], found[1]
        now = datetime.now(UTC)
        # Write last-used at most once a minute per key, not on every request.
        if key.last_used_at is None or now - key.last_used_at > LAST_USED_GRANULARITY:
            await session.execute(
                update(ApiKey).where(ApiKey.id == key.id).values(last_used_at=now)
            )
            await session.commit()
        return Principal(
            church_id=key.church_id,
            role=revocation.capped_role(key.role, creator_role),
            api_key_id=key.id,
            key_creator_id=key.created_by,
        )


async def _principal_from_access_token(
    request: Request, response: Response, token: str
) -> Principal:
    settings = get_app_settings(request)
    try:
        principal = decode_access_token(settings, token)
    except TokenExpiredError:
        raise  # genuine and routine (the client refreshes): not a failed authentication
    except AuthenticationError:
        await record_failure(request)
        raise
    assert principal.user_id is not None
    status = await apply_gate(
        request,
        response,
        principal.rate_limit_key,
        user_policy(settings),
        version_key=revocation.version_key(principal.user_id),
        version=principal.auth_version,
    )
    if status == GATE_VERSION_UNKNOWN and not await revocation.confirm_token(
        get_database(request), request.app.state.rate_limiter, principal
    ):
        await record_failure(request)
        raise AuthenticationError("The access token was revoked; log in again")
    return principal


async def get_principal(request: Request, response: Response) -> Principal:
    token = _bearer(request)
    if api_keys.looks_like_api_key(token):
        principal = await _principal_from_api_key(request, response, token)
    else:
        principal = await _principal_from_access_token(request, response, token)
    request.state.principal = principal
    # Bound to the access log line of this request (ids only, never names or emails).
    request.scope.setdefault("state", {})["church_id"] = str(principal.church_id)
    if principal.user_id:
        request.scope["state"]["user_id"] = str(principal.user_id)
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
