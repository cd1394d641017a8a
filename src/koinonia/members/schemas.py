"""Bodies of the members endpoints."""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import EmailStr, Field

from koinonia.http.schemas import RequestModel, ResponseModel, Timestamp

PhoneInput = Field(
    min_length=1,
    max_length=32,
    examples=["(415) 555-0132", "+14155550132"],
    description="Any common format; read with the church's default region, stored as E.164",
)


class MemberCreate(RequestModel):
    first_name: str = Field("", max_length=100, examples=["Ada"])
    last_name: str = Field("", max_length=100, examples=["Lovelace"])
    phone: str = PhoneInput
    email: EmailStr | None = None
    opted_out: bool = False
    group_ids: list[uuid.UUID] = Field(default_factory=list, max_length=100)


class MemberUpdate(RequestModel):
    first_name: str | None = Field(None, max_length=100)
    last_name: str | None = Field(None, max_length=100)
    phone: str | None = Field(None, min_length=1, max_length=32)
    email: EmailStr | None = None
    opted_out: bool | None = None


class MemberOut(ResponseModel):
    id: uuid.UUID
    first_name: str
    last_name: str
    phone: str = Field(description="E.164")
    email: str | None
    opted_out: bool
    opted_out_at: Timestamp | None
    opted_out_source: str | None
    is_unknown: bool
    created_at: Timestamp
    updated_at: Timestamp


class ImportRowError(ResponseModel):
    row: int
    field: str
    message: str


class ImportOut(ResponseModel):
    id: uuid.UUID
    status: Literal["pending", "running", "completed", "failed"]
    filename: str
    on_duplicate: str
    group_id: uuid.UUID | None
    processed: int
    created: int
    updated: int
    skipped: int
    error_count: int = Field(description="All row errors; `errors` lists the first 1,000")
    errors: list[ImportRowError]
    failure: str | None = Field(description="Why the whole file failed, if it did")
    created_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None
