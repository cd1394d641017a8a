"""Revocation on the next request, at no extra cost per request in the steady state.

Every user has `auth_version` (a column); access tokens carry the version they were issued
with (`ver`). Deleting, deactivating, or changing the role or password of a user raises the
version; a token whose version is not the current one is refused on its next request.

The current version is cached in Redis (`authv:user:<id>`) and compared with the token's
INSIDE the rate-limit script the request runs anyway (`RateLimiter.gate`), so a warm
request costs no extra round trip and no query. Redis is only ever trusted to say "this
token's version is current": a missing or different value sends the request to the
PRIMARY database (never a replica), which is authoritative, and refills the cache.

Order, so that a crash cannot leave a revoked token valid: the version is raised in the
transaction, then raised in Redis BEFORE the commit (refused with 503 when Redis cannot
take it, and the change rolls back), and Redis values are only ever raised, never lowered.
So at no point does Redis hold a revoked token's version as current: before the commit the
change has not happened; after it Redis already holds the higher value. A commit that fails
after the Redis write leaves a higher value nobody's token carries: those users' requests
go to the database until the short-lived pending value expires. A reader that read the old
version before the commit cannot overwrite the newer value (raise-only).

API keys are read from the database on every use already (one indexed query, as before),
so revoking a key takes effect at once; that same query joins the key's creator and caps
the key's role to the creator's role NOW (checked at use, so a demotion caps every key the
user made and a re-promotion restores them); deleting or deactivating a user revokes their
keys.
"""

from __future__ import annotations

import contextlib
import uuid
from datetime import UTC, datetime

import structlog
from redis.exceptions import RedisError
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.accounts.principal import Principal
from koinonia.accounts.tables import ApiKey, User
from koinonia.db import Database
from koinonia.errors import ServiceUnavailableError
from koinonia.ratelimit import RateLimiter

log = structlog.get_logger(__name__)

# A version confirmed by the database stays cached this long (refilled from the database
# once when it expires); a version written before its commit, this long (if the commit
# failed, nobody's token carries it and those users go to the database until it expires).
CONFIRMED_TTL_SECONDS = 86_400
PENDING_TTL_SECONDS = 300

ROLE_RANK = {"staff": 0, "admin": 1, "owner": 2}


def version_key(user_id: uuid.UUID) -> str:
    return f"authv:user:{user_id}"


def capped_role(key_role: str, creator_role: str | None) -> str:
    """A key never has more rights than its creator has now."""
    if creator_role is None or ROLE_RANK[creator_role] >= ROLE_RANK[key_role]:
        return key_role
    return creator_role


async def revoke_user(
    session: AsyncSession, limiter: RateLimiter, user_id: uuid.UUID, *, api_keys: bool
) -> None:
    """End the user's access tokens at once (and their API keys with `api_keys`).

    Call inside the request's transaction, before it commits."""
    version = await session.scalar(
        update(User)
        .where(User.id == user_id)
        .values(auth_version=User.auth_version + 1)
        .returning(User.auth_version)
        .execution_options(synchronize_session="fetch")
    )
    if api_keys:
        await session.execute(
            update(ApiKey)
            .where(ApiKey.created_by == user_id, ApiKey.revoked_at.is_(None))
            .values(revoked_at=datetime.now(UTC))
            .execution_options(synchronize_session=False)
        )
    if version is None:
        return
    try:
        await limiter.raise_version(version_key(user_id), int(version), PENDING_TTL_SECONDS)
    except (RedisError, OSError) as error:
        # Committing without Redis knowing could let a stale cached version accept the
        # revoked tokens once Redis answers again: refuse, the change rolls back.
        log.warning("revocation_unavailable", error=type(error).__name__)
        raise ServiceUnavailableError(
            "This change cannot be made safely right now; try again shortly",
            headers={"Retry-After": "5"},
        ) from None


async def confirm_token(database: Database, limiter: RateLimiter, principal: Principal) -> bool:
    """Ask the PRIMARY database whether an access token is still current; cache the answer.

    Only when Redis did not confirm the version (cache miss, revoked token, Redis down)."""
    assert principal.user_id is not None
    async with database.sessions() as session:  # the primary engine, never a replica
        row = (
            await session.execute(
                select(
                    User.auth_version, User.is_active, User.role, User.church_id, User.is_operator
                ).where(User.id == principal.user_id)
            )
        ).one_or_none()
    if row is None or not row.is_active or row.auth_version != principal.auth_version:
        return False
    if (row.role, row.church_id, row.is_operator) != (
        principal.role,
        principal.church_id,
        principal.is_operator,
    ):
        return False
    if not limiter.degraded:
        with contextlib.suppress(RedisError, OSError):
            await limiter.raise_version(
                version_key(principal.user_id), int(row.auth_version), CONFIRMED_TTL_SECONDS
            )
    return True
