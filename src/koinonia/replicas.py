"""Read replicas: lag-aware routing with read-your-own-writes.

Reads that may be slightly stale (lists, dashboards) take `ReadSession`; it goes to a
replica when one is configured, healthy and within `REPLICA_MAX_LAG_SECONDS`, unless the
calling church wrote something in the last `READ_YOUR_WRITES_SECONDS` (then the primary,
so a client always sees its own change). No replica fits → the primary.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

import structlog
from fastapi import Depends, Request
from prometheus_client import Gauge
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.db import Database

log = structlog.get_logger("koinonia.replicas")

REPLICA_LAG = Gauge(
    "koinonia_db_replica_lag_seconds",
    "Replay lag of each replica (-1 when unreachable)",
    ["replica"],
)
READS_ROUTED = Gauge("koinonia_db_replica_usable", "1 when a replica takes reads", ["replica"])

# 0 when the replica has replayed everything it received; otherwise the age of the last
# replayed transaction (an idle primary must not look like lag).
_LAG_SQL = text(
    "SELECT CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 "
    "ELSE EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()) END"
)


def _ryw_key(church_id: uuid.UUID | str) -> str:
    return f"ryw:{church_id}"


class ReplicaRouter:
    def __init__(
        self,
        database: Database,
        redis: Redis,
        *,
        max_lag: float,
        ryw_seconds: float,
        interval: float = 1.0,
    ) -> None:
        self.database = database
        self.redis = redis
        self.max_lag = max_lag
        self.ryw_seconds = ryw_seconds
        self.interval = interval
        self.lags: list[float | None] = [None] * len(database.replica_engines)
        self._turn = itertools.count()
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.database.replica_engines)

    async def measure(self) -> None:
        for index, engine in enumerate(self.database.replica_engines):
            try:
                async with asyncio.timeout(self.interval), engine.connect() as connection:
                    lag = float((await connection.execute(_LAG_SQL)).scalar_one() or 0.0)
            except Exception as error:  # unreachable or broken: stop routing reads to it
                if self.lags[index] is not None:
                    log.warning("replica_unavailable", replica=index, error=type(error).__name__)
                lag = None
            self.lags[index] = lag
            REPLICA_LAG.labels(str(index)).set(-1 if lag is None else lag)
            READS_ROUTED.labels(str(index)).set(int(lag is not None and lag <= self.max_lag))

    async def _run(self) -> None:
        while True:
            await self.measure()
            await asyncio.sleep(self.interval)

    async def start(self) -> None:
        if self.enabled:
            await self.measure()
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def usable(self) -> list[int]:
        return [i for i, lag in enumerate(self.lags) if lag is not None and lag <= self.max_lag]

    async def recently_wrote(self, church_id: uuid.UUID | None) -> bool:
        if church_id is None:
            return False
        try:
            return bool(await self.redis.exists(_ryw_key(church_id)))
        except RedisError:
            return True  # cannot tell: the primary is always correct

    async def note_write(self, church_id: uuid.UUID) -> None:
        if not self.enabled or self.ryw_seconds <= 0:
            return
        with contextlib.suppress(RedisError):
            await self.redis.set(_ryw_key(church_id), b"1", px=int(self.ryw_seconds * 1000))

    async def choose(self, church_id: uuid.UUID | None) -> int | None:
        """Index of the replica to read from, or None for the primary."""
        usable = self.usable()
        if not usable or await self.recently_wrote(church_id):
            return None
        return usable[next(self._turn) % len(usable)]


async def read_session(request: Request) -> AsyncIterator[AsyncSession]:
    database: Database = request.app.state.database
    router: ReplicaRouter = request.app.state.replicas
    principal = getattr(request.state, "principal", None)
    choice = await router.choose(getattr(principal, "church_id", None))
    factory = database.sessions if choice is None else database.replica_sessions[choice]
    request.state.read_from = "primary" if choice is None else f"replica{choice}"
    async with factory() as session:
        try:
            yield session
        finally:
            await session.rollback()  # read-only: nothing to commit


ReadSession = Annotated[AsyncSession, Depends(read_session, scope="function")]
