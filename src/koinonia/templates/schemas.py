"""Bodies of the templates endpoints."""

from __future__ import annotations

import uuid

from pydantic import Field, field_validator

from koinonia.http.schemas import RequestModel, ResponseModel, Timestamp
from koinonia.templates.rendering import MERGE_FIELDS, problems

BODY_EXAMPLE = "Hi {{first_name}}, see you Sunday at {{church_name}}!"


def _check_body(value: str) -> str:
    found = problems(value)
    if found:
        raise ValueError("; ".join(p.message for p in found))
    return value


class TemplateCreate(RequestModel):
    name: str = Field(min_length=1, max_length=100, examples=["Sunday reminder"])
    body: str = Field(
        min_length=1,
        max_length=1600,
        examples=[BODY_EXAMPLE],
        description=f"Merge fields: {', '.join('{{' + f + '}}' for f in MERGE_FIELDS)}",
    )

    _body = field_validator("body")(_check_body)


class TemplateUpdate(RequestModel):
    name: str | None = Field(None, min_length=1, max_length=100)
    body: str | None = Field(None, min_length=1, max_length=1600)

    @field_validator("body")
    @classmethod
    def _valid_body(cls, value: str | None) -> str | None:
        return None if value is None else _check_body(value)


class TemplateOut(ResponseModel):
    id: uuid.UUID
    name: str
    body: str
    merge_fields: list[str]
    created_at: Timestamp
    updated_at: Timestamp


class RenderRequest(RequestModel):
    first_name: str = Field("", max_length=100)
    last_name: str = Field("", max_length=100)


class RenderOut(ResponseModel):
    text: str
