"""Storing verified webhook events: concurrent requests share one INSERT.

Each request hands its event to the writer and waits for the commit; whatever arrives
while a flush is running goes into the next one, so under load one statement stores
hundreds of events and under no load an event is stored alone at once. The answer still
comes only after the event is durable, and says whether it was new.

Why our own code: this is a small group-commit around one statement; neither
SQLAlchemy nor psycopg offer request coalescing. It uses its own small psycopg pool in
autocommit (one atomic statement per flush needs no transaction block), which also keeps
the hot path off the ORM pool's checkout, ping and overflow churn.

STOP always wins: an inbound opt-out keyword is suppressed in the same statement that
stores its event (a data-modifying CTE), so the 2xx Telnyx gets means the suppression is
durable — before any worker applies the event (messaging/suppressions.py).

Bounded: a request waits at most `STORE_TIMEOUT_SECONDS` for its flush; an outage (no
connection, a failed or slow statement) answers `EventStoreUnavailableError` — `503` with
`Retry-After`, which Telnyx retries — never a 500 or a long hang. A request that gave up
is dropped from later flushes (Telnyx redelivers it); one whose flush committed anyway is
answered `duplicate` on redelivery, its suppression already stored.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from prometheus_client import Histogram
from psycopg_pool import AsyncConnectionPool
from sqlalchemy.engine import make_url

from koinonia.db import observe_statement
from koinonia.errors import ServiceUnavailableError
from koinonia.messaging.suppressions import inbound_keyword

log = structlog.get_logger(__name__)
FLUSH_SIZE = Histogram(
    "koinonia_webhook_flush_events",
    "Webhook events stored per INSERT",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
)

# How long a request waits for its event to be stored before answering 503 (Telnyx
# expects an answer within about 2 s). Candidate setting: WEBHOOK_STORE_TIMEOUT_SECONDS.
STORE_TIMEOUT_SECONDS = 2.0
# A flush that takes longer is abandoned (its requests have long been answered 503).
FLUSH_TIMEOUT_SECONDS = 10.0
RETRY_AFTER_SECONDS = "2"

# One atomic statement: the new events, and a suppression for each new opt-out among
# them (a redelivered STOP is not new, so it never resurrects a lifted suppression).
INSERT_SQL = """
WITH stored AS (
    INSERT INTO webhook_events (provider, event_id, event_type, payload)
    SELECT %(provider)s, e, t, p::jsonb
    FROM unnest(%(ids)s::text[], %(types)s::text[], %(payloads)s::text[]) AS u(e, t, p)
    ON CONFLICT (provider, event_id) DO NOTHING
    RETURNING event_id
), suppressed AS (
    INSERT INTO suppressions (sender_number, phone_hmac, opted_out_at, source)
    SELECT DISTINCT ON (s.sender, s.h) s.sender, s.h, s.at, 'keyword'
    FROM unnest(
        %(stop_ids)s::text[], %(stop_senders)s::text[], %(stop_hmacs)s::bytea[],
        %(stop_times)s::timestamptz[]
    ) AS s(e, sender, h, at)
    JOIN stored ON stored.event_id = s.e
    ORDER BY s.sender, s.h, s.at DESC
    ON CONFLICT (sender_number, phone_hmac) DO UPDATE SET
        source = CASE WHEN EXCLUDED.opted_out_at > suppressions.opted_out_at
                      THEN EXCLUDED.source ELSE suppressions.source END,
        opted_out_at = GREATEST(suppressions.opted_out_at, EXCLUDED.opted_out_at)
)
SELECT event_id FROM stored
"""


class EventStoreUnavailableError(ServiceUnavailableError):
    """The event could not be stored in time: answered `503` and retried by Telnyx."""

    def __init__(self, detail: str = "Events cannot be stored right now; retry shortly") -> None:
        super().__init__(detail, headers={"Retry-After": RETRY_AFTER_SECONDS})


@dataclass(frozen=True, slots=True)
class _OptOut:
    sender: str
    phone_hmac: bytes
    at: datetime


@dataclass
class _Pending:
    event_id: str
    event_type: str
    payload: str
    done: asyncio.Future[bool] = field(repr=False)
    opt_out: _OptOut | None = None


class EventWriter:
    def __init__(
        self,
        database_url: str,
        provider: str,
        *,
        max_batch: int = 500,
        flushers: int = 2,
        suppression_key: bytes | None = None,
        timeout: float = STORE_TIMEOUT_SECONDS,
        slow_query_ms: int = 100,
        options: str | None = None,
    ) -> None:
        conninfo = make_url(database_url).set(drivername="postgresql")
        self._provider = provider
        self._suppression_key = suppression_key
        self._timeout = timeout
        self._max_batch = max_batch
        self._slow_query_ms = slow_query_ms
        self._flusher_count = flushers
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        # prepare_threshold None: safe behind PgBouncer in transaction mode.
        self._pool = AsyncConnectionPool(
            conninfo.render_as_string(hide_password=False),
            min_size=1,
            max_size=flushers,
            open=False,
            # Waiting longer than a request would is pointless: bound checkout and connect.
            timeout=timeout,
            kwargs={
                "autocommit": True,
                "prepare_threshold": None,
                "connect_timeout": max(2, math.ceil(timeout)),  # libpq's minimum is 2 s
                # Autocommit, one statement per flush: database timeouts as startup options
                # (koinonia.db explains; behind PgBouncer the role's settings apply).
                **({"options": options} if options else {}),
            },
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
        """Store the event once; `True` when it was new, `False` for a redelivery.

        Raises `EventStoreUnavailableError` when it is not stored within the timeout."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        pending = _Pending(event_id, event_type, json.dumps(payload), done, self._opt_out(payload))
        self._queue.put_nowait(pending)
        try:
            await asyncio.wait((done,), timeout=self._timeout)
            if not done.done():
                log.warning("webhook_store_timeout", timeout=self._timeout)
                raise EventStoreUnavailableError()
            try:
                return done.result()
            except Exception as error:
                raise EventStoreUnavailableError() from error
        finally:
            done.cancel()  # gave up (or was cancelled): later flushes skip it

    def _opt_out(self, payload: dict[str, Any]) -> _OptOut | None:
        if self._suppression_key is None:
            return None
        keyword = inbound_keyword(payload, self._suppression_key)
        if keyword is None or keyword.keyword != "opt_out":
            return None
        return _OptOut(keyword.sender, keyword.phone_hmac, keyword.at or datetime.now(UTC))

    async def _flush_forever(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            # Requests that already gave up were answered 503: Telnyx sends them again.
            batch = [pending for pending in batch if not pending.done.done()]
            if batch:
                await self._flush(batch)

    async def _flush(self, batch: list[_Pending]) -> None:
        # The same event twice in one flush: the first is stored, the second is the
        # redelivery (one INSERT cannot tell them apart).
        first: dict[str, _Pending] = {}
        for pending in batch:
            first.setdefault(pending.event_id, pending)
        unique = list(first.values())
        stops = [(p.event_id, p.opt_out) for p in unique if p.opt_out is not None]
        try:
            async with (
                asyncio.timeout(FLUSH_TIMEOUT_SECONDS),
                self._pool.connection() as connection,
            ):
                started = time.perf_counter()
                cursor = await connection.execute(
                    INSERT_SQL,
                    {
                        "provider": self._provider,
                        "ids": [p.event_id for p in unique],
                        "types": [p.event_type for p in unique],
                        "payloads": [p.payload for p in unique],
                        "stop_ids": [event_id for event_id, _ in stops],
                        "stop_senders": [stop.sender for _, stop in stops],
                        "stop_hmacs": [stop.phone_hmac for _, stop in stops],
                        "stop_times": [stop.at for _, stop in stops],
                    },
                )
                stored = {row[0] for row in await cursor.fetchall()}
                pool = f"webhooks-{self._provider}"
                observe_statement(
                    pool, INSERT_SQL, time.perf_counter() - started, self._slow_query_ms
                )
        except Exception as error:  # every waiting request answers 503; the sender retries
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
