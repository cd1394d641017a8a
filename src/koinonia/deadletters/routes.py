"""`/api/v1/admin/dlq`: list, inspect, replay and delete dead letters (operators only)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Path, Query, Request, Response, status
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.accounts.deps import Operator
from koinonia.audit import service as audit
from koinonia.deadletters import service
from koinonia.deadletters.registry import ReplayContext
from koinonia.deadletters.schemas import (
    MAX_REPLAY_BATCH,
    DeadLetterOut,
    ReplayFailure,
    ReplayRequest,
    ReplayResult,
    ReplayState,
)
from koinonia.deadletters.tables import DeadLetter
from koinonia.errors import (
    ExternalServiceError,
    NotFoundError,
    problem_responses,
)
from koinonia.http.deps import DbSession
from koinonia.http.pagination import Page, PageParams, cursor_key, make_page, page_params
from koinonia.http.routing import FeatureRouter

router = FeatureRouter(prefix="/api/v1/admin/dlq", tags=["operations"])
Pages = Annotated[PageParams, Depends(page_params)]
ERRORS = problem_responses(401, 403, 404)


def _replay_context(request: Request) -> ReplayContext:
    return ReplayContext(request.app.state.job_app, request.app.state.settings)


# A dead letter's id is a bigint: anything outside it is a 422, not a database error.
EntryId = Annotated[int, Path(ge=1, le=2**63 - 1)]


def _cursor_id(page: PageParams) -> int:
    (value,) = cursor_key(page, int)
    return int(value)


async def _get(session: AsyncSession, entry_id: int, *, lock: bool = False) -> DeadLetter:
    query = select(DeadLetter).where(DeadLetter.id == entry_id)
    if lock:
        query = query.with_for_update()
    entry = (await session.execute(query)).scalar_one_or_none()
    if entry is None:
        raise NotFoundError("No such dead letter")
    return entry


@router.get(
    "",
    summary="Dead letters, newest first",
    description="Filters combine; `since` keeps entries created at or after that time.",
    responses=problem_responses(401, 403),
)
async def list_dead_letters(
    _: Operator,
    session: DbSession,
    page: Pages,
    kind: Annotated[str | None, Query(max_length=60)] = None,
    church_id: uuid.UUID | None = None,
    replay_state: ReplayState | None = None,
    error_code: Annotated[str | None, Query(max_length=40)] = None,
    since: datetime | None = None,
) -> Page[DeadLetterOut]:
    query = select(DeadLetter)
    if kind is not None:
        query = query.where(DeadLetter.kind == kind)
    if church_id is not None:
        query = query.where(DeadLetter.church_id == church_id)
    if replay_state is not None:
        query = query.where(DeadLetter.replay_state == replay_state)
    if error_code is not None:
        query = query.where(DeadLetter.error_code == error_code)
    if since is not None:
        query = query.where(
            DeadLetter.created_at >= (since if since.tzinfo else since.replace(tzinfo=UTC))
        )
    if page.cursor:
        query = query.where(DeadLetter.id < _cursor_id(page))
    rows = (await session.scalars(query.order_by(DeadLetter.id.desc()).limit(page.limit + 1))).all()
    return make_page([DeadLetterOut.model_validate(r) for r in rows], page.limit, lambda e: [e.id])


@router.get("/{entry_id}", summary="One dead letter", responses=ERRORS)
async def get_dead_letter(entry_id: EntryId, _: Operator, session: DbSession) -> DeadLetterOut:
    return DeadLetterOut.model_validate(await _get(session, entry_id))


@router.post(
    "/replay",
    summary="Replay many dead letters",
    description=f"By `ids` (up to {MAX_REPLAY_BATCH}), or by `kind` (and `church_id`): the "
    f"oldest {MAX_REPLAY_BATCH} pending entries. Each entry is replayed in its own savepoint: "
    "one failing replayer is reported in `failed` and does not stop the rest.",
    responses=problem_responses(401, 403),
)
async def replay_many(
    body: ReplayRequest, principal: Operator, session: DbSession, request: Request
) -> ReplayResult:
    if body.ids is not None:
        wanted = sorted(set(body.ids))
        query = (
            select(DeadLetter)
            .where(DeadLetter.id.in_(wanted))
            .order_by(DeadLetter.id)
            .with_for_update()
        )
    else:
        query = select(DeadLetter).where(
            DeadLetter.kind == body.kind, DeadLetter.replay_state == service.PENDING
        )
        if body.church_id is not None:
            query = query.where(DeadLetter.church_id == body.church_id)
        # Entries another operator is replaying right now are left to that replay.
        query = (
            query.order_by(DeadLetter.id).limit(MAX_REPLAY_BATCH).with_for_update(skip_locked=True)
        )
    entries = list((await session.scalars(query)).all())
    failed: list[ReplayFailure] = []
    if body.ids is not None:
        found = {e.id for e in entries}
        failed.extend(
            ReplayFailure(id=i, detail="No such dead letter") for i in wanted if i not in found
        )
    context = _replay_context(request)
    replayed = 0
    for entry in entries:
        entry_id = entry.id
        detail = await service.replay_isolated(session, context, entry, actor_id=principal.actor_id)
        if detail is None:
            replayed += 1
        else:
            failed.append(ReplayFailure(id=entry_id, detail=detail))
    failed.sort(key=lambda f: f.id)
    return ReplayResult(replayed=replayed, failed=failed)


@router.post(
    "/{entry_id}/replay",
    summary="Replay one dead letter",
    description="`409` when its kind has no replayer or it was replayed already; `502` when "
    "the replayer fails (the entry is then left in `replay_failed`).",
    responses=problem_responses(401, 403, 404, 409, 502),
)
async def replay_one(
    entry_id: EntryId, principal: Operator, session: DbSession, request: Request
) -> DeadLetterOut:
    entry = await _get(session, entry_id, lock=True)
    service.check_replayable(entry)
    detail = await service.replay_isolated(
        session, _replay_context(request), entry, actor_id=principal.actor_id
    )
    if detail is not None:
        # Keep the `replay_failed` state even though the answer is an error.
        await session.commit()
        raise ExternalServiceError(f"The replay failed: {detail}")
    return DeadLetterOut.model_validate(entry)


@router.delete(
    "/{entry_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete one dead letter",
    responses=ERRORS,
)
async def delete_dead_letter(
    entry_id: EntryId, principal: Operator, session: DbSession
) -> Response:
    entry = await _get(session, entry_id, lock=True)
    audit.record(
        session,
        action="dlq.delete",
        church_id=entry.church_id,
        actor_id=principal.actor_id,
        actor_kind="operator",
        target_type="dead_letter",
        target_id=entry.id,
        details={"kind": entry.kind, "replay_state": entry.replay_state},
    )
    await session.delete(entry)
    await session.flush()
    return Response(status_code=status.HTTP_204_NO_CONTENT)
