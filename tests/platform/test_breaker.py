"""The shared circuit breaker's state machine, on the real Redis."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from prometheus_client import REGISTRY

from koinonia.breaker import CircuitBreaker, CircuitOpenError


def _breaker(redis: Any, name: str, **kwargs: Any) -> CircuitBreaker:
    options = {"threshold": 3, "window_seconds": 60, "min_backoff": 0.2, "max_backoff": 0.8}
    return CircuitBreaker(redis, name, **(options | kwargs))


async def test_opens_after_threshold_and_probes_with_growing_backoff(redis: Any) -> None:
    name = f"test-{uuid.uuid4().hex[:6]}"
    breaker = _breaker(redis, name)
    other_process = _breaker(redis, name)  # shares the state through Redis
    for _ in range(2):
        await breaker.failure()
    await other_process.before_call()  # 2 failures: still closed
    await breaker.failure()
    with pytest.raises(CircuitOpenError) as opened:
        await other_process.before_call()
    assert 0 < opened.value.retry_after <= 0.2
    assert (await breaker.status()).state == "open"
    assert REGISTRY.get_sample_value("koinonia_circuit_state", {"provider": name}) == 2
    await asyncio.sleep(0.25)
    await breaker.before_call()  # the one half-open probe
    with pytest.raises(CircuitOpenError):
        await other_process.before_call()  # only one probe at a time
    await breaker.failure()  # probe failed: open for twice as long
    with pytest.raises(CircuitOpenError) as reopened:
        await breaker.before_call()
    assert 0.2 < reopened.value.retry_after <= 0.4
    await asyncio.sleep(0.45)
    await breaker.before_call()
    await breaker.failure()  # 0.8 (capped)
    with pytest.raises(CircuitOpenError) as capped:
        await breaker.before_call()
    assert capped.value.retry_after <= 0.8
    await asyncio.sleep(0.85)
    await other_process.before_call()
    await other_process.success()  # the probe succeeded: closed for everyone
    await breaker.before_call()
    assert (await breaker.status()).state == "closed"
    transitions = REGISTRY.get_sample_value(
        "koinonia_circuit_transitions_total", {"provider": name, "to": "closed"}
    )
    assert transitions == 1


async def test_failures_outside_the_window_do_not_open(redis: Any) -> None:
    breaker = _breaker(redis, f"test-{uuid.uuid4().hex[:6]}", window_seconds=0.2)
    await breaker.failure()
    await breaker.failure()
    await asyncio.sleep(0.25)
    await breaker.failure()
    await breaker.before_call()


async def test_redis_down_lets_calls_through() -> None:
    from redis.asyncio import Redis

    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    breaker = _breaker(dead, "dead")
    await breaker.failure()
    await breaker.before_call()
    assert (await breaker.status()).state == "unknown"
    await dead.aclose()
