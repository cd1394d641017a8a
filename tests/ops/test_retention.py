"""Data retention against the real database: what each job removes, and what it never does."""

from __future__ import annotations

import json
import random
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

from fastapi import FastAPI
from prometheus_client import REGISTRY
from sqlalchemy import text

from koinonia import partitions, retention
from koinonia.jobs import build_job_app, open_resources
from koinonia.partitions import PartitionInfo
from koinonia.settings import Settings

LONG_AGO = datetime.now(UTC) - timedelta(days=400)


def _sample(name: str, kind: str) -> float:
    return REGISTRY.get_sample_value(name, {"kind": kind}) or 0.0


async def _execute(app: FastAPI, sql: str, **params: Any) -> Any:
    async with app.state.database.engine.begin() as connection:
        return await connection.execute(text(sql), params)


async def _event(app: FastAPI, *, processed: datetime | None, received: datetime) -> int:
    # An old event gets an explicit (negative) id: rows of other tests were received
    # "after" it, and the job scans only ids below the first event received since its
    # cutoff, as in production where ids grow with time.
    old = received < datetime.now(UTC) - timedelta(days=30)
    rows = await _execute(
        app,
        "INSERT INTO webhook_events (id, provider, event_id, event_type, payload, "
        "received_at, processed_at) VALUES (coalesce(:id, nextval(pg_get_serial_sequence("
        "'webhook_events', 'id'))), 'telnyx', :e, 'message.finalized', "
        "'{}'::jsonb, :received, :processed) RETURNING id",
        id=-random.randint(1, 2**40) if old else None,
        e=f"retention-{uuid.uuid4()}",
        received=received,
        processed=processed,
    )
    return int(rows.scalar_one())


async def _dead_letter(app: FastAPI, event_id: int, state: str) -> None:
    await _execute(
        app,
        "INSERT INTO dead_letters (kind, payload, last_error, attempts, replay_state) "
        "VALUES ('webhook.telnyx', CAST(:payload AS jsonb), 'failed', 5, :state)",
        payload=json.dumps({"webhook_event_id": event_id, "event_type": "message.finalized"}),
        state=state,
    )


async def _events_left(app: FastAPI, ids: list[int]) -> set[int]:
    rows = await _execute(app, "SELECT id FROM webhook_events WHERE id = ANY(:ids)", ids=ids)
    return {int(row[0]) for row in rows}


async def test_provider_events_are_pruned_unless_unapplied_or_dead_lettered(
    app: FastAPI, settings: Settings
) -> None:
    old, recent = LONG_AGO, datetime.now(UTC) - timedelta(days=1)
    applied_old = await _event(app, processed=old, received=old)
    unapplied_old = await _event(app, processed=None, received=old)
    dead_lettered = await _event(app, processed=old, received=old)
    await _dead_letter(app, dead_lettered, "pending")
    replay_failed = await _event(app, processed=old, received=old)
    await _dead_letter(app, replay_failed, "replay_failed")
    replayed = await _event(app, processed=old, received=old)
    await _dead_letter(app, replayed, "replayed")
    applied_recent = await _event(app, processed=recent, received=recent)
    ids = [applied_old, unapplied_old, dead_lettered, replay_failed, replayed, applied_recent]

    before = _sample("koinonia_retention_deleted_total", "webhook_events")
    job_settings = settings.model_copy(
        update={"webhook_event_retention_days": 90, "retention_batch_size": 100}
    )
    async with open_resources(job_settings, build_job_app(job_settings)):
        deleted = await retention.prune_webhook_events_task(timestamp=0)
    assert deleted >= 2
    assert await _events_left(app, ids) == {
        unapplied_old,
        dead_lettered,
        replay_failed,
        applied_recent,
    }
    assert _sample("koinonia_retention_deleted_total", "webhook_events") == before + deleted
    last_run = _sample("koinonia_retention_last_run_timestamp_seconds", "webhook_events")
    assert abs(last_run - datetime.now(UTC).timestamp()) < 60


async def test_batches_continue_until_everything_old_is_gone(app: FastAPI) -> None:
    ids = [await _event(app, processed=LONG_AGO, received=LONG_AGO) for _ in range(7)]
    deleted = await retention.prune_webhook_events(app.state.database, 30, batch=2)
    assert deleted >= 7
    assert await _events_left(app, ids) == set()


async def _job(app: FastAPI, status: str, at: datetime) -> int:
    rows = await _execute(
        app,
        "INSERT INTO procrastinate_jobs (queue_name, task_name, args, status) "
        "VALUES ('retention-test', 'retention:test', '{}'::jsonb, "
        "CAST(:status AS procrastinate_job_status)) RETURNING id",
        status=status,
    )
    job_id = int(rows.scalar_one())
    await _execute(
        app,
        "INSERT INTO procrastinate_events (job_id, type, at) VALUES (:id, 'deferred', :at)",
        id=job_id,
        at=at,
    )
    await _execute(
        app, "UPDATE procrastinate_events SET at = :at WHERE job_id = :id", id=job_id, at=at
    )
    return job_id


async def test_finished_jobs_are_pruned_and_others_kept(app: FastAPI, settings: Settings) -> None:
    old, recent = LONG_AGO, datetime.now(UTC) - timedelta(hours=1)
    succeeded_old = await _job(app, "succeeded", old)
    failed_old = await _job(app, "failed", old)
    cancelled_old = await _job(app, "cancelled", old)
    waiting_old = await _job(app, "todo", old)
    succeeded_recent = await _job(app, "succeeded", recent)
    periodic_old = await _job(app, "succeeded", old)
    await _execute(
        app,
        "INSERT INTO procrastinate_periodic_defers (task_name, defer_timestamp, job_id, "
        "periodic_id) VALUES ('retention:test', :ts, :id, '')",
        ts=random.randint(1, 2**30),
        id=periodic_old,
    )
    ids = [succeeded_old, failed_old, cancelled_old, waiting_old, succeeded_recent, periodic_old]

    job_settings = settings.model_copy(update={"job_retention_days": 14})
    async with open_resources(job_settings, build_job_app(job_settings)):
        deleted = await retention.prune_finished_jobs_task(timestamp=0)
    assert deleted >= 3
    rows = await _execute(app, "SELECT id FROM procrastinate_jobs WHERE id = ANY(:ids)", ids=ids)
    assert {int(row[0]) for row in rows} == {waiting_old, succeeded_recent, periodic_old}
    assert _sample("koinonia_retention_last_run_timestamp_seconds", "jobs") > 0


async def test_expired_refresh_tokens_are_pruned(
    app: FastAPI, settings: Settings, tenant_factory: Any
) -> None:
    tenant = await tenant_factory(role="owner")
    ids = {"expired": uuid.uuid4(), "valid": uuid.uuid4()}
    for name, expires in (
        ("expired", datetime.now(UTC) - timedelta(minutes=1)),
        ("valid", datetime.now(UTC) + timedelta(days=1)),
    ):
        await _execute(
            app,
            "INSERT INTO refresh_tokens (id, user_id, church_id, family_id, token_hash, "
            "expires_at) VALUES (:id, :user, :church, :family, :hash, :expires)",
            id=ids[name],
            user=tenant.user_id,
            church=tenant.church_id,
            family=uuid.uuid4(),
            hash=uuid.uuid4().bytes,
            expires=expires,
        )
    async with open_resources(settings, build_job_app(settings)):
        assert await retention.prune_refresh_tokens_task(timestamp=0) >= 1
    rows = await _execute(
        app, "SELECT id FROM refresh_tokens WHERE id = ANY(:ids)", ids=list(ids.values())
    )
    assert {row[0] for row in rows} == {ids["valid"]}


def _info(month: date) -> PartitionInfo:
    upper = partitions.add_months(month, 1)
    return PartitionInfo(
        "message_recipients",
        partitions.partition_name("message_recipients", month),
        f"FOR VALUES FROM ('{month} 00:00:00+00') TO ('{upper} 00:00:00+00')",
        0,
    )


def test_expired_partitions_are_the_months_wholly_before_the_retention() -> None:
    today = date(2026, 11, 29)
    months = [partitions.add_months(date(2024, 9, 1), n) for n in range(30)]  # to 2027-02
    chosen = {info.name for info in partitions.expired([_info(m) for m in months], today, 24)}
    # 24 months before November 2026 is November 2024: September and October 2024 end
    # by then; November 2024 and later stay.
    assert chosen == {"message_recipients_p202409", "message_recipients_p202410"}
    # Never the current month or a later one, however short the retention.
    current = {info.name for info in partitions.expired([_info(m) for m in months], today, 1)}
    assert "message_recipients_p202611" not in current
    assert "message_recipients_p202609" in current
    assert "message_recipients_p202610" not in current  # one whole month kept
    assert not any(name >= "message_recipients_p202611" for name in current)
    unreadable = PartitionInfo("message_recipients", "message_recipients_px", "DEFAULT", 0)
    assert partitions.expired([unreadable], today, 1) == []


async def test_old_partitions_are_detached_and_dropped(app: FastAPI, settings: Settings) -> None:
    old, kept = date(1999, 1, 1), date(1999, 8, 1)
    async with app.state.database.engine.begin() as connection:
        for month in (old, kept):
            for table in partitions.PARTITIONED_TABLES:
                await connection.execute(text(partitions.partition_ddl(table, month)))
    try:
        dropped = await retention.drop_old_partitions(
            app.state.database, 24, today=date(2001, 6, 15)
        )
        assert set(dropped) == {
            partitions.partition_name(t, old) for t in partitions.PARTITIONED_TABLES
        }
        async with app.state.database.engine.connect() as connection:
            names = {info.name for info in await partitions.list_partitions(connection)}
        assert not names & set(dropped)
        assert {partitions.partition_name(t, kept) for t in partitions.PARTITIONED_TABLES} <= names
        this_month = partitions.month_start(datetime.now(UTC).date())
        assert partitions.partition_name("message_recipients", this_month) in names
    finally:
        async with app.state.database.engine.begin() as connection:
            for table in partitions.PARTITIONED_TABLES:
                for month in (old, kept):
                    await connection.execute(
                        text(f"DROP TABLE IF EXISTS {partitions.partition_name(table, month)}")
                    )


def test_retention_jobs_are_periodic() -> None:
    from koinonia.jobs import _task_registry

    periodic = {name for name, _ in _task_registry().periodic_registry.periodic_tasks}
    assert {
        "retention:prune_finished_jobs",
        "retention:prune_webhook_events",
        "retention:prune_refresh_tokens",
        "retention:drop_old_partitions",
    } <= periodic
