"""Lockout after repeated failed logins for one email FROM ONE CLIENT IP, kept in Redis.

Keyed by email and IP: keyed by email alone, anyone who knows a staff member's email
could keep them locked out by failing logins for it. Guessing from many addresses is
bounded by each address's own lockout and its failed-authentication limit
(`RATE_LIMIT_AUTH_FAILURES_PER_MINUTE`), and by argon2's cost.

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


def _subject(email: str, client_ip: str | None) -> str:
    # Hashed: Redis keys and logs must not hold emails.
    pair = f"{email.strip().lower()}\n{client_ip or '-'}"
    return hashlib.sha256(pair.encode()).hexdigest()[:32]


class LoginLockout:
    def __init__(self, redis: Redis, *, failures: int, seconds: int) -> None:
        self._redis = redis
        self._failures = failures
        self._seconds = seconds

    async def locked_for(self, email: str, client_ip: str | None) -> int:
        """Seconds the account stays locked for this IP (0 when it is not)."""
        try:
            ttl = int(await self._redis.ttl(f"lockout:{_subject(email, client_ip)}"))
        except RedisError:
            return 0
        return max(ttl, 0)

    async def failed(self, email: str, client_ip: str | None) -> None:
        subject = _subject(email, client_ip)
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

    async def succeeded(self, email: str, client_ip: str | None) -> None:
        with contextlib.suppress(RedisError):
            await self._redis.delete(f"loginfail:{_subject(email, client_ip)}")
