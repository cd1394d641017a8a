"""The shared Redis client (redis-py asyncio, one connection pool per process)."""

from __future__ import annotations

from redis.asyncio import Redis

from koinonia.settings import Settings


def create_redis(settings: Settings) -> Redis:
    return Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout,
        socket_connect_timeout=settings.redis_timeout,
        health_check_interval=30,
        decode_responses=False,
        max_connections=200,
    )
