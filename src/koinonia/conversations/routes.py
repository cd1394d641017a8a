"""`/conversations`: the two-way inbox."""

from __future__ import annotations

import base64
import uuid
from datetime import datetime
from types import SimpleNamespace
from typing import Annotated, Any, Literal

from fastapi import Depends, Query, Request, Response, status
from sqlalchemy import select, text

from koinonia.accounts.deps import CurrentPrincipal
from koinonia.accounts.tables import Church
from koinonia.cache import Cache, CachePolicy, inbox_tag
from koinonia.conversations import service
from koinonia.conversations.schemas import (
    ConversationMember,
    ConversationMessageOut,
    ConversationOut,
    ConversationPatch,
    LastMessage,
    ReplyIn,
    StartConversation,
)
from koinonia.conversations.tables import Conversation, ConversationMessage
from koinonia.db import Database
from koinonia.errors import ConflictError, problem_responses
from koinonia.http.deps import AppCache, AppDatabase, DbSession, invalidate_on_commit
from koinonia.http.pagination import (
    Page,
    PageParams,
    cursor_key,
    make_page,
    page_params,
)
from koinonia.http.routing import FeatureRouter
from koinonia.members.crypto import ContactCipher
from koinonia.members.service import get_member
from koinonia.replicas import ReadSession
from koinonia.tenancy import get_owned

router = FeatureRouter(prefix="/api/v1/conversations", tags=["conversations"])
Pages = Annotated[PageParams, Depends(page_params)]

# open ⇄ closed, either → archived, archived → open
TRANSITIONS = {
    "open": {"closed", "archived"},
    "closed": {"open", "archived"},
    "archived": {"open"},
}

INBOX_SQL = """
SELECT c.id, c.status, c.unread_count, c.last_message_at, c.last_message_preview,
       c.last_message_direction, c.created_at, c.church_id,
       m.id AS member_id, m.first_name, m.last_name, m.phone_ct, m.opted_out, m.is_unknown
FROM conversations c JOIN members m ON m.id = c.member_id
WHERE c.church_id = :church_id
  AND (CAST(:status AS text) IS NULL OR c.status = :status)
  AND (CAST(:unread AS boolean) IS NULL OR (c.unread_count > 0) = :unread)
  AND (CAST(:conversation_id AS uuid) IS NULL OR c.id = :conversation_id)
  AND (CAST(:before_at AS timestamptz) IS NULL
       OR (c.last_message_at, c.id) < (:before_at, :before_id))
ORDER BY c.last_message_at DESC, c.id DESC
LIMIT :limit
"""


# The first page of the inbox per church, filter and limit (what a polling client reads);
# later pages (a cursor) are read from the database. Every write that changes a row shown
# here invalidates the church's `inbox` tag after its commit (docs/scaling.md, "Caches"),
# so the TTL only bounds what a lost invalidation could leave behind.
INBOX_CACHE = CachePolicy("inbox", ttl=30, stale_ttl=15)


def _to_cache(row: Any) -> dict[str, Any]:
    """An inbox row as JSON. The phone stays encrypted (decrypted for each answer, bound
    to the church): Redis never holds a member's phone in clear."""
    return {
        "id": str(row.id),
        "status": row.status,
        "unread_count": row.unread_count,
        "last_message_at": row.last_message_at.isoformat(),
        "last_message_preview": row.last_message_preview,
        "last_message_direction": row.last_message_direction,
        "created_at": row.created_at.isoformat(),
        "member_id": str(row.member_id),
        "first_name": row.first_name,
        "last_name": row.last_name,
        "phone_ct": base64.b64encode(bytes(row.phone_ct)).decode(),
        "opted_out": row.opted_out,
        "is_unknown": row.is_unknown,
    }


def _from_cache(entry: dict[str, Any], church_id: uuid.UUID) -> SimpleNamespace:
    return SimpleNamespace(
        **{**entry, "phone_ct": base64.b64decode(entry["phone_ct"]), "church_id": church_id}
    )


async def _first_page(
    database: Database,
    cache: Cache,
    church_id: uuid.UUID,
    *,
    limit: int,
    status_filter: str | None,
    unread: bool | None,
) -> list[SimpleNamespace]:
    async def load() -> list[dict[str, Any]]:
        # A session of its own on the primary: a background refresh outlives the request,
        # and a lagging replica would cache an old inbox for the whole TTL.
        async with database.sessions() as session:
            rows = await _inbox(
                session, church_id, limit=limit, status_filter=status_filter, unread=unread
            )
        return [_to_cache(row) for row in rows]

    unread_key = "any" if unread is None else str(unread).lower()
    key = f"{church_id}:{status_filter or 'any'}:{unread_key}:{limit}"
    entries = await cache.get_or_load(INBOX_CACHE, key, load, tags=[inbox_tag(church_id)])
    return [_from_cache(entry, church_id) for entry in entries]


def _cipher(request: Request) -> ContactCipher:
    cipher: ContactCipher | None = getattr(request.app.state, "contact_cipher", None)
    if cipher is None:
        cipher = ContactCipher.from_settings(request.app.state.settings)
        request.app.state.contact_cipher = cipher
    return cipher


def _out(row: Any, cipher: ContactCipher) -> ConversationOut:
    return ConversationOut(
        id=row.id,
        member=ConversationMember(
            id=row.member_id,
            first_name=row.first_name,
            last_name=row.last_name,
            phone=cipher.decrypt(row.phone_ct, row.church_id),
            opted_out=row.opted_out,
            is_unknown=row.is_unknown,
        ),
        status=row.status,
        unread_count=row.unread_count,
        last_message_at=row.last_message_at,
        last_message=LastMessage(
            body=row.last_message_preview, direction=row.last_message_direction
        )
        if row.last_message_preview is not None
        else None,
        created_at=row.created_at,
    )


async def _inbox(
    session: Any,
    church_id: uuid.UUID,
    *,
    limit: int,
    status_filter: str | None = None,
    unread: bool | None = None,
    conversation_id: uuid.UUID | None = None,
    before: tuple[Any, uuid.UUID] | None = None,
) -> list[Any]:
    rows = await session.execute(
        text(INBOX_SQL),
        {
            "church_id": church_id,
            "status": status_filter,
            "unread": unread,
            "conversation_id": conversation_id,
            "before_at": before[0] if before else None,
            "before_id": before[1] if before else None,
            "limit": limit,
        },
    )
    return list(rows)


@router.get("", responses=problem_responses(401, 422, 429))
async def list_conversations(
    principal: CurrentPrincipal,
    session: ReadSession,
    database: AppDatabase,
    cache: AppCache,
    request: Request,
    page: Pages,
    status_filter: Annotated[
        Literal["open", "closed", "archived"] | None, Query(alias="status")
    ] = None,
    unread: bool | None = None,
) -> Page[ConversationOut]:
    """The inbox, newest activity first: one query (conversation + member); the first
    page is cached per church and filter."""
    rows: list[Any]
    if page.cursor:
        rows = await _inbox(
            session,
            principal.church_id,
            limit=page.limit + 1,
            status_filter=status_filter,
            unread=unread,
            before=cursor_key(page, datetime, uuid.UUID),
        )
    else:
        rows = await _first_page(
            database,
            cache,
            principal.church_id,
            limit=page.limit + 1,
            status_filter=status_filter,
            unread=unread,
        )
    cipher = _cipher(request)
    return make_page(
        [_out(r, cipher) for r in rows], page.limit, lambda c: [c.last_message_at, c.id]
    )


async def _one(
    session: Any, church_id: uuid.UUID, conversation_id: uuid.UUID, request: Request
) -> ConversationOut:
    rows = await _inbox(session, church_id, limit=1, conversation_id=conversation_id)
    if not rows:
        await get_owned(session, Conversation, conversation_id, church_id, what="conversation")
    return _out(rows[0], _cipher(request))


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={
        200: {"model": ConversationOut, "description": "The member's existing conversation"},
        **problem_responses(401, 402, 404, 409, 422, 429),
    },
)
async def start_conversation(
    body: StartConversation,
    principal: CurrentPrincipal,
    session: DbSession,
    request: Request,
    response: Response,
) -> ConversationOut:
    """Open (or find) the member's conversation; with `body`, text them now."""
    member = await get_member(session, principal.church_id, body.member_id)
    existing = await session.scalar(
        select(Conversation.id).where(
            Conversation.church_id == principal.church_id, Conversation.member_id == member.id
        )
    )
    if body.body:
        church = await session.get_one(Church, principal.church_id)
        _require_number(church)
        await service.queue_outbound(
            session,
            request.app.state.job_app,
            church,
            member,
            body.body,
            author_id=principal.user_id,
            settings=request.app.state.settings,
        )
    elif existing is None:
        await service.touch_conversation(
            session, principal.church_id, member.id, body="", direction="outbound", unread=0
        )
        await session.execute(
            text(
                "UPDATE conversations SET last_message_preview = NULL, "
                "last_message_direction = NULL WHERE church_id = :c AND member_id = :m"
            ),
            {"c": principal.church_id, "m": member.id},
        )
    if existing is not None:
        response.status_code = status.HTTP_200_OK
    conversation_id = existing or await session.scalar(
        select(Conversation.id).where(
            Conversation.church_id == principal.church_id, Conversation.member_id == member.id
        )
    )
    assert conversation_id is not None
    return await _one(session, principal.church_id, conversation_id, request)


@router.get("/{conversation_id}", responses=problem_responses(401, 404, 429))
async def get_conversation(
    conversation_id: uuid.UUID,
    principal: CurrentPrincipal,
    session: ReadSession,
    request: Request,
) -> ConversationOut:
    return await _one(session, principal.church_id, conversation_id, request)


@router.get("/{conversation_id}/messages", responses=problem_responses(401, 404, 422, 429))
async def list_conversation_messages(
    conversation_id: uuid.UUID, principal: CurrentPrincipal, session: ReadSession, page: Pages
) -> Page[ConversationMessageOut]:
    """Newest first. Bounded below by the conversation's start, so the plan prunes the
    monthly partitions before it."""
    conversation = await get_owned(
        session, Conversation, conversation_id, principal.church_id, what="conversation"
    )
    query = select(ConversationMessage).where(
        ConversationMessage.conversation_id == conversation.id,
        ConversationMessage.created_at >= conversation.created_at,
    )
    if page.cursor:
        at, last = cursor_key(page, datetime, int)
        query = query.where(
            (ConversationMessage.created_at < at)
            | ((ConversationMessage.created_at == at) & (ConversationMessage.id < last))
        )
    rows = (
        await session.scalars(
            query.order_by(
                ConversationMessage.created_at.desc(), ConversationMessage.id.desc()
            ).limit(page.limit + 1)
        )
    ).all()
    items = [
        ConversationMessageOut(
            id=str(m.id),
            direction="inbound" if m.direction == "inbound" else "outbound",
            body=m.body,
            status=m.status,
            kind=m.kind,
            error_code=m.error_code,
            created_at=m.created_at,
        )
        for m in rows
    ]
    return make_page(items, page.limit, lambda m: [m.created_at, int(m.id)])


class NoNumberError(ConflictError):
    code = "number_not_ready"
    title = "The church's sending number is not ready yet"


def _require_number(church: Church) -> None:
    if not church.phone_number or church.number_status != "assigned":
        raise NoNumberError("Your sending number is still being set up")


@router.post(
    "/{conversation_id}/messages",
    status_code=status.HTTP_202_ACCEPTED,
    responses=problem_responses(401, 402, 404, 409, 422, 429),
    summary="Reply (sent ahead of broadcasts); 409 member_opted_out if they texted STOP",
)
async def reply(
    conversation_id: uuid.UUID,
    body: ReplyIn,
    principal: CurrentPrincipal,
    session: DbSession,
    request: Request,
) -> ConversationMessageOut:
    conversation = await get_owned(
        session, Conversation, conversation_id, principal.church_id, what="conversation"
    )
    church = await session.get_one(Church, principal.church_id)
    _require_number(church)
    member = await get_member(session, principal.church_id, conversation.member_id)
    message = await service.queue_outbound(
        session,
        request.app.state.job_app,
        church,
        member,
        body.body,
        author_id=principal.user_id,
        settings=request.app.state.settings,
    )
    return ConversationMessageOut(
        id=str(message.id),
        direction="outbound",
        body=message.body,
        status=message.status,
        kind=message.kind,
        error_code=None,
        created_at=message.created_at,
    )


@router.patch("/{conversation_id}", responses=problem_responses(401, 404, 409, 422, 429))
async def update_conversation(
    conversation_id: uuid.UUID,
    body: ConversationPatch,
    principal: CurrentPrincipal,
    session: DbSession,
    request: Request,
) -> ConversationOut:
    conversation = await get_owned(
        session, Conversation, conversation_id, principal.church_id, what="conversation"
    )
    await session.refresh(conversation, with_for_update=True)
    if body.status is not None and body.status != conversation.status:
        if body.status not in TRANSITIONS[conversation.status]:
            raise ConflictError(f"A {conversation.status} conversation cannot become {body.status}")
        conversation.status = body.status
    if body.read:
        conversation.unread_count = 0
    await session.flush()
    invalidate_on_commit(session, inbox_tag(principal.church_id))
    return await _one(session, principal.church_id, conversation.id, request)
