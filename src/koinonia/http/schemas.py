"""Base request/response models and the problem-details schema for OpenAPI."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, PlainSerializer

# Strings are trimmed, unknown fields rejected, and no string is unbounded.
STRICT_CONFIG = ConfigDict(extra="forbid", str_strip_whitespace=True, str_max_length=10_000)


class RequestModel(BaseModel):
    model_config = STRICT_CONFIG


class ResponseModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)


def _rfc3339(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


Timestamp = Annotated[datetime, PlainSerializer(_rfc3339, return_type=str, when_used="json")]


class ProblemFieldError(BaseModel):
    field: str
    message: str


class Problem(BaseModel):
    """RFC 9457 problem details, the body of every error answer."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    request_id: str | None
    errors: list[ProblemFieldError] | None = None
