"""PgBouncer's own numbers on the API's `/metrics`, read from its admin console.

With `PGBOUNCER_ADMIN_URL` set (a `stats_users` user on the `pgbouncer` database), each
scrape — at most every `REFRESH_SECONDS` per process, bounded by `TIMEOUT_SECONDS` —
reads `SHOW POOLS` and `SHOW STATS`:

- per database and user: clients active and waiting for a server connection, servers
  active, idle and used, and the longest current wait (`koinonia_pgbouncer_cl_waiting`,
  `…_maxwait_seconds`: the pool is too small, or the primary too slow);
- per database, since PgBouncer started: transactions, queries, and the seconds clients
  spent waiting, in transactions and in queries (counters: take `rate()`).

`koinonia_pgbouncer_up` is 1 after a good read and 0 after a failed one (refused, timed
out, wrong password): the scrape itself never fails, and the pool series are dropped
rather than kept stale. Without the setting none of these series exist.

The admin console speaks the simple query protocol only: PgBouncer 1.18 answers an
extended-protocol message with "extended query protocol not supported by admin console"
and closes the connection. psycopg uses the extended protocol whenever a statement has
parameters or binary results, so the console is read through a client-side-binding cursor
(`AsyncClientCursor`), autocommit (no `BEGIN`) and without prepared statements.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
import structlog
from fastapi import FastAPI
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = structlog.get_logger(__name__)

REFRESH_SECONDS = 5.0
TIMEOUT_SECONDS = 2.0
CONSOLE_DATABASE = "pgbouncer"  # the console's own pseudo-database: left out of the series

# SHOW POOLS column → (metric, help).
POOL_GAUGES = {
    "cl_active": (
        "koinonia_pgbouncer_cl_active",
        "Client connections linked to a server connection or idle (SHOW POOLS cl_active)",
    ),
    "cl_waiting": (
        "koinonia_pgbouncer_cl_waiting",
        "Client connections waiting for a server connection (SHOW POOLS cl_waiting)",
    ),
    "sv_active": (
        "koinonia_pgbouncer_sv_active",
        "Server connections running a client's transaction (SHOW POOLS sv_active)",
    ),
    "sv_idle": (
        "koinonia_pgbouncer_sv_idle",
        "Server connections idle and ready (SHOW POOLS sv_idle)",
    ),
    "sv_used": (
        "koinonia_pgbouncer_sv_used",
        "Server connections idle past server_check_delay, checked before reuse "
        "(SHOW POOLS sv_used)",
    ),
}
MAXWAIT = (
    "koinonia_pgbouncer_maxwait_seconds",
    "How long the oldest waiting client has waited for a server connection "
    "(SHOW POOLS maxwait + maxwait_us)",
)
# SHOW STATS column → (counter name without _total, help, divisor to base units).
STATS_COUNTERS = {
    "total_xact_count": (
        "koinonia_pgbouncer_xacts",
        "Transactions pooled since PgBouncer started (SHOW STATS total_xact_count)",
        1.0,
    ),
    "total_query_count": (
        "koinonia_pgbouncer_queries",
        "Queries pooled since PgBouncer started (SHOW STATS total_query_count)",
        1.0,
    ),
    "total_wait_time": (
        "koinonia_pgbouncer_wait_seconds",
        "Seconds clients spent waiting for a server connection (SHOW STATS total_wait_time)",
        1e6,
    ),
    "total_xact_time": (
        "koinonia_pgbouncer_xact_seconds",
        "Seconds spent in transactions (SHOW STATS total_xact_time)",
        1e6,
    ),
    "total_query_time": (
        "koinonia_pgbouncer_query_seconds",
        "Seconds spent in queries (SHOW STATS total_query_time)",
        1e6,
    ),
}
UP = (
    "koinonia_pgbouncer_up",
    "1 when the last read of PgBouncer's admin console (PGBOUNCER_ADMIN_URL) succeeded, "
    "0 when it failed",
)
SHOW_POOLS = "SHOW POOLS"
SHOW_STATS = "SHOW STATS"


@dataclass(frozen=True)
class Snapshot:
    up: bool
    # (database, user) → SHOW POOLS values; database → SHOW STATS values (base units).
    pools: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    stats: dict[str, dict[str, float]] = field(default_factory=dict)


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def parse_pools(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, str], dict[str, float]]:
    pools: dict[tuple[str, str], dict[str, float]] = {}
    for row in rows:
        if row.get("database") == CONSOLE_DATABASE:
            continue
        values = {column: _number(row.get(column)) for column in POOL_GAUGES}
        values["maxwait"] = _number(row.get("maxwait")) + _number(row.get("maxwait_us")) / 1e6
        pools[(str(row.get("database")), str(row.get("user")))] = values
    return pools


def parse_stats(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, float]]:
    stats: dict[str, dict[str, float]] = {}
    for row in rows:
        if row.get("database") == CONSOLE_DATABASE:
            continue
        stats[str(row.get("database"))] = {
            column: _number(row.get(column)) / divisor
            for column, (_, _, divisor) in STATS_COUNTERS.items()
        }
    return stats


class PgBouncerCollector(Collector):
    """Exposes the current monitor's last snapshot (nothing without a monitor)."""

    def __init__(self) -> None:
        self.monitor: PgBouncerMonitor | None = None

    def _families(self) -> tuple[GaugeMetricFamily, dict[str, Metric], dict[str, Metric]]:
        up = GaugeMetricFamily(*UP)
        pools: dict[str, Metric] = {
            column: GaugeMetricFamily(name, help_text, labels=["database", "user"])
            for column, (name, help_text) in POOL_GAUGES.items()
        }
        pools["maxwait"] = GaugeMetricFamily(*MAXWAIT, labels=["database", "user"])
        stats: dict[str, Metric] = {
            column: CounterMetricFamily(name, help_text, labels=["database"])
            for column, (name, help_text, _) in STATS_COUNTERS.items()
        }
        return up, pools, stats

    def describe(self) -> list[Metric]:
        up, pools, stats = self._families()
        return [up, *pools.values(), *stats.values()]

    def collect(self) -> list[Metric]:
        up, pools, stats = self._families()
        snapshot = self.monitor.snapshot if self.monitor is not None else None
        if snapshot is None:
            # Not configured (or not read yet): the names only, no series.
            return [up, *pools.values(), *stats.values()]
        up.add_metric([], 1.0 if snapshot.up else 0.0)
        for (database, user), values in snapshot.pools.items():
            for column, family in pools.items():
                assert isinstance(family, GaugeMetricFamily)
                family.add_metric([database, user], values[column])
        for database, totals in snapshot.stats.items():
            for column, family in stats.items():
                assert isinstance(family, CounterMetricFamily)
                family.add_metric([database], totals[column])
        return [up, *pools.values(), *stats.values()]


COLLECTOR = PgBouncerCollector()
REGISTRY.register(COLLECTOR)


class PgBouncerMonitor:
    """Reads the admin console on scrape (an `app.state.metrics_refreshers` entry),
    keeping one connection open between reads and replacing it when it breaks."""

    def __init__(
        self,
        admin_url: str,
        *,
        refresh_seconds: float = REFRESH_SECONDS,
        timeout: float = TIMEOUT_SECONDS,
    ) -> None:
        self._conninfo = admin_url
        self.refresh_seconds = refresh_seconds
        self.timeout = timeout
        self._connection: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()
        self._taken = float("-inf")
        self.snapshot: Snapshot | None = None

    async def refresh(self) -> None:
        async with self._lock:
            if time.monotonic() - self._taken < self.refresh_seconds:
                return
            self._taken = time.monotonic()
            try:
                async with asyncio.timeout(self.timeout):
                    pools, stats = await self._read()
            except (psycopg.Error, OSError, TimeoutError) as error:
                if self.snapshot is None or self.snapshot.up:
                    log.warning("pgbouncer_stats_unavailable", error=type(error).__name__)
                await self._discard()
                self.snapshot = Snapshot(up=False)
                return
            self.snapshot = Snapshot(up=True, pools=parse_pools(pools), stats=parse_stats(stats))

    async def _read(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        reused = self._connection is not None and not (
            self._connection.closed or self._connection.broken
        )
        try:
            connection = await self._connect()
            return await _show(connection, SHOW_POOLS), await _show(connection, SHOW_STATS)
        except psycopg.OperationalError:
            await self._discard()
            if not reused:
                raise
        # The connection held since the last read broke (PgBouncer restarted): once more.
        connection = await self._connect()
        return await _show(connection, SHOW_POOLS), await _show(connection, SHOW_STATS)

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        if self._connection is None or self._connection.closed or self._connection.broken:
            self._connection = await psycopg.AsyncConnection.connect(
                self._conninfo,
                autocommit=True,
                prepare_threshold=None,
                cursor_factory=psycopg.AsyncClientCursor,
                connect_timeout=max(2, math.ceil(self.timeout)),  # libpq's minimum is 2 s
                application_name="koinonia-metrics",
            )
        return self._connection

    async def _discard(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    async def close(self) -> None:
        async with self._lock:
            await self._discard()


async def _show(connection: psycopg.AsyncConnection[Any], statement: str) -> list[dict[str, Any]]:
    # A client-side-binding cursor, no parameters: the simple query protocol (see above).
    cursor = await connection.execute(statement)
    names = [column.name for column in cursor.description or ()]
    return [dict(zip(names, row, strict=True)) for row in await cursor.fetchall()]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    admin_url: str = app.state.settings.pgbouncer_admin_url
    if not admin_url:
        yield
        return
    monitor = PgBouncerMonitor(admin_url)
    app.state.pgbouncer_monitor = monitor
    app.state.metrics_refreshers.append(monitor.refresh)
    COLLECTOR.monitor = monitor  # one registry per process: the last app started wins
    try:
        yield
    finally:
        if COLLECTOR.monitor is monitor:
            COLLECTOR.monitor = None
        await monitor.close()
