"""`/groups`: CRUD with member counts, and bulk membership changes."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Request, status
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.accounts.deps import CurrentPrincipal
from koinonia.errors import problem_responses
from koinonia.groups import service
from koinonia.groups.schemas import GroupCreate, GroupOut, GroupUpdate, MemberIds, MembershipChange
from koinonia.groups.tables import Group
from koinonia.http.deps import (
    AppCache,
    AppDatabase,
    DbSession,
    get_database,
    invalidate_on_commit,
)
from koinonia.http.pagination import Page, PageParams, cursor_key, make_page, page_params
from koinonia.http.routing import FeatureRouter
from koinonia.replicas import ReadSession
from koinonia.retry import in_transaction
from koinonia.tenancy import get_owned

router = FeatureRouter(prefix="/api/v1/groups", tags=["groups"])
Pages = Annotated[PageParams, Depends(page_params)]
ERRORS = problem_responses(401, 404, 422, 429)


def _out(group: Group, count: int) -> GroupOut:
    return GroupOut(
        id=group.id,
        name=group.name,
        description=group.description,
        member_count=count,
        created_at=group.created_at,
        updated_at=group.updated_at,
    )


@router.get("", responses=ERRORS)
async def list_groups(
    principal: CurrentPrincipal,
    session: ReadSession,
    database: AppDatabase,
    cache: AppCache,
    page: Pages,
) -> Page[GroupOut]:
    # The counts first: a miss loads them in a session of its own, before this request's
    # session holds a connection (one connection at a time per request).
    counts = await service.member_counts(database, cache, principal.church_id)
    query = select(Group).where(Group.church_id == principal.church_id)
    if page.cursor:
        query = query.where(Group.id > cursor_key(page, uuid.UUID)[0])
    rows = (await session.scalars(query.order_by(Group.id).limit(page.limit + 1))).all()
    return make_page(
        [_out(g, counts.get(str(g.id), 0)) for g in rows], page.limit, lambda g: [g.id]
    )


@router.post(
    "", status_code=status.HTTP_201_CREATED, responses=problem_responses(401, 409, 422, 429)
)
async def create_group(
    body: GroupCreate, principal: CurrentPrincipal, session: DbSession
) -> GroupOut:
    """Create a group; names are unique per church (case-insensitive) → `409`."""
    group = Group(church_id=principal.church_id, name=body.name, description=body.description)
    session.add(group)
    await session.flush()
    await session.refresh(group)
    return _out(group, 0)


@router.get("/{group_id}", responses=ERRORS)
async def get_group(
    group_id: uuid.UUID, principal: CurrentPrincipal, session: ReadSession
) -> GroupOut:
    group = await get_owned(session, Group, group_id, principal.church_id, what="group")
    return _out(group, await service.count_members(session, group.id))


@router.patch("/{group_id}", responses=problem_responses(401, 404, 409, 422, 429))
async def update_group(
    group_id: uuid.UUID, body: GroupUpdate, principal: CurrentPrincipal, session: DbSession
) -> GroupOut:
    group = await get_owned(session, Group, group_id, principal.church_id, what="group")
    if body.name is not None:
        group.name = body.name
    if body.description is not None:
        group.description = body.description
    group.updated_at = datetime.now(UTC)
    await session.flush()
    return _out(group, await service.count_members(session, group.id))


@router.delete("/{group_id}", status_code=status.HTTP_204_NO_CONTENT, responses=ERRORS)
async def delete_group(
    group_id: uuid.UUID, principal: CurrentPrincipal, session: DbSession
) -> None:
    """Delete the group (its members stay in the church)."""
    await session.delete(
        await get_owned(session, Group, group_id, principal.church_id, what="group")
    )
    invalidate_on_commit(session, service.counts_tag(principal.church_id))


async def _change(
    request: Request,
    principal: CurrentPrincipal,
    group_id: uuid.UUID,
    body: MemberIds,
    *,
    add: bool,
) -> MembershipChange:
    ids = list(dict.fromkeys(body.member_ids))

    async def work(session: AsyncSession) -> MembershipChange:
        await get_owned(session, Group, group_id, principal.church_id, what="group")
        change = service.add_members if add else service.remove_members
        changed = await change(session, principal.church_id, group_id, ids)
        return MembershipChange(
            group_id=group_id,
            requested=len(ids),
            changed=changed,
            member_count=await service.count_members(session, group_id),
        )

    # REPEATABLE READ: the validation, the write and the count see one snapshot; a
    # concurrent change to the same rows makes it retry instead of mixing two states.
    # The counts' tag is invalidated by in_transaction once this commits (service).
    outcome = await in_transaction(
        get_database(request), "REPEATABLE READ", work, operation="group_membership"
    )
    await request.app.state.replicas.note_write(principal.church_id)
    return outcome.value


@router.post("/{group_id}/members", responses=ERRORS)
async def add_group_members(
    group_id: uuid.UUID, body: MemberIds, request: Request, principal: CurrentPrincipal
) -> MembershipChange:
    """Add members by id, all or nothing (an unknown id → `422`, nothing added); repeatable."""
    return await _change(request, principal, group_id, body, add=True)


@router.delete("/{group_id}/members", responses=ERRORS)
async def remove_group_members(
    group_id: uuid.UUID, body: MemberIds, request: Request, principal: CurrentPrincipal
) -> MembershipChange:
    """Remove members by id; ids not in the group are ignored (repeatable)."""
    return await _change(request, principal, group_id, body, add=False)
