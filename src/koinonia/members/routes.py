"""`/members`: CRUD, search and filters, and CSV imports."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Annotated, Literal

from fastapi import Depends, File, Form, Query, Request, Response, UploadFile, status
from sqlalchemy import select

from koinonia.accounts.deps import CurrentPrincipal, Manager, Owner
from koinonia.errors import FieldError, ValidationError, problem_responses
from koinonia.groups.tables import Group
from koinonia.http.deps import AppSettings, DbSession
from koinonia.http.pagination import (
    Page,
    PageParams,
    cursor_key,
    make_page,
    page_params,
)
from koinonia.http.routing import FeatureRouter
from koinonia.jobs import defer_in_transaction
from koinonia.members import rights, service
from koinonia.members.crypto import ContactCipher
from koinonia.members.imports import import_inline
from koinonia.members.schemas import (
    ConsentEventOut,
    ErasureOut,
    ImportOut,
    MemberCreate,
    MemberExport,
    MemberOut,
    MemberUpdate,
)
from koinonia.members.tables import Member, MemberImport, MemberImportFile
from koinonia.replicas import ReadSession
from koinonia.tenancy import get_owned
from koinonia.text import unsafe_character

router = FeatureRouter(prefix="/api/v1/members", tags=["members"])
routers = [router]
Pages = Annotated[PageParams, Depends(page_params)]
ERRORS = problem_responses(401, 404, 422, 429)


async def get_cipher(request: Request) -> ContactCipher:
    cipher: ContactCipher | None = getattr(request.app.state, "contact_cipher", None)
    if cipher is None:
        cipher = ContactCipher.from_settings(request.app.state.settings)
        request.app.state.contact_cipher = cipher
    return cipher


Cipher = Annotated[ContactCipher, Depends(get_cipher)]


@router.get("", responses=ERRORS)
async def list_members(
    principal: CurrentPrincipal,
    session: ReadSession,
    cipher: Cipher,
    page: Pages,
    q: Annotated[
        str | None,
        Query(min_length=1, max_length=100, description="Name fragment, exact phone or email"),
    ] = None,
    group_id: uuid.UUID | None = None,
    opted_out: bool | None = None,
) -> Page[MemberOut]:
    """Newest first. `q` matches a name fragment, or exactly a phone number or email."""
    church_id = principal.church_id
    query = service.live(select(Member), church_id)
    if q:
        region = await service.church_region(session, church_id)
        query = query.where(service.search_filter(cipher, church_id, region, q))
    if group_id is not None:
        await get_owned(session, Group, group_id, church_id, what="group")
        query = query.where(service.in_group(group_id))
    if opted_out is not None:
        query = query.where(Member.opted_out.is_(opted_out))
    if page.cursor:
        created, last_id = cursor_key(page, datetime, uuid.UUID)
        query = query.where(
            (Member.created_at < created) | ((Member.created_at == created) & (Member.id < last_id))
        )
    query = query.order_by(Member.created_at.desc(), Member.id.desc()).limit(page.limit + 1)
    rows = (await session.scalars(query)).all()
    return make_page(
        [service.to_out(m, cipher) for m in rows],
        page.limit,
        lambda m: [m.created_at.isoformat(), str(m.id)],
    )


@router.post(
    "", status_code=status.HTTP_201_CREATED, responses=problem_responses(401, 409, 422, 429)
)
async def create_member(
    body: MemberCreate, principal: CurrentPrincipal, session: DbSession, cipher: Cipher
) -> MemberOut:
    """Add a member. A phone already in the church answers `409`."""
    member = await service.create_member(
        session, cipher, principal.church_id, body, principal.actor_id
    )
    return service.to_out(member, cipher)


@router.get("/imports/{import_id}", responses=ERRORS)
async def get_import(
    import_id: uuid.UUID, principal: CurrentPrincipal, session: DbSession
) -> ImportOut:
    """Progress of an import, and its row errors."""
    record = await get_owned(session, MemberImport, import_id, principal.church_id, what="import")
    return ImportOut.model_validate(record)


@router.post(
    "/import",
    status_code=status.HTTP_201_CREATED,
    responses={
        202: {"model": ImportOut, "description": "A big file: imported by a job; poll its URL"},
        **problem_responses(401, 404, 413, 422, 429),
    },
)
async def import_members(
    request: Request,
    response: Response,
    principal: CurrentPrincipal,
    session: DbSession,
    settings: AppSettings,
    cipher: Cipher,
    file: Annotated[UploadFile, File(description="CSV with a header row; UTF-8")],
    on_duplicate: Annotated[Literal["update", "skip"], Form()] = "update",
    group_id: Annotated[uuid.UUID | None, Form()] = None,
    column_map: Annotated[
        str | None,
        Form(
            max_length=2000,
            description='JSON: our field → your header, e.g. {"phone": "Cell"}',
        ),
    ] = None,
) -> ImportOut:
    """Import members from CSV (limit: `MAX_IMPORT_BYTES`, 20 MB by default).

    Columns are found by header (`first_name`, `last_name`, `phone`, `email`, `name`, and
    common variants) or by `column_map`. Rows with errors are reported and skipped; the
    others are imported. Phones already in the church are updated or skipped
    (`on_duplicate`). Small files answer `201` with the result; bigger ones answer `202`
    and run as a job: poll `GET /members/imports/{id}`.
    """
    church_id = principal.church_id
    mapping = _column_map(column_map)
    if group_id is not None:
        await get_owned(session, Group, group_id, church_id, what="group")
    record = MemberImport(
        church_id=church_id,
        created_by=principal.user_id,
        filename=(file.filename or "")[:255],
        size_bytes=file.size or 0,
        on_duplicate=on_duplicate,
        group_id=group_id,
        column_map=mapping,
    )
    session.add(record)
    await session.flush()
    if (file.size or 0) <= settings.import_inline_max_bytes:
        region = await service.church_region(session, church_id)
        await import_inline(session, record, file.file, region, cipher)
    else:
        session.add(MemberImportFile(import_id=record.id, content=await file.read()))
        await session.flush()
        await defer_in_transaction(
            request.app.state.job_app,
            session,
            "members:import_members",
            import_id=str(record.id),
            church_id=str(church_id),
        )
        response.status_code = status.HTTP_202_ACCEPTED
    response.headers["Location"] = f"/api/v1/members/imports/{record.id}"
    await session.flush()
    await session.refresh(record)
    return ImportOut.model_validate(record)


def _column_map(raw: str | None) -> dict[str, str]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValidationError(
            "column_map is not valid",
            errors=[FieldError("column_map", 'a JSON object such as {"phone": "Cell"}')],
        )
    for text_value in (*value.keys(), *value.values()):
        if reason := unsafe_character(text_value):
            raise ValidationError(
                "column_map is not valid", errors=[FieldError("column_map", reason)]
            )
    return value


@router.get("/{member_id}", responses=ERRORS)
async def get_member(
    member_id: uuid.UUID, principal: CurrentPrincipal, session: ReadSession, cipher: Cipher
) -> MemberOut:
    return service.to_out(await service.get_member(session, principal.church_id, member_id), cipher)


@router.patch("/{member_id}", responses=problem_responses(401, 404, 409, 422, 429))
async def update_member(
    member_id: uuid.UUID,
    body: MemberUpdate,
    principal: CurrentPrincipal,
    session: DbSession,
    cipher: Cipher,
) -> MemberOut:
    member = await service.update_member(
        session, cipher, principal.church_id, member_id, body, principal.actor_id
    )
    return service.to_out(member, cipher)


@router.delete("/{member_id}", status_code=status.HTTP_204_NO_CONTENT, responses=ERRORS)
async def delete_member(
    member_id: uuid.UUID, principal: CurrentPrincipal, session: DbSession
) -> None:
    """Soft delete: the member disappears from lists, groups and audiences."""
    await service.delete_member(session, principal.church_id, member_id)


@router.get("/{member_id}/consent", responses=ERRORS)
async def member_consent(
    member_id: uuid.UUID, principal: CurrentPrincipal, session: DbSession
) -> list[ConsentEventOut]:
    """The member's consent history, newest first: every opt-out and opt-in with its time
    and source (deleted members too; an erased one is `404`)."""
    return await rights.member_consent(session, principal.church_id, member_id)


@router.get("/{member_id}/export", responses=problem_responses(401, 403, 404, 422, 429))
async def export_member(
    member_id: uuid.UUID, principal: Manager, session: DbSession, cipher: Cipher
) -> MemberExport:
    """Everything held on the member, as one JSON document (owner or admin; audited):
    profile with phone and email, groups, consent history, every broadcast addressed to
    them (rendered for them) and their conversation. Soft-deleted members can be exported;
    an erased one is `404`."""
    return await rights.export_member(session, cipher, principal, member_id)


@router.post("/{member_id}/erase", responses=problem_responses(401, 403, 404, 422, 429))
async def erase_member(
    member_id: uuid.UUID,
    principal: Owner,
    session: DbSession,
    cipher: Cipher,
    settings: AppSettings,
) -> ErasureOut:
    """Erase the member's personal data everywhere (owner only; audited; cannot be
    undone): names, phone, email, conversation texts, Telnyx events naming them, group
    memberships. Counts on broadcasts and billing stay. A member who had opted out stays
    suppressed: a keyed hash of the phone is kept with the opt-out time, so adding or
    importing that phone again brings it back opted out. See docs/members.md."""
    return await rights.erase_member(session, cipher, settings, principal, member_id)
