"""What operators watch of sending, computed from the database where Prometheus already
scrapes (the API's `/metrics`) and shown in `/health`: paused senders by scope, and
broadcasts with work left that made no progress for `BROADCAST_STALL_SECONDS`.

Gauges set in a worker would need the worker scraped; these are facts in the database,
so any API process can tell them. Refreshed at most every few seconds per process.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import structlog
from fastapi import FastAPI
from prometheus_client import Gauge
from sqlalchemy import text

from koinonia.db import Database
from koinonia.health.checks import Degraded, HealthCheck

log = structlog.get_logger(__name__)

SENDING_PAUSED = Gauge(
    "koinonia_sending_paused", "Senders paused by a provider refusal, by scope", ["scope"]
)
BROADCASTS_STALLED = Gauge(
    "koinonia_broadcasts_stalled",
    "Broadcasts with work left and no progress for BROADCAST_STALL_SECONDS (not paused, "
    "not waiting for their sending window)",
)
REFRESH_SECONDS = 5.0

SNAPSHOT_SQL = """
SELECT
  (SELECT count(*) FROM sender_pauses WHERE scope = 'account') AS account_paused,
  (SELECT count(*) FROM sender_pauses WHERE scope = 'number') AS numbers_paused,
  (SELECT count(*) FROM messages m
   WHERE m.status IN ('queued', 'sending')
     AND m.updated_at < now() - make_interval(secs => :stall)
     AND (m.starts_at IS NULL OR m.starts_at < now())
     AND NOT EXISTS (SELECT 1 FROM sender_pauses p WHERE p.scope = 'account')
     AND NOT EXISTS (
       SELECT 1 FROM sender_pauses p JOIN churches c ON p.key = c.phone_number
       WHERE p.scope = 'number' AND c.id = m.church_id)) AS stalled
"""


@dataclass
class Snapshot:
    account_paused: int = 0
    numbers_paused: int = 0
    stalled: int = 0
    taken: float = 0.0


class SendingMonitor:
    def __init__(self, database: Database, stall_seconds: float) -> None:
        self._database = database
        self._stall = stall_seconds
        self.snapshot = Snapshot()

    async def refresh(self) -> Snapshot:
        if time.monotonic() - self.snapshot.taken < REFRESH_SECONDS:
            return self.snapshot
        async with self._database.engine.connect() as connection:
            row = (await connection.execute(text(SNAPSHOT_SQL), {"stall": self._stall})).one()
        previous = self.snapshot.stalled
        self.snapshot = Snapshot(
            int(row.account_paused), int(row.numbers_paused), int(row.stalled), time.monotonic()
        )
        SENDING_PAUSED.labels("account").set(self.snapshot.account_paused)
        SENDING_PAUSED.labels("number").set(self.snapshot.numbers_paused)
        BROADCASTS_STALLED.set(self.snapshot.stalled)
        if self.snapshot.stalled and self.snapshot.stalled != previous:
            log.error("broadcasts_stalled", count=self.snapshot.stalled)
        return self.snapshot

    def health_check(self) -> HealthCheck:
        async def probe() -> None:
            snapshot = await self.refresh()
            paused = snapshot.account_paused + snapshot.numbers_paused
            if paused or snapshot.stalled:
                raise Degraded(
                    f"{paused} paused senders ({snapshot.account_paused} account-wide); "
                    f"{snapshot.stalled} broadcasts without progress"
                )

        return HealthCheck("sending", probe, critical=False)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    monitor = SendingMonitor(app.state.database, app.state.settings.broadcast_stall_seconds)
    app.state.health_checks.append(monitor.health_check())
    app.state.metrics_refreshers.append(monitor.refresh)
    yield
