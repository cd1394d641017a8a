"""Lockout after repeated failed logins for one email, kept in Redis.

Best effort by design: if Redis is down logins still work (the per-IP limit then runs
in process, see `koinonia.ratelimit`), because locking everyone out would be worse.
"""

from __future__ import annotations

import contextlib
import hashlib

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

log = structlog.get_logger(__name__)


def _subject(email: str) -> str:
    # Hashed: Redis keys and logs must not hold emails.
    return hashlib.sha256(email.strip().lower().encode()).hexdigest()[:32]


class LoginLockout:
    def __init__(self, redis: Redis, *, failures: int, seconds: int) -> None:
        self._redis = redis
        self._failures = failures
        self._seconds = seconds

    async def locked_for(self, email: str) -> int:
        """Seconds the account stays locked (0 when it is not)."""
        try:
            ttl = int(await self._redis.ttl(f"lockout:{_subject(email)}"))
        except RedisError:
            return 0
        return max(ttl, 0)

    async def failed(self, email: str) -> None:
        subject = _subject(email)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.incr(f"loginfail:{subject}")
                pipe.expire(f"loginfail:{subject}", self._seconds)
                count, _ = await pipe.execute()
            if int(count) >= self._failures:
                await self._redis.set(f"lockout:{subject}", 1, ex=self._seconds)
                await self._redis.delete(f"loginfail:{subject}")
                log.warning("login_locked_out", subject=subject[:12], failures=int(count))
        except RedisError as error:
            log.warning("login_lockout_unavailable", error=type(error).__name__)

    async def succeeded(self, email: str) -> None:
        with contextlib.suppress(RedisError):
            await self._redis.delete(f"loginfail:{_subject(email)}")
