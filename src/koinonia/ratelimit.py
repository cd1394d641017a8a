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
from typing import NoReturn

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


# One round trip for an authenticated request: the caller's bucket, the per-IP bucket of
# failed authentications and the caller's revocation version, all in one script.
# KEYS[1] caller's bucket, KEYS[2] failure bucket of the client IP, KEYS[3] version key.
# ARGV[1] interval ms, ARGV[2] burst, ARGV[3] failure interval ms, ARGV[4] failure burst,
# ARGV[5] version carried by the token ('' = no version check), ARGV[6] '1' = refuse when
# the failure bucket is full (the caller is about to cost database work).
# Returns {allowed, remaining, retry_after_ms, reset_ms, status}; status 0 ok, 1 refused
# because the IP failed too often, 2 the version is missing or differs (ask the database).
_GATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local status = 0
if ARGV[5] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[5] then status = 2 end
if ARGV[6] == '1' or status == 2 then
  local finterval = tonumber(ARGV[3])
  local ftat = tonumber(redis.call('GET', KEYS[2]) or now)
  if ftat < now then ftat = now end
  local over = ftat + finterval - now - finterval * tonumber(ARGV[4])
  if over > 0 then return {0, 0, over, ftat - now, 1} end
end
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local tolerance = interval * burst
local new_tat = tat + interval
if new_tat - now > tolerance then
  return {0, 0, new_tat - tolerance - now, tat - now, status}
end
redis.call('SET', KEYS[1], new_tat, 'PX', new_tat - now)
return {1, math.floor((tolerance - (new_tat - now)) / interval), 0, new_tat - now, status}
"""

# Raise a version key to ARGV[1] unless it already holds a higher one (never lower it: a
# reader that saw an older version must not overwrite a newer one). KEYS[1]; ARGV[2] TTL s
# (applied when the value is set, or confirmed equal; a higher value keeps its own TTL).
_RAISE = """
local current = tonumber(redis.call('GET', KEYS[1]) or '-1')
local wanted = tonumber(ARGV[1])
if wanted > current then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return 1
end
if wanted == current then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

GATE_OK = 0
GATE_FAILURES = 1
GATE_VERSION_UNKNOWN = 2


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


@dataclass(frozen=True, slots=True)
class GateResult:
    decision: Decision
    # GATE_OK, GATE_FAILURES (refused: the IP failed too often) or GATE_VERSION_UNKNOWN
    # (the version in Redis is missing or differs: the caller must ask the database).
    status: int


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

    def full(self, key: str, policy: Policy) -> Decision | None:
        """The refusal the next hit on `key` would get, without taking it (None: allowed)."""
        now = self._clock_ms()
        decision, _ = gcra(self._tats.get(key, now), now, policy)
        return None if decision.allowed else decision


class RateLimiter:
    def __init__(self, redis: Redis, allowlist: list[str]) -> None:
        self._redis = redis
        self._script = redis.register_script(_GCRA)
        self._gate = redis.register_script(_GATE)
        self._raise = redis.register_script(_RAISE)
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
            self._unavailable(error)
            return self._fallback.hit(bucket, policy)
        self._set_degraded(False)
        return Decision(bool(allowed), policy.burst, int(remaining), int(retry), int(reset))

    @property
    def degraded(self) -> bool:
        return self._degraded

    def _unavailable(self, error: Exception) -> None:
        if not self._degraded:  # log the transition only
            log.warning("rate_limit_degraded", error=type(error).__name__)
        self._set_degraded(True)

    async def gate(
        self,
        key: str,
        policy: Policy,
        *,
        failure_key: str,
        failure_policy: Policy,
        version_key: str = "",
        version: int | None = None,
        refuse_failing: bool = False,
    ) -> GateResult:
        """The caller's limit, the failure limit of its IP and its version: one round trip.

        `version` (with `version_key`) is compared with the version stored in Redis;
        `refuse_failing` refuses at once an IP over its failure limit. When Redis is down
        the limits run in process and the version is always GATE_VERSION_UNKNOWN.
        """
        bucket = f"rl:{policy.name}:{key}"
        failures = f"rl:{failure_policy.name}:{failure_key}"
        try:
            allowed, remaining, retry, reset, status = await self._gate(
                keys=[bucket, failures, version_key or bucket],
                args=[
                    policy.interval_ms,
                    policy.burst,
                    failure_policy.interval_ms,
                    failure_policy.burst,
                    "" if version is None else str(version),
                    "1" if refuse_failing else "0",
                ],
            )
        except (RedisError, OSError) as error:
            self._unavailable(error)
            unknown = GATE_OK if version is None else GATE_VERSION_UNKNOWN
            if refuse_failing or unknown:
                refused = self._fallback.full(failures, failure_policy)
                if refused is not None:
                    return GateResult(refused, GATE_FAILURES)
            return GateResult(self._fallback.hit(bucket, policy), unknown)
        self._set_degraded(False)
        limit = failure_policy.burst if status == GATE_FAILURES else policy.burst
        decision = Decision(bool(allowed), limit, int(remaining), int(retry), int(reset))
        return GateResult(decision, int(status))

    async def raise_version(self, key: str, version: int, ttl_seconds: int) -> None:
        """Store `version` unless a higher one is stored (raises RedisError when down)."""
        await self._raise(keys=[key], args=[version, ttl_seconds])

    def refuse(
        self, key: str, policy: Policy, decision: Decision, client_ip: str | None
    ) -> NoReturn:
        RATE_LIMIT_REJECTIONS.labels(policy.name).inc()
        # Keys are ids or hashes, never emails; the IP is what abuse detection needs.
        log.warning("rate_limited", policy=policy.name, key=key, client_ip=client_ip)
        raise RateLimitedError(
            "Too many requests; retry after the time in Retry-After",
            headers=decision.headers(),
        )

    async def enforce(self, key: str, policy: Policy, *, client_ip: str | None) -> Decision:
        decision = await self.hit(key, policy)
        if not decision.allowed:
            self.refuse(key, policy, decision, client_ip)
        return decision
