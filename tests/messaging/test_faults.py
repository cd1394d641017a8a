"""Fault scenarios: a Telnyx outage (500s) and a worker killed with SIGKILL mid-broadcast.

Marked `slow`: CI runs them with `KOINONIA_SCALE=ci` at a reduced size."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis
from sqlalchemy import text

from koinonia.settings import Settings
from tests.messaging.conftest import SendingChurch, WorkerFactory, bulk_members, eventually
from tests.support.report import REPORTS

pytestmark = pytest.mark.slow
CI = os.environ.get("KOINONIA_SCALE") == "ci"


async def _states(app: FastAPI, message_id: str) -> dict[str, int]:
    async with app.state.database.unit_of_work() as session:
        rows = await session.execute(
            text(
                "SELECT status, count(*) FROM message_recipients "
                "WHERE message_id = :m GROUP BY status"
            ),
            {"m": uuid.UUID(message_id)},
        )
        return {str(s): int(n) for s, n in rows}


async def _sandbox_counts(sandbox_http: httpx.AsyncClient, area: str) -> Counter[str]:
    log = (await sandbox_http.get("/sandbox/messages")).json()
    phones = (t["to"][0]["phone_number"] for t in log["data"])
    return Counter(p for p in phones if p.startswith(f"+1{area}"))


async def test_provider_outage_opens_the_circuit_and_loses_nothing(
    client: httpx.AsyncClient,
    app: FastAPI,
    settings: Settings,
    redis: Redis,
    sending_church: SendingChurch,
    sandbox_http: httpx.AsyncClient,
    worker: WorkerFactory,
) -> None:
    area = "628"
    count = 30
    group_id = await bulk_members(app, settings, sending_church.account.church_id, count, area)
    await redis.delete("cb:telnyx", "cb:telnyx:failures", "cb:telnyx:probe")
    await sandbox_http.post("/sandbox/faults", json={"error_rate": 1.0, "status": 500})
    sent = await client.post(
        "/api/v1/messages",
        json={"body": "Outage test", "group_ids": [group_id]},
        headers=sending_church.headers,
    )
    assert sent.status_code == 202, sent.text
    message_id = sent.json()["id"]
    try:
        async with worker(
            send_reconcile_after_seconds=1.0, send_lease_seconds=1.0, send_concurrency=8
        ):

            async def circuit_open() -> Any:
                state = await redis.hget("cb:telnyx", "state")
                return state == b"open"

            await eventually(circuit_open, within=20)
            health = (await client.get("/api/v1/health")).json()
            assert health["checks"]["telnyx"]["status"] != "ok"
            await asyncio.sleep(2)
            await sandbox_http.delete("/sandbox/faults")

            async def all_delivered() -> Any:
                states = await _states(app, message_id)
                return states if states.get("delivered") == count else None

            await eventually(all_delivered, within=60)
    finally:
        await sandbox_http.delete("/sandbox/faults")
    counts = await _sandbox_counts(sandbox_http, area)
    assert len(counts) == count and set(counts.values()) == {1}
    assert await redis.hget("cb:telnyx", "state") in (None, b"closed")
    message = (
        await client.get(f"/api/v1/messages/{message_id}", headers=sending_church.headers)
    ).json()
    assert message["status"] == "completed" and message["counts"]["delivered"] == count


@pytest.mark.nopgbouncer  # minutes long; the PgBouncer pass runs the outage scenario
async def test_worker_killed_mid_broadcast_sends_each_phone_once(
    client: httpx.AsyncClient,
    app: FastAPI,
    settings: Settings,
    redis: Redis,
    sending_church: SendingChurch,
    sandbox_http: httpx.AsyncClient,
    worker: WorkerFactory,
) -> None:
    area = "646"
    count = 1_000 if CI else 10_000
    group_id = await bulk_members(app, settings, sending_church.account.church_id, count, area)
    await redis.delete("cb:telnyx", "cb:telnyx:failures", "cb:telnyx:probe")
    sent = await client.post(
        "/api/v1/messages",
        json={"body": "Kill test", "group_ids": [group_id]},
        headers=sending_church.headers,
    )
    assert sent.status_code == 202, sent.text
    message_id = sent.json()["id"]
    env = os.environ | {
        "KOINONIA_ENV": "test",
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "TELNYX_BASE_URL": str(settings.telnyx_base_url),
        "TELNYX_PUBLIC_KEY": settings.telnyx_public_key,
        "PUBLIC_BASE_URL": str(settings.public_base_url),
        "SENDS_PER_SECOND_PER_NUMBER": "500",
        "SEND_LEASE_SECONDS": "12",
        "SEND_RECONCILE_AFTER_SECONDS": "3",
        "LOG_LEVEL": "WARNING",
    }
    victim = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "koinonia",
        "worker",
        "--queue",
        "sms",
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        async def some_sent() -> Any:
            return sum((await _sandbox_counts(sandbox_http, area)).values()) >= count // 4

        await eventually(some_sent, within=60, every=0.05)
    finally:
        victim.send_signal(signal.SIGKILL)
        await victim.wait()
    at_kill = await _states(app, message_id)
    async with worker(send_reconcile_after_seconds=3.0, send_lease_seconds=12.0):

        async def all_final() -> Any:
            states = await _states(app, message_id)
            return (
                states
                if not states.get("queued") and not states.get("sending") and not states.get("sent")
                else None
            )

        final = await eventually(all_final, within=180, every=0.5)
    counts = await _sandbox_counts(sandbox_http, area)
    assert max(counts.values()) == 1, "a phone received the broadcast twice"
    assert final == {"delivered": count}
    assert len(counts) == count
    REPORTS.append(
        f"SIGKILL mid-broadcast ({count} recipients): at the kill {at_kill}; "
        f"after restart every recipient delivered, each phone texted exactly once"
    )
