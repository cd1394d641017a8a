"""`/templates`: CRUD and a rendering preview."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, status
from sqlalchemy import select

from koinonia.accounts.deps import CurrentPrincipal
from koinonia.accounts.tables import Church
from koinonia.errors import problem_responses
from koinonia.http.deps import DbSession
from koinonia.http.pagination import Page, PageParams, cursor_key, make_page, page_params
from koinonia.http.routing import FeatureRouter
from koinonia.templates.rendering import fields_used, render
from koinonia.templates.schemas import (
    RenderOut,
    RenderRequest,
    TemplateCreate,
    TemplateOut,
    TemplateUpdate,
)
from koinonia.templates.tables import Template
from koinonia.tenancy import get_owned

router = FeatureRouter(prefix="/api/v1/templates", tags=["templates"])
Pages = Annotated[PageParams, Depends(page_params)]
ERRORS = problem_responses(401, 404, 422, 429)


def _out(template: Template) -> TemplateOut:
    return TemplateOut(
        id=template.id,
        name=template.name,
        body=template.body,
        merge_fields=sorted(fields_used(template.body)),
        created_at=template.created_at,
        updated_at=template.updated_at,
    )


@router.get("", responses=ERRORS)
async def list_templates(
    principal: CurrentPrincipal, session: DbSession, page: Pages
) -> Page[TemplateOut]:
    query = select(Template).where(Template.church_id == principal.church_id)
    if page.cursor:
        query = query.where(Template.id > cursor_key(page, uuid.UUID)[0])
    rows = (await session.scalars(query.order_by(Template.id).limit(page.limit + 1))).all()
    return make_page([_out(t) for t in rows], page.limit, lambda t: [t.id])


@router.post(
    "", status_code=status.HTTP_201_CREATED, responses=problem_responses(401, 409, 422, 429)
)
async def create_template(
    body: TemplateCreate, principal: CurrentPrincipal, session: DbSession
) -> TemplateOut:
    template = Template(church_id=principal.church_id, name=body.name, body=body.body)
    session.add(template)
    await session.flush()
    await session.refresh(template)
    return _out(template)


@router.get("/{template_id}", responses=ERRORS)
async def get_template(
    template_id: uuid.UUID, principal: CurrentPrincipal, session: DbSession
) -> TemplateOut:
    return _out(await get_owned(session, Template, template_id, principal.church_id))


@router.patch("/{template_id}", responses=problem_responses(401, 404, 409, 422, 429))
async def update_template(
    template_id: uuid.UUID, body: TemplateUpdate, principal: CurrentPrincipal, session: DbSession
) -> TemplateOut:
    template = await get_owned(session, Template, template_id, principal.church_id)
    if body.name is not None:
        template.name = body.name
    if body.body is not None:
        template.body = body.body
    template.updated_at = datetime.now(UTC)
    await session.flush()
    return _out(template)


@router.delete("/{template_id}", status_code=status.HTTP_204_NO_CONTENT, responses=ERRORS)
async def delete_template(
    template_id: uuid.UUID, principal: CurrentPrincipal, session: DbSession
) -> None:
    await session.delete(await get_owned(session, Template, template_id, principal.church_id))


@router.post("/{template_id}/render", responses=ERRORS)
async def render_template(
    template_id: uuid.UUID, body: RenderRequest, principal: CurrentPrincipal, session: DbSession
) -> RenderOut:
    """Render the template for sample values (what a member with these names receives)."""
    template = await get_owned(session, Template, template_id, principal.church_id)
    church = await session.get(Church, principal.church_id)
    values = {
        "first_name": body.first_name,
        "last_name": body.last_name,
        "church_name": church.name if church else "",
    }
    return RenderOut(text=render(template.body, values))
