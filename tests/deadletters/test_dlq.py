"""The dead-letter queue operator surface against the real database, through the API."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.app import create_app
from koinonia.audit.tables import AuditEntry
from koinonia.deadletters import jobs as dlq_jobs
from koinonia.deadletters import service
from koinonia.deadletters.registry import REPLAYERS
from koinonia.deadletters.tables import DeadLetter
from koinonia.jobs import build_job_app, open_resources
from koinonia.settings import Settings

DLQ = "/api/v1/admin/dlq"


@pytest.fixture(scope="module")
async def dlq_app(settings: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture(scope="module")
async def api(dlq_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=dlq_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


@pytest.fixture
async def operator(tenant_factory: Any) -> Any:
    return await tenant_factory(is_operator=True)


class Calls:
    def __init__(self) -> None:
        self.entries: list[tuple[int, str, dict[str, Any], Any]] = []


@pytest.fixture
def replayers() -> Iterator[Calls]:
    """`test.kind` records its calls; `test.failing` writes a row, then raises."""
    calls = Calls()

    async def ok(session: AsyncSession, context: Any, entry: DeadLetter) -> None:
        calls.entries.append((entry.id, entry.kind, dict(entry.payload), context.job_app))

    async def failing(session: AsyncSession, context: Any, entry: DeadLetter) -> None:
        # Work done before the failure must vanish with the entry's savepoint.
        session.add(
            DeadLetter(
                kind="test.leak",
                church_id=None,
                payload={"from": entry.id},
                last_error="should be rolled back",
                attempts=0,
            )
        )
        await session.flush()
        raise RuntimeError("the replayer broke")

    REPLAYERS["test.kind"] = ok
    REPLAYERS["test.failing"] = failing
    try:
        yield calls
    finally:
        REPLAYERS.pop("test.kind", None)
        REPLAYERS.pop("test.failing", None)


async def insert(
    app: FastAPI,
    *,
    kind: str = "test.kind",
    church_id: uuid.UUID | None = None,
    error_code: str | None = "E1",
    created_at: datetime | None = None,
    replay_state: str = "pending",
    payload: dict[str, Any] | None = None,
) -> int:
    async with app.state.database.unit_of_work() as session:
        entry = DeadLetter(
            kind=kind,
            church_id=church_id,
            payload=payload or {"message_id": str(uuid.uuid4())},
            last_error="provider said no",
            error_code=error_code,
            attempts=5,
            replay_state=replay_state,
        )
        if created_at is not None:
            entry.created_at = created_at
        session.add(entry)
        await session.flush()
        return entry.id


async def state_of(app: FastAPI, entry_id: int) -> str | None:
    async with app.state.database.sessions() as session:
        state: str | None = await session.scalar(
            select(DeadLetter.replay_state).where(DeadLetter.id == entry_id)
        )
        return state


def unique_kind() -> str:
    return f"test.{uuid.uuid4().hex[:12]}"


async def test_record_adds_a_row_and_counts_it(
    app: FastAPI, caplog: pytest.LogCaptureFixture
) -> None:
    kind = unique_kind()
    before = REGISTRY.get_sample_value("koinonia_dead_letters_total", {"kind": kind}) or 0.0
    async with app.state.database.unit_of_work() as session:
        await service.record(
            session,
            kind=kind,
            church_id=None,
            payload={"phone": "+14155550123"},
            error="x" * 5000,
            error_code="E9",
            attempts=3,
        )
    async with app.state.database.sessions() as session:
        row = (await session.scalars(select(DeadLetter).where(DeadLetter.kind == kind))).one()
    assert (row.attempts, row.error_code, row.replay_state) == (3, "E9", "pending")
    assert len(row.last_error) == 2000
    after = REGISTRY.get_sample_value("koinonia_dead_letters_total", {"kind": kind})
    assert after == before + 1
    logged = [r.getMessage() for r in caplog.records if "dead_lettered" in r.getMessage()]
    assert logged and kind in logged[-1] and "E9" in logged[-1]
    assert "payload" not in logged[-1] and "0123" not in logged[-1]


async def test_record_never_commits(app: FastAPI) -> None:
    kind = unique_kind()
    async with app.state.database.sessions() as session:
        await service.record(
            session, kind=kind, church_id=None, payload={}, error="e", error_code=None, attempts=1
        )
        await session.rollback()
    async with app.state.database.sessions() as session:
        count = await session.scalar(select(func.count()).where(DeadLetter.kind == kind))
    assert count == 0


async def test_operators_only(
    api: httpx.AsyncClient, tenant_factory: Any, dlq_app: FastAPI
) -> None:
    entry_id = await insert(dlq_app)
    owner = await tenant_factory(role="owner")
    for method, path in [
        ("GET", DLQ),
        ("GET", f"{DLQ}/{entry_id}"),
        ("POST", f"{DLQ}/{entry_id}/replay"),
        ("DELETE", f"{DLQ}/{entry_id}"),
    ]:
        anonymous = await api.request(method, path)
        assert anonymous.status_code == 401, (method, path)
        forbidden = await api.request(method, path, headers=owner.headers)
        assert forbidden.status_code == 403, (method, path)
        assert forbidden.json()["code"] == "forbidden"
    bulk = await api.post(f"{DLQ}/replay", json={"ids": [entry_id]}, headers=owner.headers)
    assert bulk.status_code == 403
    assert (await api.post(f"{DLQ}/replay", json={"ids": [entry_id]})).status_code == 401
    assert await state_of(dlq_app, entry_id) == "pending"


async def test_list_filters_and_pagination(
    api: httpx.AsyncClient, operator: Any, dlq_app: FastAPI
) -> None:
    kind = unique_kind()
    church_a, church_b = uuid.uuid4(), uuid.uuid4()
    old = datetime.now(UTC) - timedelta(days=3)
    ids = [
        await insert(dlq_app, kind=kind, church_id=church_a, error_code="E1", created_at=old),
        await insert(dlq_app, kind=kind, church_id=church_a, error_code="E2"),
        await insert(dlq_app, kind=kind, church_id=church_b, error_code="E1"),
        await insert(
            dlq_app, kind=kind, church_id=church_b, error_code=None, replay_state="replayed"
        ),
        await insert(dlq_app, kind=kind, church_id=None, error_code="E1"),
    ]
    await insert(dlq_app, kind=unique_kind(), church_id=church_a)  # another kind

    async def listed(**params: Any) -> list[int]:
        response = await api.get(DLQ, params={"kind": kind, **params}, headers=operator.headers)
        assert response.status_code == 200, response.text
        return [e["id"] for e in response.json()["data"]]

    assert await listed() == ids[::-1]  # newest first
    assert await listed(church_id=str(church_a)) == [ids[1], ids[0]]
    assert await listed(error_code="E1") == [ids[4], ids[2], ids[0]]
    assert await listed(replay_state="replayed") == [ids[3]]
    assert await listed(replay_state="pending", church_id=str(church_b)) == [ids[2]]
    since = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    assert await listed(since=since) == ids[1:][::-1]

    seen: list[int] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"kind": kind, "limit": 2}
        if cursor:
            params["cursor"] = cursor
        response = await api.get(DLQ, params=params, headers=operator.headers)
        assert response.status_code == 200
        body = response.json()
        assert len(body["data"]) <= 2
        seen += [e["id"] for e in body["data"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    assert pages == 3

    one = await api.get(f"{DLQ}/{ids[0]}", headers=operator.headers)
    assert one.status_code == 200
    entry = one.json()
    assert entry["kind"] == kind and entry["church_id"] == str(church_a)
    assert entry["error_code"] == "E1" and entry["attempts"] == 5
    assert entry["replay_state"] == "pending" and entry["replayed_at"] is None
    assert entry["created_at"].endswith("Z")

    bad = await api.get(DLQ, params={"cursor": "not-a-cursor"}, headers=operator.headers)
    assert bad.status_code == 422
    bad_state = await api.get(DLQ, params={"replay_state": "nope"}, headers=operator.headers)
    assert bad_state.status_code == 422
    missing = await api.get(f"{DLQ}/999999999999", headers=operator.headers)
    assert missing.status_code == 404


async def test_replay_one(
    api: httpx.AsyncClient, operator: Any, dlq_app: FastAPI, replayers: Calls
) -> None:
    church = uuid.uuid4()
    entry_id = await insert(dlq_app, church_id=church, payload={"message_id": "m-1"})
    response = await api.post(f"{DLQ}/{entry_id}/replay", headers=operator.headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == entry_id
    assert body["replay_state"] == "replayed" and body["replayed_at"] is not None
    assert [(c[0], c[1], c[2]) for c in replayers.entries] == [
        (entry_id, "test.kind", {"message_id": "m-1"})
    ]
    assert replayers.entries[0][3] is dlq_app.state.job_app
    assert await state_of(dlq_app, entry_id) == "replayed"

    async with dlq_app.state.database.sessions() as session:
        audit = (
            await session.scalars(
                select(AuditEntry).where(
                    AuditEntry.action == "dlq.replay", AuditEntry.target_id == str(entry_id)
                )
            )
        ).one()
    assert audit.actor_kind == "operator" and audit.actor_id == operator.user_id
    assert audit.church_id == church and audit.target_type == "dead_letter"

    again = await api.post(f"{DLQ}/{entry_id}/replay", headers=operator.headers)
    assert again.status_code == 409
    assert again.json()["code"] == "conflict"
    assert len(replayers.entries) == 1

    missing = await api.post(f"{DLQ}/999999999999/replay", headers=operator.headers)
    assert missing.status_code == 404


async def test_replay_of_an_unknown_kind_is_a_conflict(
    api: httpx.AsyncClient, operator: Any, dlq_app: FastAPI
) -> None:
    entry_id = await insert(dlq_app, kind=unique_kind())
    response = await api.post(f"{DLQ}/{entry_id}/replay", headers=operator.headers)
    assert response.status_code == 409
    assert "cannot be replayed" in response.json()["detail"]
    assert await state_of(dlq_app, entry_id) == "pending"


async def test_failing_replayer_leaves_replay_failed(
    api: httpx.AsyncClient, operator: Any, dlq_app: FastAPI, replayers: Calls
) -> None:
    entry_id = await insert(dlq_app, kind="test.failing")
    response = await api.post(f"{DLQ}/{entry_id}/replay", headers=operator.headers)
    assert response.status_code == 502
    assert "the replayer broke" in response.json()["detail"]
    assert await state_of(dlq_app, entry_id) == "replay_failed"
    async with dlq_app.state.database.sessions() as session:
        leaked = await session.scalar(
            select(func.count()).where(
                DeadLetter.kind == "test.leak", DeadLetter.payload["from"].as_integer() == entry_id
            )
        )
    assert leaked == 0


async def test_bulk_replay_by_ids_isolates_failures(
    api: httpx.AsyncClient, operator: Any, dlq_app: FastAPI, replayers: Calls
) -> None:
    good = [await insert(dlq_app) for _ in range(3)]
    bad = await insert(dlq_app, kind="test.failing")
    unknown_kind = await insert(dlq_app, kind=unique_kind())
    done = await insert(dlq_app, replay_state="replayed")
    missing = 999_999_999_999
    ids = [good[0], bad, good[1], unknown_kind, done, good[2], missing, good[0]]

    response = await api.post(f"{DLQ}/replay", json={"ids": ids}, headers=operator.headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["replayed"] == 3
    failed = {f["id"]: f["detail"] for f in body["failed"]}
    assert set(failed) == {bad, unknown_kind, done, missing}
    assert "the replayer broke" in failed[bad]
    assert "cannot be replayed" in failed[unknown_kind]
    assert "already been replayed" in failed[done]
    assert "No such" in failed[missing]
    assert sorted(c[0] for c in replayers.entries) == good  # each once, in id order
    for entry_id in good:
        assert await state_of(dlq_app, entry_id) == "replayed"
    assert await state_of(dlq_app, bad) == "replay_failed"
    assert await state_of(dlq_app, unknown_kind) == "pending"
    async with dlq_app.state.database.sessions() as session:
        leaked = await session.scalar(
            select(func.count()).where(
                DeadLetter.kind == "test.leak", DeadLetter.payload["from"].as_integer() == bad
            )
        )
        audits = await session.scalar(
            select(func.count()).where(
                AuditEntry.action == "dlq.replay",
                AuditEntry.target_id.in_([str(i) for i in [*good, bad]]),
            )
        )
    assert leaked == 0
    assert audits == 3


async def test_bulk_replay_by_kind_takes_pending_only(
    api: httpx.AsyncClient, operator: Any, dlq_app: FastAPI, replayers: Calls
) -> None:
    church, other = uuid.uuid4(), uuid.uuid4()
    pending = [await insert(dlq_app, church_id=church) for _ in range(2)]
    elsewhere = await insert(dlq_app, church_id=other)
    failed_before = await insert(dlq_app, church_id=church, replay_state="replay_failed")
    response = await api.post(
        f"{DLQ}/replay",
        json={"kind": "test.kind", "church_id": str(church)},
        headers=operator.headers,
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"replayed": 2, "failed": []}
    assert sorted(c[0] for c in replayers.entries) == pending
    assert await state_of(dlq_app, elsewhere) == "pending"
    assert await state_of(dlq_app, failed_before) == "replay_failed"


async def test_bulk_replay_body_is_validated(
    api: httpx.AsyncClient, operator: Any, replayers: Calls
) -> None:
    for body in [
        {},
        {"ids": []},
        {"ids": list(range(1, 1002))},
        {"ids": [1], "kind": "test.kind"},
        {"ids": [1], "church_id": str(uuid.uuid4())},
        {"kind": "test.kind", "extra": 1},
    ]:
        response = await api.post(f"{DLQ}/replay", json=body, headers=operator.headers)
        assert response.status_code == 422, body
    assert replayers.entries == []


async def test_delete(api: httpx.AsyncClient, operator: Any, dlq_app: FastAPI) -> None:
    church = uuid.uuid4()
    entry_id = await insert(dlq_app, church_id=church)
    deleted = await api.delete(f"{DLQ}/{entry_id}", headers=operator.headers)
    assert deleted.status_code == 204
    assert deleted.content == b""
    assert (await api.get(f"{DLQ}/{entry_id}", headers=operator.headers)).status_code == 404
    assert (await api.delete(f"{DLQ}/{entry_id}", headers=operator.headers)).status_code == 404
    async with dlq_app.state.database.sessions() as session:
        audit = (
            await session.scalars(
                select(AuditEntry).where(
                    AuditEntry.action == "dlq.delete", AuditEntry.target_id == str(entry_id)
                )
            )
        ).one()
    assert audit.actor_kind == "operator" and audit.actor_id == operator.user_id
    assert audit.church_id == church


async def test_cleanup_deletes_only_old_replayed_rows(app: FastAPI, settings: Settings) -> None:
    kind = unique_kind()
    forty_days_ago = datetime.now(UTC) - timedelta(days=40)
    old = await insert(app, kind=kind, created_at=forty_days_ago, replay_state="replayed")
    # Never replayed (or failed to): kept until an operator replays or deletes it.
    old_pending = await insert(app, kind=kind, created_at=forty_days_ago)
    old_failed = await insert(
        app, kind=kind, created_at=forty_days_ago, replay_state="replay_failed"
    )
    recent = await insert(
        app, kind=kind, created_at=datetime.now(UTC) - timedelta(days=20), replay_state="replayed"
    )
    fresh = await insert(app, kind=kind)
    async with app.state.database.unit_of_work() as session:
        deleted = await service.cleanup(session, retention_days=30)
    assert deleted >= 1
    assert await state_of(app, old) is None
    assert await state_of(app, old_pending) == "pending"
    assert await state_of(app, old_failed) == "replay_failed"
    assert await state_of(app, recent) == "replayed"
    assert await state_of(app, fresh) == "pending"

    # The daily job does the same with DLQ_RETENTION_DAYS.
    older = await insert(
        app, kind=kind, created_at=datetime.now(UTC) - timedelta(days=11), replay_state="replayed"
    )
    job_settings = settings.model_copy(update={"dlq_retention_days": 10})
    async with open_resources(job_settings, build_job_app(job_settings)):
        assert await dlq_jobs.cleanup_dead_letters(timestamp=0) >= 1
    assert await state_of(app, older) is None
    assert await state_of(app, recent) is None
    assert await state_of(app, old_pending) == "pending"
    assert await state_of(app, fresh) == "pending"


async def test_size_and_alert_gauges(app: FastAPI, settings: Settings) -> None:
    await insert(app, kind=unique_kind())
    async with app.state.database.sessions() as session:
        size = await service.refresh_size_metrics(session, threshold=1_000_000)
        counted = await session.scalar(select(func.count()).select_from(DeadLetter))
    assert size == counted and size >= 1
    assert REGISTRY.get_sample_value("koinonia_dlq_size") == size
    assert REGISTRY.get_sample_value("koinonia_dlq_alert") == 0

    async with app.state.database.sessions() as session:
        assert await service.refresh_size_metrics(session, threshold=size - 1) == size
    assert REGISTRY.get_sample_value("koinonia_dlq_alert") == 1

    async with app.state.database.sessions() as session:  # exactly at the threshold: no alert
        assert await service.refresh_size_metrics(session, threshold=size) == size
    assert REGISTRY.get_sample_value("koinonia_dlq_alert") == 0

    # The every-minute job reads DLQ_ALERT_THRESHOLD.
    job_settings = settings.model_copy(update={"dlq_alert_threshold": size - 1})
    async with open_resources(job_settings, build_job_app(job_settings)):
        assert await dlq_jobs.dlq_metrics(timestamp=0) >= size
    assert REGISTRY.get_sample_value("koinonia_dlq_alert") == 1


def test_periodic_jobs_are_registered() -> None:
    from koinonia.jobs import _task_registry

    registry = _task_registry()
    periodic = {name for name, _ in registry.periodic_registry.periodic_tasks}
    assert {"deadletters:cleanup_dead_letters", "deadletters:dlq_metrics"} <= periodic
    for name in ("deadletters:cleanup_dead_letters", "deadletters:dlq_metrics"):
        assert registry.tasks[name].queue == "maintenance"
