"""Our own send rates, shared by every worker through Redis: the whole Telnyx account's
and each sending number's.

Telnyx limits the account (50 SMS/s by default) and each sender (by number type and
10DLC campaign), and queues what exceeds them until its queue is full. We keep under
both limits ourselves so that queue never becomes the buffer. One GCRA per bucket hands
out up to `wanted` sends at a time (a burst of one second's worth): one Redis call per
chunk, not per SMS, and both buckets are charged in the same atomic script. When Telnyx
paces us anyway (429, queue full) `cool_down` stops every worker for the time it asked.
"""

from __future__ import annotations

import math
import time

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

log = structlog.get_logger(__name__)

ACCOUNT_BUCKET = "sendrate:account"
COOL_DOWN_KEY = "sendrate:cooldown"

# KEYS: account bucket, number bucket, cool-down. ARGV: wanted texts, account interval ms,
# account burst, number interval ms, number burst, account tokens kept back (for replies),
# segments per text (Telnyx counts segments as messages). A text goes when its segments
# are available — or the whole burst, for a text longer than the burst — and charges all
# of them. Returns {texts granted, wait_ms until the next one may go}.
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cool = redis.call('PTTL', KEYS[3])
if cool > 0 then return {0, cool} end
local wanted = tonumber(ARGV[1])
local function room(key, interval, burst)
  local tat = math.max(tonumber(redis.call('GET', key) or '0'), now)
  return tat, math.floor((now + interval * burst - tat) / interval)
end
local ai, ab, ni, nb = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local kept, cost = tonumber(ARGV[6]), tonumber(ARGV[7])
local atat, aroom = room(KEYS[1], ai, ab)
local ntat, nroom = room(KEYS[2], ni, nb)
local aneed, nneed = math.min(cost, ab - kept), math.min(cost, nb)
local granted = 0
if aroom - kept >= aneed and nroom >= nneed then
  granted = math.max(1, math.min(wanted, math.floor((aroom - kept) / cost),
                                 math.floor(nroom / cost)))
end
if granted > 0 then
  atat = atat + granted * cost * ai
  ntat = ntat + granted * cost * ni
  redis.call('SET', KEYS[1], atat, 'PX', math.ceil(atat - now) + 1000)
  redis.call('SET', KEYS[2], ntat, 'PX', math.ceil(ntat - now) + 1000)
end
local wait = math.max(0, atat - (now + ai * (ab - kept - aneed)), ntat - (now + ni * (nb - nneed)))
return {granted, math.ceil(wait)}
"""


def burst_of(per_second: float) -> int:
    """Half a second's sends at once. Telnyx counts texts when they arrive, after our
    claim, render and round trip: a burst of a whole second's worth let one number's
    texts land 9 in one second against 4 + 4 (Sunday-morning bench); half leaves that
    transit jitter room while the sustained rate is unchanged."""
    return max(1, math.floor(per_second / 2))


class _LocalBucket:
    def __init__(self, per_second: float) -> None:
        self.interval_ms = 1000.0 / per_second
        self.burst = burst_of(per_second)
        self.tat = 0.0

    def room(self, now: float) -> int:
        self.tat = max(self.tat, now)
        return math.floor((now + self.interval_ms * self.burst - self.tat) / self.interval_ms)

    def charge(self, granted: int) -> None:
        self.tat += granted * self.interval_ms

    def wait(self, now: float) -> float:
        return max(0.0, self.tat - (now + self.interval_ms * (self.burst - 1)))


class SendThroughput:
    """The account's rate and each number's (a default, overridden per number)."""

    def __init__(
        self,
        redis: Redis,
        *,
        account_per_second: float,
        number_per_second: float,
        number_overrides: dict[str, float] | None = None,
    ) -> None:
        self._redis = redis
        self._script = redis.register_script(_SCRIPT)
        self.account_per_second = account_per_second
        self.number_per_second = number_per_second
        self.overrides = dict(number_overrides or {})
        self._local: dict[str, _LocalBucket] = {}

    def rate_of(self, number: str) -> float:
        return self.overrides.get(number, self.number_per_second)

    @staticmethod
    def _shape(per_second: float) -> tuple[float, int]:
        return 1000.0 / per_second, burst_of(per_second)

    async def take(
        self, number: str, wanted: int, *, bulk: bool = True, segments: int = 1
    ) -> tuple[int, float]:
        """(texts of `segments` each granted now, seconds until the next one may go).
        Bulk sends leave a tenth of the account's burst for inbox texts, so replies go
        first in a surge."""
        account_interval, account_burst = self._shape(self.account_per_second)
        number_interval, number_burst = self._shape(self.rate_of(number))
        kept = account_burst // 10 if bulk else 0
        try:
            granted, wait_ms = await self._script(
                keys=[ACCOUNT_BUCKET, f"sendrate:{number}", COOL_DOWN_KEY],
                args=[
                    wanted,
                    account_interval,
                    account_burst,
                    number_interval,
                    number_burst,
                    kept,
                    max(1, segments),
                ],
            )
            return int(granted), int(wait_ms) / 1000
        except (RedisError, OSError) as error:
            log.warning("send_rate_degraded", error=type(error).__name__)
            return self._take_locally(number, wanted, max(1, segments))

    async def cool_down(self, seconds: float) -> None:
        """Telnyx asked us to slow down: no worker sends for `seconds`."""
        try:
            await self._redis.set(COOL_DOWN_KEY, 1, px=max(1, int(seconds * 1000)), nx=True)
        except (RedisError, OSError) as error:
            log.warning("send_rate_degraded", error=type(error).__name__)

    def _take_locally(self, number: str, wanted: int, segments: int) -> tuple[int, float]:
        """Without Redis: the same algorithm per process (each worker keeps to the rates)."""
        now = time.monotonic() * 1000
        account = self._local.setdefault(ACCOUNT_BUCKET, _LocalBucket(self.account_per_second))
        sender = self._local.setdefault(number, _LocalBucket(self.rate_of(number)))
        account_room, sender_room = account.room(now), sender.room(now)
        granted = 0
        if account_room >= min(segments, account.burst) and sender_room >= min(
            segments, sender.burst
        ):
            granted = max(1, min(wanted, account_room // segments, sender_room // segments))
        account.charge(granted * segments)
        sender.charge(granted * segments)
        return granted, max(account.wait(now), sender.wait(now)) / 1000
