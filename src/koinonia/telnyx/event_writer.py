"""Storing verified webhook events: concurrent requests share one INSERT.

Each request hands its event to the writer and waits for the commit; whatever arrives
while a flush is running goes into the next one, so under load one statement stores
hundreds of events and under no load an event is stored alone at once. The answer still
comes only after the event is durable, and says whether it was new.

Why our own code: this is a small group-commit around one statement; neither
SQLAlchemy nor psycopg offer request coalescing. It uses its own small psycopg pool in
autocommit (one atomic statement per flush needs no transaction block), which also keeps
the hot path off the ORM pool's checkout, ping and overflow churn.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import structlog
from prometheus_client import Histogram
from psycopg_pool import AsyncConnectionPool
from sqlalchemy.engine import make_url

log = structlog.get_logger(__name__)
FLUSH_SIZE = Histogram(
    "koinonia_webhook_flush_events",
    "Webhook events stored per INSERT",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
)

INSERT_SQL = """
INSERT INTO webhook_events (provider, event_id, event_type, payload)
SELECT %(provider)s, e, t, p::jsonb
FROM unnest(%(ids)s::text[], %(types)s::text[], %(payloads)s::text[]) AS u(e, t, p)
ON CONFLICT (provider, event_id) DO NOTHING
RETURNING event_id
"""


@dataclass
class _Pending:
    event_id: str
    event_type: str
    payload: str
    done: asyncio.Future[bool] = field(repr=False)


class EventWriter:
    def __init__(
        self, database_url: str, provider: str, *, max_batch: int = 500, flushers: int = 2
    ) -> None:
        conninfo = make_url(database_url).set(drivername="postgresql")
        self._provider = provider
        self._max_batch = max_batch
        self._flusher_count = flushers
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        # prepare_threshold None: safe behind PgBouncer in transaction mode.
        self._pool = AsyncConnectionPool(
            conninfo.render_as_string(hide_password=False),
            min_size=1,
            max_size=flushers,
            open=False,
            kwargs={"autocommit": True, "prepare_threshold": None},
            name=f"webhooks-{provider}",
        )

    async def open(self) -> None:
        await self._pool.open()
        self._tasks = [
            asyncio.create_task(self._flush_forever(), name=f"webhook-writer-{i}")
            for i in range(self._flusher_count)
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.done.done():
                pending.done.set_exception(RuntimeError("the API is shutting down"))
        await self._pool.close()

    async def store(self, event_id: str, event_type: str, payload: dict[str, Any]) -> bool:
        """Store the event once; `True` when it was new, `False` for a redelivery."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(event_id, event_type, json.dumps(payload), done))
        return await done

    async def _flush_forever(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._flush(batch)

    async def _flush(self, batch: list[_Pending]) -> None:
        # The same event twice in one flush: the first is stored, the second is the
        # redelivery (one INSERT cannot tell them apart).
        first: dict[str, _Pending] = {}
        for pending in batch:
            first.setdefault(pending.event_id, pending)
        unique = list(first.values())
        try:
            async with self._pool.connection() as connection:
                cursor = await connection.execute(
                    INSERT_SQL,
                    {
                        "provider": self._provider,
                        "ids": [p.event_id for p in unique],
                        "types": [p.event_type for p in unique],
                        "payloads": [p.payload for p in unique],
                    },
                )
                stored = {row[0] for row in await cursor.fetchall()}
        except Exception as error:  # every waiting request answers 5xx; the sender retries
            log.warning("webhook_flush_failed", error=type(error).__name__, events=len(batch))
            for pending in batch:
                if not pending.done.done():
                    pending.done.set_exception(error)
            return
        FLUSH_SIZE.observe(len(unique))
        for pending in batch:
            if not pending.done.done():
                new = first[pending.event_id] is pending and pending.event_id in stored
                pending.done.set_result(new)
