"""Backup and WAL-archive freshness on the API's `/metrics`, refreshed on scrape.

- WAL: `pg_stat_archiver` of the database the API uses (cheap; read on every scrape, at
  most every few seconds): the age of the last archived segment, the segments waiting to
  be archived, and whether the last attempt failed.
- Backups: `pgbackrest info --output=json` (an S3 round trip, a subprocess), run in the
  background at most every `BACKUP_INFO_REFRESH_SECONDS` and only when backups are
  configured (`BACKUP_S3_BUCKET`) and this process can read `BACKUP_CONFIG_PATH` (which
  holds the cipher passphrase, so in practice on the database host); a scrape never
  waits for it. Ages are computed at
  scrape time from the stop time of the last good backup, so they keep growing while the
  repository cannot be read — an alert on age still fires, and `koinonia_backup_repo_up`
  says why.

A gauge with no value yet (no backup, archiving off) is absent rather than 0: "never"
must not look like "just now". The label is the stanza, so one Prometheus can watch
several primaries.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog
from fastapi import FastAPI
from prometheus_client import Gauge
from sqlalchemy import text

from koinonia.backups.config import BackupConfig
from koinonia.backups.pgbackrest import PgBackRest, StanzaInfo, parse_info
from koinonia.db import Database

log = structlog.get_logger(__name__)

BACKUP_AGE = Gauge(
    "koinonia_backup_last_success_age_seconds",
    "Seconds since the last good pgBackRest backup (any type) finished",
    ["stanza"],
)
BACKUP_FULL_AGE = Gauge(
    "koinonia_backup_last_full_age_seconds",
    "Seconds since the last good full pgBackRest backup finished",
    ["stanza"],
)
BACKUP_REPO_UP = Gauge(
    "koinonia_backup_repo_up",
    "1 when the last `pgbackrest info` read the repository and the stanza is ok",
    ["stanza"],
)
BACKUP_SETS = Gauge(
    "koinonia_backup_sets", "Backup sets in the repository, by type", ["stanza", "type"]
)
WAL_ARCHIVE_AGE = Gauge(
    "koinonia_wal_archive_last_success_age_seconds",
    "Seconds since PostgreSQL last archived a WAL segment (pg_stat_archiver)",
    ["stanza"],
)
WAL_ARCHIVE_PENDING = Gauge(
    "koinonia_wal_archive_pending_segments",
    "Completed WAL segments not archived yet (0 when the archiver is caught up)",
    ["stanza"],
)
WAL_ARCHIVE_FAILING = Gauge(
    "koinonia_wal_archive_failing",
    "1 when the archiver's last attempt failed (pg_stat_archiver)",
    ["stanza"],
)

_SEGMENT = re.compile(r"^[0-9A-F]{24}")
ARCHIVER_REFRESH_SECONDS = 5.0
INFO_TIMEOUT_SECONDS = 60.0

ARCHIVER_SQL = """
SELECT current_setting('archive_mode') AS archive_mode,
       a.last_archived_wal, a.last_archived_time, a.last_failed_time,
       CASE WHEN pg_is_in_recovery() THEN NULL
            ELSE pg_walfile_name(pg_current_wal_lsn()) END AS current_wal,
       now() AS now
FROM pg_stat_archiver a
"""


def wal_segment_number(name: str, segment_bytes: int = 16 * 1024 * 1024) -> int:
    """Position of a WAL file name (timeline ignored) in segments since the start."""
    log_id, seg_id = int(name[8:16], 16), int(name[16:24], 16)
    return log_id * (0x1_0000_0000 // segment_bytes) + seg_id


@dataclass
class ArchiverSnapshot:
    archive_mode: str
    last_archived_wal: str | None
    last_archived_time: datetime | None
    last_failed_time: datetime | None
    current_wal: str | None
    now: datetime

    @property
    def pending_segments(self) -> int | None:
        if self.current_wal is None or self.last_archived_wal is None:
            return None
        if not _SEGMENT.match(self.last_archived_wal):
            return None  # a .history file name: nothing to compare
        # The current segment is still being written; everything before it should be in.
        behind = wal_segment_number(self.current_wal) - wal_segment_number(self.last_archived_wal)
        return max(0, behind - 1)

    @property
    def failing(self) -> bool:
        if self.last_failed_time is None:
            return False
        return self.last_archived_time is None or self.last_failed_time > self.last_archived_time


async def read_archiver(database: Database) -> ArchiverSnapshot:
    async with database.engine.connect() as connection:
        row = (await connection.execute(text(ARCHIVER_SQL))).one()
    return ArchiverSnapshot(
        archive_mode=str(row.archive_mode),
        last_archived_wal=row.last_archived_wal,
        last_archived_time=row.last_archived_time,
        last_failed_time=row.last_failed_time,
        current_wal=row.current_wal,
        now=row.now,
    )


class BackupMonitor:
    """Sets the gauges above; `refresh` is an `app.state.metrics_refreshers` entry."""

    def __init__(
        self,
        config: BackupConfig,
        database: Database | None,
        *,
        info_enabled: bool,
        info_refresh_seconds: float = 60.0,
        pgbackrest: PgBackRest | None = None,
    ) -> None:
        self.config = config
        self.stanza = config.stanza
        self._database = database
        self._info_enabled = info_enabled
        self._info_refresh = info_refresh_seconds
        self._pgbackrest = pgbackrest or PgBackRest(config)
        self._archiver_taken = float("-inf")
        self._info_taken = float("-inf")
        self._info_task: asyncio.Task[None] | None = None
        self.archiver: ArchiverSnapshot | None = None
        self.info: StanzaInfo | None = None

    # --- WAL -------------------------------------------------------------------------

    def apply_archiver(self, snapshot: ArchiverSnapshot) -> None:
        self.archiver = snapshot
        if snapshot.archive_mode == "off":
            return
        if snapshot.last_archived_time is not None:
            age = (snapshot.now - snapshot.last_archived_time).total_seconds()
            WAL_ARCHIVE_AGE.labels(self.stanza).set(max(0.0, age))
        pending = snapshot.pending_segments
        if pending is not None:
            WAL_ARCHIVE_PENDING.labels(self.stanza).set(pending)
        WAL_ARCHIVE_FAILING.labels(self.stanza).set(1 if snapshot.failing else 0)

    async def _refresh_archiver(self) -> None:
        if self._database is None:
            return
        if time.monotonic() - self._archiver_taken < ARCHIVER_REFRESH_SECONDS:
            return
        self._archiver_taken = time.monotonic()
        # Bounded: a scrape must answer even when the database does not.
        self.apply_archiver(await asyncio.wait_for(read_archiver(self._database), 2.0))

    # --- backups ---------------------------------------------------------------------

    def apply_info(self, info: StanzaInfo | None, *, now: datetime | None = None) -> None:
        """Set the backup gauges from `info` (None: the repository could not be read)."""
        if info is not None:
            self.info = info
            BACKUP_REPO_UP.labels(self.stanza).set(1 if info.status_code == 0 else 0)
            for backup_type in ("full", "diff", "incr"):
                count = sum(1 for b in info.backups if b.type == backup_type and not b.error)
                BACKUP_SETS.labels(self.stanza, backup_type).set(count)
        else:
            BACKUP_REPO_UP.labels(self.stanza).set(0)
        self.set_ages(now)

    def set_ages(self, now: datetime | None = None) -> None:
        if self.info is None:
            return
        now = now or datetime.now(UTC)
        last = self.info.last_good
        if last is not None:
            BACKUP_AGE.labels(self.stanza).set(max(0.0, (now - last.stopped).total_seconds()))
        full = self.info.last_good_of("full")
        if full is not None:
            BACKUP_FULL_AGE.labels(self.stanza).set(max(0.0, (now - full.stopped).total_seconds()))

    async def read_info(self) -> StanzaInfo | None:
        try:
            document = await asyncio.wait_for(
                asyncio.to_thread(self._pgbackrest.info_json, INFO_TIMEOUT_SECONDS),
                INFO_TIMEOUT_SECONDS + 5,
            )
            for stanza in parse_info(document):
                if stanza.name == self.stanza:
                    return stanza
            log.warning("backup_info_stanza_missing", stanza=self.stanza)
        except Exception as error:
            log.warning("backup_info_failed", stanza=self.stanza, error=type(error).__name__)
        return None

    async def _info_in_background(self) -> None:
        self.apply_info(await self.read_info())

    def _maybe_start_info(self) -> None:
        if not self._info_enabled:
            return
        if self._info_task is not None and not self._info_task.done():
            return
        if time.monotonic() - self._info_taken < self._info_refresh:
            return
        self._info_taken = time.monotonic()
        self._info_task = asyncio.create_task(self._info_in_background())

    async def refresh(self) -> None:
        self._maybe_start_info()
        self.set_ages()
        await self._refresh_archiver()

    async def close(self) -> None:
        if self._info_task is not None and not self._info_task.done():
            self._info_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._info_task


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = app.state.settings
    config = BackupConfig.from_settings(settings)
    monitor = BackupMonitor(
        config,
        app.state.database,
        # Only where backups are configured and this host holds the pgBackRest config
        # (it carries the cipher passphrase: the database host, not every API host).
        info_enabled=bool(settings.backup_s3_bucket) and os.access(config.config_path, os.R_OK),
        info_refresh_seconds=settings.backup_info_refresh_seconds,
    )
    app.state.backup_monitor = monitor
    app.state.metrics_refreshers.append(monitor.refresh)
    try:
        yield
    finally:
        await monitor.close()
