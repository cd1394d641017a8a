"""Read replicas: lag-aware routing with read-your-own-writes and fast fallback.

Reads that may be slightly stale (lists, dashboards) take `ReadSession`; it goes to a
replica when one is configured, healthy and within `REPLICA_MAX_LAG_SECONDS`, unless the
calling church wrote something in the last `READ_YOUR_WRITES_SECONDS` (then the primary,
so a client always sees its own change). No replica fits → the primary's autocommit read
engine (`Database.read_engine`: one round trip per statement). Either way the session
refuses to write (`_RoutedSession`): a route that writes on a `ReadSession` fails in every
test, not only in production when a replica happens to serve it.

Fallback when a replica goes away (docs/operations.md#read-replicas):

- a statement on a replica that fails with a connection-level error (refused, reset,
  admin/crash shutdown, "cannot connect now") marks that replica down at once and runs
  again on the primary, in the same request: the handler never sees the error, so a
  stopped replica costs no 5xx and no wait;
- a probe measures every replica's lag every `interval` (0.5 s), each bounded by
  `timeout` (0.5 s): a lagging or hung replica is left within about a second, a
  recovered one is used again within half a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import psycopg
import structlog
from fastapi import Depends, Request
from prometheus_client import Counter, Gauge
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import TextClause, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from koinonia.accounts.deps import CurrentPrincipal
from koinonia.db import Database
from koinonia.errors import DatabaseError

log = structlog.get_logger("koinonia.replicas")

REPLICA_LAG = Gauge(
    "koinonia_db_replica_lag_seconds",
    "Replay lag of each replica (-1 when unreachable)",
    ["replica"],
)
READS_ROUTED = Gauge("koinonia_db_replica_usable", "1 when a replica takes reads", ["replica"])

FallbackReason = Literal["replica_down", "lagging", "read_your_writes", "no_replica"]
FALLBACK_REASONS: tuple[FallbackReason, ...] = (
    "replica_down",
    "lagging",
    "read_your_writes",
    "no_replica",
)
DB_READS = Counter(
    "koinonia_db_reads",
    "Reads routed by ReadSession, by where they were served (a read that failed on a "
    "replica and ran again on the primary counts once for each)",
    ["target"],
)
DB_READ_FALLBACKS = Counter(
    "koinonia_db_read_fallbacks",
    "Routed reads served by the primary instead of a replica, by reason (no_replica: "
    "none configured; replica_down: unreachable, or failed mid-read; lagging: over "
    "REPLICA_MAX_LAG_SECONDS; read_your_writes: the church wrote moments ago)",
    ["reason"],
)
for _target in ("primary", "replica"):
    DB_READS.labels(_target)
for _reason in FALLBACK_REASONS:
    DB_READ_FALLBACKS.labels(_reason)

# Errors meaning "this server went away", not "this statement failed": admin shutdown,
# crash shutdown, cannot connect now (starting or shutting down); class 08 is connection
# exceptions; no SQLSTATE at all is a refused, reset or lost connection.
_GONE_SQLSTATES = frozenset({"57P01", "57P02", "57P03"})


def connection_lost(error: BaseException) -> bool:
    """Whether a database error means the server is unreachable (rather than a failed
    statement: a timeout, a conflict or a read-only violation is not retried)."""
    if isinstance(error, DBAPIError):
        if error.connection_invalidated:
            return True
        error = error.orig if error.orig is not None else error
    if not isinstance(error, psycopg.OperationalError):
        return False
    state = error.sqlstate
    return state is None or state.startswith("08") or state in _GONE_SQLSTATES


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
        interval: float = 0.5,
        timeout: float = 0.5,
    ) -> None:
        self.database = database
        self.redis = redis
        self.max_lag = max_lag
        self.ryw_seconds = ryw_seconds
        self.interval = interval  # between lag probes
        self.timeout = timeout  # one probe's budget: a hung replica is down after this
        # Shared by reference with the health checks: only ever updated in place.
        self.lags: list[float | None] = [None] * len(database.replica_engines)
        self._turn = itertools.count()
        self._task: asyncio.Task[None] | None = None
        # The primary's autocommit read engine (its own pool, `primary-reads`).
        self.primary_reads: AsyncEngine = database.read_engine
        self._factories = [
            async_sessionmaker(
                bind,
                sync_session_class=_RoutedSession,
                expire_on_commit=False,
                autoflush=False,
            )
            for bind in (self.primary_reads, *database.replica_engines)
        ]

    @property
    def enabled(self) -> bool:
        return bool(self.database.replica_engines)

    async def measure(self) -> None:
        """Probe every replica at once, each within `timeout`."""
        await asyncio.gather(
            *(self._measure(i, e) for i, e in enumerate(self.database.replica_engines))
        )

    async def _measure(self, index: int, engine: AsyncEngine) -> None:
        try:
            async with asyncio.timeout(self.timeout), engine.connect() as connection:
                lag: float | None = float((await connection.execute(_LAG_SQL)).scalar_one() or 0.0)
        except Exception as error:  # unreachable or broken: stop routing reads to it
            if self.lags[index] is not None:
                log.warning("replica_unavailable", replica=index, error=type(error).__name__)
            lag = None
        self._set_lag(index, lag)

    def _set_lag(self, index: int, lag: float | None) -> None:
        self.lags[index] = lag
        REPLICA_LAG.labels(str(index)).set(-1 if lag is None else lag)
        READS_ROUTED.labels(str(index)).set(int(lag is not None and lag <= self.max_lag))

    def mark_down(self, index: int, error: BaseException) -> None:
        """A read on the replica lost its connection: no more reads go there until a
        probe reaches it again (within `interval`)."""
        if self.lags[index] is not None:
            log.warning("replica_read_failed", replica=index, error=type(error).__name__)
        self._set_lag(index, None)

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

    async def route(self, church_id: uuid.UUID | None) -> tuple[int | None, FallbackReason | None]:
        """(replica index or None for the primary, why not a replica)."""
        if not self.enabled:
            return None, "no_replica"
        usable = self.usable()
        if not usable:
            lagging = any(lag is not None for lag in self.lags)
            return None, "lagging" if lagging else "replica_down"
        if await self.recently_wrote(church_id):
            return None, "read_your_writes"
        return usable[next(self._turn) % len(usable)], None

    async def choose(self, church_id: uuid.UUID | None) -> int | None:
        """Index of the replica to read from, or None for the primary."""
        return (await self.route(church_id))[0]

    @contextlib.asynccontextmanager
    async def read(self, church_id: uuid.UUID | None) -> AsyncIterator[AsyncSession]:
        """A read-only session on the replica `route` picks, rolled back at the end; a
        replica lost mid-read hands over to the primary (`_RoutedSession`). Counted in
        the metrics at its first statement: a request that reads nothing (a cache hit)
        counts nothing and never takes a connection."""
        choice, reason = await self.route(church_id)
        async with self._factories[0 if choice is None else choice + 1]() as session:
            session.info[_ROUTE_KEY] = _Route(self, choice, reason)
            try:
                yield session
            finally:
                with contextlib.suppress(DBAPIError):  # a replica that died: nothing to undo
                    await session.rollback()

    def fail_over(self, session: Session, route: _Route, error: BaseException) -> None:
        """Called inside a read session whose replica went away: bind it to the primary."""
        assert route.replica is not None
        self.mark_down(route.replica, error)
        route.replica, route.reason, route.counted = None, "replica_down", False
        route.count()
        # The dead connection stays in the session's transaction until the rollback;
        # the next statement opens one on the primary (objects already loaded are kept).
        session.bind = self.primary_reads.sync_engine


_ROUTE_KEY = "koinonia.read_route"


@dataclass(slots=True)
class _Route:
    router: ReplicaRouter
    replica: int | None  # None: the primary
    reason: FallbackReason | None  # why the primary, when it is
    counted: bool = False

    @property
    def target(self) -> str:
        return "primary" if self.replica is None else f"replica{self.replica}"

    def count(self) -> None:
        if self.counted:
            return
        self.counted = True
        DB_READS.labels("primary" if self.replica is None else "replica").inc()
        if self.reason is not None:
            DB_READ_FALLBACKS.labels(self.reason).inc()


class ReadOnlySessionError(DatabaseError):
    """A write attempted on a `ReadSession` (a bug in the route: it must use `DbSession`)."""


# Leading keywords of textual SQL that writes or locks (a hot standby refuses them; the
# primary's autocommit read engine would run and commit them).
_WRITE_VERBS = frozenset(
    [
        "insert",
        "update",
        "delete",
        "merge",
        "create",
        "alter",
        "drop",
        "truncate",
        "copy",
        "grant",
        "revoke",
        "lock",
        "call",
        "do",
        "refresh",
        "vacuum",
        "cluster",
        "reindex",
        "comment",
    ]
)


def _writes(statement: Any) -> bool:
    if getattr(statement, "is_dml", False):  # insert(), update(), delete(), ORM or Core
        return True
    if getattr(statement, "_for_update_arg", None) is not None:  # SELECT … FOR UPDATE/SHARE
        return True
    if isinstance(statement, TextClause):
        words = statement.text.lstrip(" \t\r\n(").split(None, 1)
        return bool(words) and words[0].lower() in _WRITE_VERBS
    return False


class _RoutedSession(Session):
    """The synchronous half of a read session. Every statement (`execute`, `scalars`,
    `get`, `refresh`…) passes through `_execute_internal`:

    - one that would write or lock (`_writes`), or a flush with changes, is refused: the
      primary's read engine is autocommit, so nothing else would stop it there (a
      function that writes inside a SELECT is not seen: only a replica refuses that);
    - one that fails on a replica because the replica went away marks it down and runs
      once more on the primary."""

    def flush(self, objects: Any = None) -> None:
        if self.new or self.dirty or self.deleted:
            raise ReadOnlySessionError("A read-only session cannot write")
        super().flush(objects)

    def _execute_internal(self, *args: Any, **kwargs: Any) -> Any:
        if _writes(args[0] if args else kwargs.get("statement")):
            raise ReadOnlySessionError("A read-only session cannot write")
        route = self.info.get(_ROUTE_KEY)
        if isinstance(route, _Route):
            route.count()
        try:
            return super()._execute_internal(*args, **kwargs)
        except DBAPIError as error:
            if not isinstance(route, _Route) or route.replica is None:
                raise
            if not connection_lost(error):
                raise
            route.router.fail_over(self, route, error)
        return super()._execute_internal(*args, **kwargs)


async def read_session(
    request: Request, principal: CurrentPrincipal
) -> AsyncIterator[AsyncSession]:
    """A read-only session for the calling church (authenticated: the church decides
    read-your-own-writes). `request.state.read_from` says where it read."""
    router: ReplicaRouter = request.app.state.replicas
    async with router.read(principal.church_id) as session:
        route = session.info[_ROUTE_KEY]
        request.state.read_from = route.target
        try:
            yield session
        finally:
            request.state.read_from = route.target


ReadSession = Annotated[AsyncSession, Depends(read_session, scope="function")]
