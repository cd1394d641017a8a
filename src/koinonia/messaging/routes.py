"""`/messages`: preview, send (with `Idempotency-Key`), list, read, recipients, cancel."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from fastapi import Depends, Header, Query, Request, Response, status
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.accounts.deps import CurrentPrincipal
from koinonia.accounts.tables import Church
from koinonia.errors import problem_responses
from koinonia.http.deps import AppSettings, DbSession, get_database
from koinonia.http.pagination import (
    Page,
    PageParams,
    cursor_key,
    make_page,
    page_params,
)
from koinonia.http.routing import FeatureRouter
from koinonia.messaging import broadcasts, pauses
from koinonia.messaging.schemas import MessageOut, MessageRequest, PreviewOut, RecipientOut
from koinonia.messaging.tables import Message
from koinonia.replicas import ReadSession
from koinonia.tenancy import get_owned

router = FeatureRouter(prefix="/api/v1/messages", tags=["messages"])
Pages = Annotated[PageParams, Depends(page_params)]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=255,
        description="Same key and body → the first answer again and nothing sent twice; "
        "same key with another body → 409.",
    ),
]
RecipientStatus = Literal[
    "queued", "sending", "sent", "delivered", "failed", "undelivered", "skipped"
]


@router.post("/preview", responses=problem_responses(401, 404, 422, 429))
async def preview_message(
    body: MessageRequest, principal: CurrentPrincipal, session: DbSession
) -> PreviewOut:
    """Segments, encoding and recipient count before sending (nothing is stored)."""
    return await broadcasts.preview(session, principal.church_id, body)


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    responses=problem_responses(401, 402, 403, 404, 409, 422, 429, 503),
    summary="Send (or schedule) a broadcast",
    description="Validates, counts segments, resolves the audience (distinct members of "
    "the groups and ids, not opted out, not deleted), reserves the segments and writes the "
    "message, every recipient and the dispatch batches in one transaction; workers send. "
    "`402 quota_exceeded` or `subscription_inactive` when the plan cannot cover it — "
    "nothing is queued then. `409 number_not_ready` until the church's number is assigned. "
    "A broadcast accepted outside the church's sending window (and not `urgent`) is held: "
    "its answer has status `scheduled` and `starts_at`. A blank text is `422`. "
    "`503 commit_unknown` when the outcome could not be learnt: retry with the same "
    "`Idempotency-Key`.",
)
async def send_message(
    body: MessageRequest,
    principal: CurrentPrincipal,
    request: Request,
    response: Response,
    settings: AppSettings,
    idempotency_key: IdempotencyKey = None,
) -> MessageOut:
    created = await broadcasts.create(
        get_database(request),
        settings,
        request.app.state.job_app,
        principal,
        body,
        idempotency_key,
    )
    response.headers["Location"] = f"/api/v1/messages/{created.message.id}"
    if created.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return created.message


@router.get("", responses=problem_responses(401, 422, 429))
async def list_messages(
    principal: CurrentPrincipal,
    session: ReadSession,
    page: Pages,
    status_filter: Annotated[str | None, Query(alias="status", max_length=10)] = None,
) -> Page[MessageOut]:
    query = select(Message).where(Message.church_id == principal.church_id)
    if status_filter:
        query = query.where(Message.status == status_filter)
    if page.cursor:
        at, last = cursor_key(page, datetime, uuid.UUID)
        query = query.where(
            (Message.created_at < at) | ((Message.created_at == at) & (Message.id < last))
        )
    rows = (
        await session.scalars(
            query.order_by(Message.created_at.desc(), Message.id.desc()).limit(page.limit + 1)
        )
    ).all()
    return make_page(
        [broadcasts.to_out(m) for m in rows], page.limit, lambda m: [m.created_at, m.id]
    )


@router.get("/{message_id}", responses=problem_responses(401, 404, 429))
async def get_message(
    message_id: uuid.UUID, principal: CurrentPrincipal, session: ReadSession
) -> MessageOut:
    message = await get_owned(session, Message, message_id, principal.church_id, what="message")
    return broadcasts.to_out(message, await _paused_reason(session, principal.church_id))


async def _paused_reason(session: AsyncSession, church_id: uuid.UUID) -> str | None:
    church = await session.get_one(Church, church_id)
    if church.phone_number is None:
        return None
    pause = await pauses.active(session, church.phone_number)
    if pause is None:
        return None
    what = "the provider account" if pause.scope == pauses.ACCOUNT else "the sending number"
    code = f" ({pause.error_code})" if pause.error_code else ""
    return f"sending paused: {what} was refused{code}: {pause.reason}"[:300]


@router.get("/{message_id}/recipients", responses=problem_responses(401, 404, 422, 429))
async def list_recipients(
    message_id: uuid.UUID,
    principal: CurrentPrincipal,
    session: ReadSession,
    page: Pages,
    status_filter: Annotated[RecipientStatus | None, Query(alias="status")] = None,
) -> Page[RecipientOut]:
    message = await get_owned(session, Message, message_id, principal.church_id, what="message")
    after = 0
    if page.cursor:
        (after,) = cursor_key(page, int)
    rows = await session.execute(
        broadcasts.recipients_page(
            message.id,
            message.created_at,
            after=after,
            status=status_filter,
            limit=page.limit + 1,
        )
    )
    items = [
        RecipientOut(
            id=str(r.id),
            member_id=r.member_id,
            status=r.status,
            skip_reason=r.skip_reason,
            segments=r.segments,
            attempts=r.attempts,
            provider_message_id=r.provider_message_id,
            error_code=r.error_code,
            error_detail=r.error_detail,
            sent_at=r.sent_at,
            finalized_at=r.finalized_at,
            in_doubt=bool(r.in_doubt) and r.status == "sending",
        )
        for r in rows
    ]
    return make_page(items, page.limit, lambda r: [int(r.id)])


@router.post("/{message_id}/cancel", responses=problem_responses(401, 404, 409, 429))
async def cancel_message(
    message_id: uuid.UUID, principal: CurrentPrincipal, session: DbSession
) -> MessageOut:
    """Stops what has not gone out yet and gives its segments back; texts already handed
    to Telnyx are not recalled."""
    message = await broadcasts.cancel(session, principal.church_id, message_id)
    return broadcasts.to_out(message)
