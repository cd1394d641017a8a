"""A circuit breaker per provider, shared by every process through Redis.

Closed: calls go through; 5 failures within 60 s open it. Open: calls are refused until
`open_until`; then one caller at a time gets a half-open probe. A probe's success closes
the circuit; its failure re-opens it for twice as long (1 s, 2 s, … 32 s). One Lua script
per transition keeps it atomic across processes, with Redis's clock.

pybreaker keeps its state per process (its Redis storage is not atomic across them and
has no growing probe backoff), so this is our own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog
from prometheus_client import Counter, Gauge
from redis.asyncio import Redis
from redis.exceptions import RedisError

log = structlog.get_logger(__name__)

CIRCUIT_STATE = Gauge("koinonia_circuit_state", "0 closed, 1 half-open, 2 open", ["provider"])
CIRCUIT_TRANSITIONS = Counter(
    "koinonia_circuit_transitions_total", "Circuit state changes", ["provider", "to"]
)
_STATE_VALUE = {"closed": 0, "half_open": 1, "open": 2}

# KEYS: state hash, failures zset, probe lock. ARGV: action, threshold, window ms,
# min backoff ms, max backoff ms. Returns {state, retry_after_ms, transitioned(0/1)}.
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local action, threshold, window = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local min_backoff, max_backoff = tonumber(ARGV[4]), tonumber(ARGV[5])
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
local backoff = tonumber(redis.call('HGET', KEYS[1], 'backoff') or min_backoff)
local function open(duration)
  redis.call('HSET', KEYS[1], 'state', 'open', 'open_until', now + duration,
             'backoff', duration)
  redis.call('DEL', KEYS[2], KEYS[3])
end
if action == 'allow' then
  if state == 'closed' then return {'closed', 0, 0} end
  if state == 'open' and now < open_until then return {'open', open_until - now, 0} end
  if redis.call('SET', KEYS[3], now, 'NX', 'PX', 30000) then
    redis.call('HSET', KEYS[1], 'state', 'half_open')
    return {'half_open', 0, state ~= 'half_open' and 1 or 0}
  end
  return {'open', math.max(open_until - now, 100), 0}
elseif action == 'success' then
  if state ~= 'closed' then
    redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
    return {'closed', 0, 1}
  end
  return {'closed', 0, 0}
else
  if state == 'half_open' then
    open(math.min(backoff * 2, max_backoff))
    return {'open', math.min(backoff * 2, max_backoff), 1}
  end
  if state == 'open' then return {'open', math.max(open_until - now, 0), 0} end
  redis.call('ZADD', KEYS[2], now, now .. ':' .. math.random())
  redis.call('ZREMRANGEBYSCORE', KEYS[2], 0, now - window)
  redis.call('PEXPIRE', KEYS[2], window)
  if redis.call('ZCARD', KEYS[2]) >= threshold then
    open(min_backoff)
    return {'open', min_backoff, 1}
  end
  return {'closed', 0, 0}
end
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class CircuitOpenError(Exception):
    def __init__(self, provider: str, retry_after: float) -> None:
        super().__init__(f"{provider} circuit is open")
        self.provider = provider
        self.retry_after = retry_after


@dataclass(frozen=True)
class BreakerStatus:
    provider: str
    state: str
    retry_after: float


class CircuitBreaker:
    def __init__(
        self,
        redis: Redis,
        provider: str,
        *,
        threshold: int = 5,
        window_seconds: float = 60,
        min_backoff: float = 1,
        max_backoff: float = 32,
    ) -> None:
        self.provider = provider
        self._redis = redis
        self._script = redis.register_script(_SCRIPT)
        self._keys = [f"cb:{provider}", f"cb:{provider}:failures", f"cb:{provider}:probe"]
        self._args = [
            threshold,
            int(window_seconds * 1000),
            int(min_backoff * 1000),
            int(max_backoff * 1000),
        ]

    async def _run(self, action: str) -> BreakerStatus:
        try:
            state, retry_ms, moved = await self._script(keys=self._keys, args=[action, *self._args])
        except (RedisError, OSError) as error:
            # Without Redis the breaker cannot be shared; calls go through (the provider's
            # own errors and the retry policy still apply) rather than stopping all sends.
            log.warning(
                "circuit_breaker_unavailable", provider=self.provider, error=type(error).__name__
            )
            return BreakerStatus(self.provider, "closed", 0)
        state = state.decode() if isinstance(state, bytes) else str(state)
        CIRCUIT_STATE.labels(self.provider).set(_STATE_VALUE[state])
        if moved:
            CIRCUIT_TRANSITIONS.labels(self.provider, state).inc()
            log.warning(
                "circuit_transition",
                provider=self.provider,
                state=state,
                retry_after_ms=int(retry_ms),
            )
        return BreakerStatus(self.provider, state, int(retry_ms) / 1000)

    async def allow(self) -> BreakerStatus:
        """May a call go out now? `half_open` means: one probe, by this caller."""
        return await self._run("allow")

    async def before_call(self) -> None:
        """Raise `CircuitOpenError` when the call must not go out now."""
        status = await self._run("allow")
        if status.state == "open":
            raise CircuitOpenError(self.provider, status.retry_after)

    async def success(self) -> None:
        await self._run("success")

    async def failure(self) -> None:
        await self._run("failure")

    async def status(self) -> BreakerStatus:
        try:
            raw = await self._redis.hgetall(self._keys[0])
        except (RedisError, OSError):
            return BreakerStatus(self.provider, "unknown", 0)
        values = {_text(k): _text(v) for k, v in raw.items()}
        state = values.get("state", "closed")
        retry = max(0.0, int(values.get("open_until", 0)) / 1000 - time.time())
        return BreakerStatus(self.provider, state, retry if state == "open" else 0)
