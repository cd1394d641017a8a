"""Redis read-through cache with tag invalidation, stale-while-revalidate and stampede
protection (XFetch probabilistic early expiry plus a recompute lock).

Why our own: cashews covers locks and early refresh but not XFetch (Vattani et al.,
VLDB 2015), and tag invalidation through per-tag version counters keeps invalidation O(1)
and atomic with the read (one Lua call returns the versioned key and the entry).

If Redis is unavailable the loader runs directly: the API keeps serving from the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from prometheus_client import Counter, Histogram
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, SessionTransaction

T = TypeVar("T")

log = structlog.get_logger("koinonia.cache")

CACHE_REQUESTS = Counter(
    "koinonia_cache_requests_total", "Cache lookups by outcome", ["cache", "result"]
)
CACHE_LOAD_SECONDS = Histogram(
    "koinonia_cache_load_seconds", "Time to compute a cache miss", ["cache"]
)

PREFIX = "cache:"
TAG_PREFIX = "cache-tag:"
LOCK_TTL_MS = 5_000

# KEYS: tag version keys. ARGV[1]: base key. Returns {versioned key, entry or false}.
_READ_SCRIPT = """
local versions = {}
for i, tag in ipairs(KEYS) do
  versions[i] = redis.call('GET', tag) or '0'
end
local key = ARGV[1] .. '|' .. table.concat(versions, '.')
return {key, redis.call('GET', key)}
"""


@dataclass(frozen=True, slots=True)
class CachePolicy:
    name: str
    ttl: float  # seconds an entry is fresh
    stale_ttl: float = 0.0  # seconds a stale entry may still be served while refreshing
    beta: float = 1.0  # XFetch eagerness; 0 disables early expiry


class Cache:
    def __init__(self, redis: Redis, *, rng: random.Random | None = None) -> None:
        self.redis = redis
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self._read = redis.register_script(_READ_SCRIPT)
        self._refreshing: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()  # the loop keeps only weak references

    async def get_or_load(
        self,
        policy: CachePolicy,
        key: str,
        loader: Callable[[], Awaitable[T]],
        *,
        tags: Sequence[str] = (),
    ) -> T:
        base = f"{PREFIX}{policy.name}:{key}"
        try:
            versioned, raw = await self._read(keys=[TAG_PREFIX + t for t in tags], args=[base])
        except RedisError as error:
            CACHE_REQUESTS.labels(policy.name, "error").inc()
            log.warning("cache_unavailable", cache=policy.name, error=type(error).__name__)
            return await loader()
        versioned = versioned.decode() if isinstance(versioned, bytes) else str(versioned)
        now = time.time()
        if raw:
            entry = json.loads(raw)
            value: T = entry["v"]
            expires, delta = float(entry["e"]), float(entry["d"])
            if now < expires and not self._early(policy, now, expires, delta):
                CACHE_REQUESTS.labels(policy.name, "hit").inc()
                return value
            if now < expires + policy.stale_ttl:
                # Stale (or chosen for early refresh): serve it, refresh once in background.
                CACHE_REQUESTS.labels(policy.name, "stale").inc()
                self._refresh_in_background(policy, versioned, loader)
                return value
        CACHE_REQUESTS.labels(policy.name, "miss").inc()
        return await self._load_locked(policy, versioned, loader)

    def _early(self, policy: CachePolicy, now: float, expires: float, delta: float) -> bool:
        """XFetch: recompute before expiry with a probability that grows near it."""
        if policy.beta <= 0 or delta <= 0:
            return False
        return now - delta * policy.beta * math.log(self.rng.random() or 1e-12) >= expires

    async def _load_locked(
        self, policy: CachePolicy, key: str, loader: Callable[[], Awaitable[T]]
    ) -> T:
        lock_key = f"{key}|lock"
        try:
            got_lock = await self.redis.set(lock_key, b"1", nx=True, px=LOCK_TTL_MS)
        except RedisError:
            return await loader()
        if not got_lock:
            # Someone else computes it: wait briefly for their result instead of stampeding.
            for _ in range(20):
                await asyncio.sleep(0.025)
                try:
                    raw = await self.redis.get(key)
                except RedisError:
                    break
                if raw:
                    value: T = json.loads(raw)["v"]
                    return value
            return await loader()
        try:
            return await self._compute_and_store(policy, key, loader)
        finally:
            with contextlib.suppress(RedisError):
                await self.redis.delete(lock_key)

    async def _compute_and_store(
        self, policy: CachePolicy, key: str, loader: Callable[[], Awaitable[T]]
    ) -> T:
        started = time.perf_counter()
        value = await loader()
        delta = time.perf_counter() - started
        CACHE_LOAD_SECONDS.labels(policy.name).observe(delta)
        entry = {"v": value, "e": time.time() + policy.ttl, "d": delta}
        ttl_ms = max(1, int((policy.ttl + policy.stale_ttl) * 1000))
        with contextlib.suppress(RedisError):
            await self.redis.set(key, json.dumps(entry, default=str), px=ttl_ms)
        return value

    def _refresh_in_background(
        self, policy: CachePolicy, key: str, loader: Callable[[], Awaitable[Any]]
    ) -> None:
        if key in self._refreshing:
            return
        self._refreshing.add(key)

        async def refresh() -> None:
            try:
                await self._load_locked(policy, key, loader)
            except Exception:  # a failed background refresh keeps the stale value
                log.exception("cache_refresh_failed", cache=policy.name)
            finally:
                self._refreshing.discard(key)

        task = asyncio.get_running_loop().create_task(refresh())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def invalidate(self, *tags: str) -> None:
        """Every entry read under one of these tags is invalid from now on."""
        if not tags:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for tag in tags:
                    pipe.incr(TAG_PREFIX + tag)
                await pipe.execute()
        except RedisError as error:
            # Entries expire by TTL; log so the window of staleness is visible.
            log.warning("cache_invalidation_failed", tags=list(tags), error=type(error).__name__)


def church_tag(church_id: object, what: str) -> str:
    return f"church:{church_id}:{what}"


# The per-church tags of the cached reads (docs/scaling.md, "Caches"). Named here, not in
# the features, so that every writer — whatever feature or job it lives in — can
# invalidate without importing the reader.
def inbox_tag(church_id: object) -> str:
    """`GET /conversations` (first pages): conversations and the members shown in them."""
    return church_tag(church_id, "inbox")


def usage_tag(church_id: object) -> str:
    """`GET /billing/usage`: the segment ledger and the subscription's period."""
    return church_tag(church_id, "usage")


def group_counts_tag(church_id: object) -> str:
    """`member_count` of `GET /groups`: group memberships."""
    return church_tag(church_id, "groups")


# Invalidation after commit. A writer only names the tags (`invalidate_on_commit`); the
# place that commits invalidates them once the COMMIT has succeeded: the request's unit
# of work (http/deps.py), `Database.unit_of_work` and `retry.in_transaction` (jobs,
# webhooks, the CLI), each through `invalidate_committed`. Never before the commit: a read
# between an early invalidation and the commit would cache the old data again under the
# new version. A transaction that rolls back invalidates nothing it named.
PENDING_TAGS = "koinonia.cache_tags"
COMMITTED_TAGS = "koinonia.cache_tags_committed"


def invalidate_on_commit(session: AsyncSession | Session, *tags: str) -> None:
    """Invalidate these cache tags once the session's transaction has committed."""
    session.info.setdefault(PENDING_TAGS, set()).update(tags)


def pending_tags(session: AsyncSession | Session) -> set[str]:
    """Tags named in the transaction still open (or whose COMMIT had no answer)."""
    return set(session.info.get(PENDING_TAGS, ()))


@event.listens_for(Session, "after_commit")
def _tags_committed(session: Session) -> None:
    if session.in_nested_transaction():
        return  # a SAVEPOINT released: its tags wait for the outer COMMIT
    pending = session.info.pop(PENDING_TAGS, None)
    if pending:
        session.info.setdefault(COMMITTED_TAGS, set()).update(pending)


@event.listens_for(Session, "after_transaction_end")
def _transaction_ended(session: Session, transaction: SessionTransaction) -> None:
    # The outermost transaction ended: anything still pending was rolled back with it
    # (a commit moved its tags on first). A SAVEPOINT rolling back keeps every tag of the
    # transaction (at worst one invalidation too many, never one too few).
    if transaction.parent is None:
        session.info.pop(PENDING_TAGS, None)


async def invalidate_committed(cache: Cache | None, session: AsyncSession | Session) -> None:
    """Invalidate the tags of the session's committed transactions (called right after
    the COMMIT by whoever ran it; without a cache — a CLI without Redis — they are
    dropped and the entries expire by their TTL)."""
    tags = session.info.pop(COMMITTED_TAGS, None)
    if tags and cache is not None:
        await cache.invalidate(*sorted(tags))
