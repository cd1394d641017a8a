"""Bodies of the groups endpoints."""

from __future__ import annotations

import uuid

from pydantic import Field

from koinonia.http.schemas import RequestModel, ResponseModel, Timestamp


class GroupCreate(RequestModel):
    name: str = Field(min_length=1, max_length=100, examples=["Youth"])
    description: str = Field("", max_length=500)


class GroupUpdate(RequestModel):
    name: str | None = Field(None, min_length=1, max_length=100)
    description: str | None = Field(None, max_length=500)


class GroupOut(ResponseModel):
    id: uuid.UUID
    name: str
    description: str
    member_count: int
    created_at: Timestamp
    updated_at: Timestamp


class MemberIds(RequestModel):
    member_ids: list[uuid.UUID] = Field(min_length=1, max_length=10_000)


class MembershipChange(ResponseModel):
    group_id: uuid.UUID
    requested: int
    changed: int = Field(description="Rows added or removed; 0 when repeated (idempotent)")
    member_count: int
