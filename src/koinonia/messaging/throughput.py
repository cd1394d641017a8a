"""Our own send rate per sending number, shared by every worker through Redis.

Telnyx queues what a number cannot send at once; we keep to the number's rate ourselves
so that queue never becomes the buffer. A GCRA that hands out up to `wanted` sends at a
time (a burst of one second's worth): one Redis call per chunk, not per SMS.
"""

from __future__ import annotations

import math
import time

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

log = structlog.get_logger(__name__)

# KEYS[1]: the number's theoretical arrival time (ms). ARGV: wanted, interval ms, burst.
# Returns {granted, wait_ms}: wait_ms is how long until one more send may go.
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local wanted, interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now)
local room = math.floor((now + interval * burst - tat) / interval)
local granted = math.max(0, math.min(wanted, room))
if granted > 0 then
  tat = tat + granted * interval
  redis.call('SET', KEYS[1], tat, 'PX', math.ceil(tat - now) + 1000)
end
local wait = math.max(0, tat - (now + interval * (burst - 1)))
return {granted, math.ceil(wait)}
"""


class NumberThroughput:
    def __init__(self, redis: Redis, per_second: float) -> None:
        self._redis = redis
        self._script = redis.register_script(_SCRIPT)
        self.interval_ms = 1000.0 / per_second
        self.burst = max(1, math.floor(per_second))
        self._local: dict[str, float] = {}

    async def take(self, number: str, wanted: int) -> tuple[int, float]:
        """(sends granted now, seconds until the next one may go)."""
        try:
            granted, wait_ms = await self._script(
                keys=[f"sendrate:{number}"], args=[wanted, self.interval_ms, self.burst]
            )
            return int(granted), int(wait_ms) / 1000
        except (RedisError, OSError) as error:
            log.warning("send_rate_degraded", error=type(error).__name__)
            return self._take_locally(number, wanted)

    def _take_locally(self, number: str, wanted: int) -> tuple[int, float]:
        """Without Redis: the same algorithm per process (each worker keeps to the rate)."""
        now = time.monotonic() * 1000
        tat = max(self._local.get(number, now), now)
        room = math.floor((now + self.interval_ms * self.burst - tat) / self.interval_ms)
        granted = max(0, min(wanted, room))
        tat += granted * self.interval_ms
        self._local[number] = tat
        wait = max(0.0, tat - (now + self.interval_ms * (self.burst - 1)))
        return granted, wait / 1000
