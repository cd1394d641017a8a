"""Rate limiting: GCRA (a leaky bucket stored as one timestamp) in Redis, one Lua script.

Libraries such as `limits` offer fixed and moving windows; neither gives a sustained rate
with a separate burst in one atomic round trip, which GCRA does with a single key per
caller. The script takes the time from Redis itself so API processes with skewed clocks
agree. When Redis is unreachable each process falls back to the same algorithm in memory
(limits then apply per process instead of globally); `koinonia_rate_limit_degraded` says so.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from prometheus_client import Counter, Gauge
from redis.asyncio import Redis
from redis.exceptions import RedisError

from koinonia.errors import RateLimitedError

log = structlog.get_logger(__name__)

RATE_LIMIT_REJECTIONS = Counter(
    "koinonia_rate_limit_rejections_total", "Requests refused by a rate limit", ["policy"]
)
RATE_LIMIT_DEGRADED = Gauge(
    "koinonia_rate_limit_degraded",
    "1 while rate limits are enforced in process because Redis is unreachable",
)

# KEYS[1] bucket; ARGV: emission interval (ms), burst. Returns
# {allowed, remaining, retry_after_ms, reset_ms}.
_GCRA = """
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local tolerance = interval * burst
local new_tat = tat + interval
if new_tat - now > tolerance then
  return {0, 0, new_tat - tolerance - now, tat - now}
end
redis.call('SET', KEYS[1], new_tat, 'PX', new_tat - now)
return {1, math.floor((tolerance - (new_tat - now)) / interval), 0, new_tat - now}
"""


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    per_minute: int
    burst: int

    @property
    def interval_ms(self) -> int:
        return max(1, round(60_000 / self.per_minute))


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    retry_after_ms: int
    reset_ms: int

    def headers(self) -> dict[str, str]:
        headers = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(max(0, self.remaining)),
            "RateLimit-Reset": str(math.ceil(self.reset_ms / 1000)),
        }
        if not self.allowed:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_ms / 1000)))
        return headers


def gcra(tat: int, now: int, policy: Policy) -> tuple[Decision, int]:
    """The pure algorithm (the Lua script mirrors it): returns the decision and new TAT.

    Times are integer milliseconds, as in the script: with floats `(now + interval) - now`
    can exceed `interval` by rounding, which refused a first request at `burst=1`.
    """
    interval = policy.interval_ms
    tolerance = interval * policy.burst
    tat = max(tat, now)
    new_tat = tat + interval
    if new_tat - now > tolerance:
        retry = new_tat - tolerance - now
        return Decision(False, policy.burst, 0, retry, tat - now), tat
    remaining = (tolerance - (new_tat - now)) // interval
    return Decision(True, policy.burst, remaining, 0, new_tat - now), new_tat


class InProcessLimiter:
    """The fallback when Redis is down: per-process GCRA state, bounded in size."""

    MAX_KEYS = 100_000

    def __init__(self, clock_ms: Callable[[], int] | None = None) -> None:
        self._tats: dict[str, int] = {}
        self._clock_ms = clock_ms or (lambda: time.monotonic_ns() // 1_000_000)

    def hit(self, key: str, policy: Policy) -> Decision:
        now = self._clock_ms()
        if len(self._tats) >= self.MAX_KEYS:
            self._tats = {k: v for k, v in self._tats.items() if v > now}
        decision, tat = gcra(self._tats.get(key, now), now, policy)
        self._tats[key] = tat
        return decision


class RateLimiter:
    def __init__(self, redis: Redis, allowlist: list[str]) -> None:
        self._redis = redis
        self._script = redis.register_script(_GCRA)
        self._fallback = InProcessLimiter()
        self._degraded = False
        self._allowlist = [ipaddress.ip_network(entry, strict=False) for entry in allowlist]

    def is_allowlisted(self, client_ip: str | None) -> bool:
        if not client_ip or not self._allowlist:
            return False
        try:
            address = ipaddress.ip_address(client_ip)
        except ValueError:
            return False
        return any(address in network for network in self._allowlist)

    def _set_degraded(self, degraded: bool) -> None:
        if degraded != self._degraded and not degraded:
            log.info("rate_limit_recovered")
        self._degraded = degraded
        RATE_LIMIT_DEGRADED.set(1 if degraded else 0)

    async def hit(self, key: str, policy: Policy) -> Decision:
        bucket = f"rl:{policy.name}:{key}"
        try:
            allowed, remaining, retry, reset = await self._script(
                keys=[bucket], args=[policy.interval_ms, policy.burst]
            )
        except (RedisError, OSError) as error:
            if not self._degraded:  # log the transition only
                log.warning("rate_limit_degraded", error=type(error).__name__)
            self._set_degraded(True)
            return self._fallback.hit(bucket, policy)
        self._set_degraded(False)
        return Decision(bool(allowed), policy.burst, int(remaining), int(retry), int(reset))

    async def enforce(self, key: str, policy: Policy, *, client_ip: str | None) -> Decision:
        decision = await self.hit(key, policy)
        if not decision.allowed:
            RATE_LIMIT_REJECTIONS.labels(policy.name).inc()
            # Keys are ids or hashes, never emails; the IP is what abuse detection needs.
            log.warning("rate_limited", policy=policy.name, key=key, client_ip=client_ip)
            raise RateLimitedError(
                "Too many requests; retry after the time in Retry-After",
                headers=decision.headers(),
            )
        return decision
