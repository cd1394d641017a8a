"""SIGTERM to a real `koinonia worker` with a broadcast in flight: it stops claiming,
writes back the sends it has in flight, exits 0 within WORKER_SHUTDOWN_SECONDS, and leaves
nothing `sending`; another worker finishes the broadcast, each phone texted once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from redis.asyncio import Redis
from sqlalchemy import text

from koinonia.settings import Settings
from tests.messaging.conftest import SendingChurch, WorkerFactory, bulk_members, eventually
from tests.support.report import REPORTS

AREA = "739"
COUNT = 600


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


async def _texted(sandbox_http: httpx.AsyncClient) -> Counter[str]:
    log = (await sandbox_http.get("/sandbox/messages")).json()
    phones = (t["to"][0]["phone_number"] for t in log["data"])
    return Counter(p for p in phones if p.startswith(f"+1{AREA}"))


def _events(path: Path) -> list[str]:
    names = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            names.append(str(json.loads(line).get("event")))
        except (ValueError, AttributeError):
            continue
    return names


async def test_sigterm_mid_broadcast_writes_back_and_exits(
    client: httpx.AsyncClient,
    app: FastAPI,
    settings: Settings,
    redis: Redis,
    sending_church: SendingChurch,
    sandbox_http: httpx.AsyncClient,
    worker: WorkerFactory,
    tmp_path: Path,
) -> None:
    group_id = await bulk_members(app, settings, sending_church.account.church_id, COUNT, AREA)
    await redis.delete("cb:telnyx", "cb:telnyx:failures", "cb:telnyx:probe")
    # Every send takes 100 ms: SIGTERM finds sends in flight.
    await sandbox_http.post("/sandbox/faults", json={"latency_ms": 100})
    sent = await client.post(
        "/api/v1/messages",
        json={"body": "Shutdown test", "group_ids": [group_id]},
        headers=sending_church.headers,
    )
    assert sent.status_code == 202, sent.text
    message_id = sent.json()["id"]
    log_path = tmp_path / "worker.log"
    shutdown_seconds = 20
    with log_path.open("w") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "koinonia",
            "worker",
            "--queue",
            "sms",
            env=os.environ
            | {
                "KOINONIA_ENV": "test",
                "DATABASE_URL": settings.database_url,
                "REDIS_URL": settings.redis_url,
                "TELNYX_BASE_URL": str(settings.telnyx_base_url),
                "TELNYX_PUBLIC_KEY": settings.telnyx_public_key,
                "PUBLIC_BASE_URL": str(settings.public_base_url),
                "SENDS_PER_SECOND_PER_NUMBER": "100",
                "SEND_CONCURRENCY": "16",
                "WORKER_SHUTDOWN_SECONDS": str(shutdown_seconds),
                "WORKER_METRICS_PORT": "0",
                "LOG_LEVEL": "INFO",
            },
            stdout=log_file,
            stderr=log_file,
        )
        try:

            async def some_sent() -> Any:
                return sum((await _texted(sandbox_http)).values()) >= COUNT // 6

            await eventually(some_sent, within=60, every=0.05)
            process.send_signal(signal.SIGTERM)
            stopping = time.monotonic()
            async with asyncio.timeout(shutdown_seconds + 15):
                code = await process.wait()
            stopped_in = time.monotonic() - stopping
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            await sandbox_http.delete("/sandbox/faults")
    log_tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
    assert code == 0, log_tail
    events = _events(log_path)
    assert "worker_stop_requested" in events, log_tail
    assert "worker_jobs_aborted" not in events and "worker_shutdown_timeout" not in events
    at_exit = await _states(app, message_id)
    # Every send in flight was written back; what was not claimed waits for the next worker.
    assert not at_exit.get("sending"), at_exit
    assert sum(at_exit.values()) == COUNT
    texted_at_exit = sum((await _texted(sandbox_http)).values())
    assert texted_at_exit < COUNT, "the broadcast finished before the stop: nothing tested"

    async with worker():

        async def all_delivered() -> Any:
            states = await _states(app, message_id)
            return states if states.get("delivered") == COUNT else None

        await eventually(all_delivered, within=90, every=0.25)
    counts = await _texted(sandbox_http)
    assert len(counts) == COUNT and set(counts.values()) == {1}, "a phone was texted twice"
    REPORTS.append(
        f"SIGTERM mid-broadcast ({COUNT} recipients, 100 ms per send): worker exited 0 in "
        f"{stopped_in:.1f} s with {texted_at_exit} texted and none left sending; "
        "the next worker finished, each phone once"
    )
