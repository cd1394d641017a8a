"""Request-scoped dependencies: the unit of work, Redis and settings."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.cache import PENDING_TAGS, Cache, invalidate_committed
from koinonia.cache import invalidate_on_commit as invalidate_on_commit  # re-exported
from koinonia.db import Database
from koinonia.settings import Settings


def get_database(request: Request) -> Database:
    database: Database = request.app.state.database
    return database


def get_redis(request: Request) -> Redis:
    redis: Redis = request.app.state.redis
    return redis


def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def unit_of_work(request: Request) -> AsyncIterator[AsyncSession]:
    """One transaction per request: committed before the answer is sent, or rolled back.

    Used with `scope="function"` so the commit happens before the response goes out: a
    client never sees a success whose commit then failed.
    """
    database = get_database(request)
    async with database.sessions() as session:
        try:
            yield session
            await session.commit()
        except BaseException:
            await session.rollback()
            # A route that committed part of its work before failing (dead-letter replay)
            # still invalidates what that part named.
            await invalidate_committed(get_cache(request), session)
            raise
        principal = getattr(request.state, "principal", None)
        if principal is not None and request.method not in ("GET", "HEAD", "OPTIONS"):
            # Read-your-own-writes: this church reads from the primary for a while.
            await request.app.state.replicas.note_write(principal.church_id)
        # Tags named with `invalidate_on_commit` during the request, now committed.
        await invalidate_committed(get_cache(request), session)


CACHE_TAGS_KEY = PENDING_TAGS


def get_cache(request: Request) -> Cache:
    cache: Cache = request.app.state.cache
    return cache


DbSession = Annotated[AsyncSession, Depends(unit_of_work, scope="function")]
# FastAPI runs a plain `def` dependency in its thread pool: a thread hand-off (and GIL
# traffic) per request for an attribute lookup. The dependencies are `async def`.
async def _redis(request: Request) -> Redis:
    return get_redis(request)


async def _settings(request: Request) -> Settings:
    return get_app_settings(request)


async def _cache(request: Request) -> Cache:
    return get_cache(request)


async def _database(request: Request) -> Database:
    return get_database(request)


RedisClient = Annotated[Redis, Depends(_redis)]
AppSettings = Annotated[Settings, Depends(_settings)]
AppCache = Annotated[Cache, Depends(_cache)]
AppDatabase = Annotated[Database, Depends(_database)]
