"""Cursor pagination: `?limit=&cursor=` in, `{"data": [...], "next_cursor": ...}` out.

A cursor is the opaque, URL-safe encoding of the last row's sort key, so pages stay
stable while rows are inserted and no `OFFSET` scan is ever needed.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel

from koinonia.errors import FieldError, ValidationError

T = TypeVar("T")

DEFAULT_LIMIT = 50
MAX_LIMIT = 200


class Page(BaseModel, Generic[T]):
    data: list[T]
    next_cursor: str | None


class PageParams(BaseModel):
    limit: int
    cursor: list[Any] | None


def encode_cursor(key: list[Any]) -> str:
    raw = json.dumps(key, separators=(",", ":"), default=str).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


class InvalidCursorError(ValidationError):
    code = "invalid_cursor"
    title = "The cursor is not valid"


def _bad_cursor() -> InvalidCursorError:
    return InvalidCursorError(
        "The cursor is not valid", errors=[FieldError("cursor", "not a cursor from this API")]
    )


def decode_cursor(cursor: str) -> list[Any]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        value = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        value = None
    if not isinstance(value, list) or not value:
        raise _bad_cursor()
    return value


_BIGINT = 2**63


def _element(value: Any, kind: type) -> Any:
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int) or not -_BIGINT <= value < _BIGINT:
            raise ValueError
        return value
    if not isinstance(value, str):
        raise ValueError
    if kind is uuid.UUID:
        return uuid.UUID(value)
    if kind is datetime:
        at = datetime.fromisoformat(value)
        return at if at.tzinfo else at.replace(tzinfo=UTC)
    raise TypeError(f"no cursor element of type {kind!r}")


def cursor_key(page: PageParams, *kinds: type) -> tuple[Any, ...]:
    """The cursor as exactly `len(kinds)` elements of those types (`int` is a bigint, never
    a boolean): a tampered cursor (wrong arity, wrong types, out of range) is a 422
    `invalid_cursor`, never a 500."""
    values = page.cursor or []
    if len(values) != len(kinds):
        raise _bad_cursor()
    try:
        return tuple(_element(v, k) for v, k in zip(values, kinds, strict=True))
    except ValueError:
        raise _bad_cursor() from None


def cursor_uuid(page: PageParams, index: int = 0) -> uuid.UUID:
    """Element `index` of the cursor as a UUID (a tampered cursor is a 422, not a 500)."""
    try:
        value: uuid.UUID = _element((page.cursor or [])[index], uuid.UUID)
    except (ValueError, IndexError):
        raise _bad_cursor() from None
    return value


def cursor_datetime(page: PageParams, index: int = 0) -> datetime:
    try:
        value: datetime = _element((page.cursor or [])[index], datetime)
    except (ValueError, IndexError):
        raise _bad_cursor() from None
    return value


async def page_params(
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Page size")] = DEFAULT_LIMIT,
    cursor: Annotated[str | None, Query(max_length=512, description="Opaque cursor")] = None,
) -> PageParams:
    return PageParams(limit=limit, cursor=decode_cursor(cursor) if cursor else None)


def make_page(rows: list[T], limit: int, key_of: Any) -> Page[T]:
    """`rows` were fetched with `limit + 1`: the extra row only says there is a next page."""
    has_more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor(key_of(rows[-1])) if has_more and rows else None
    return Page[T](data=rows, next_cursor=next_cursor)
