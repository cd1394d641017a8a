"""Request and response bodies of auth, staff and API keys."""

from __future__ import annotations

import re
import uuid
from datetime import time
from functools import cache
from typing import Annotated, Literal
from zoneinfo import available_timezones

from pydantic import (
    AfterValidator,
    BeforeValidator,
    EmailStr,
    Field,
    PlainSerializer,
    WithJsonSchema,
)

from koinonia.http.schemas import RequestModel, ResponseModel, Timestamp


@cache
def _iana_zones() -> frozenset[str]:
    # What zoneinfo can load, less the files that are not zones of the IANA database
    # (`ZoneInfo` itself also loads "localtime", "posixrules", "right/UTC", ...).
    return frozenset(available_timezones()) - {"Factory", "localtime", "posixrules"}


def _known_timezone(value: str) -> str:
    if value not in _iana_zones():
        raise ValueError("not a known IANA time zone, e.g. America/Chicago")
    return value


TimeZoneName = Annotated[str, Field(max_length=64), AfterValidator(_known_timezone)]

_HH_MM = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")
_HH_MM_SCHEMA = WithJsonSchema(
    {"type": "string", "pattern": f"^{_HH_MM.pattern}$", "examples": ["08:00"]}
)


def _time_of_day(value: object) -> time:
    match = _HH_MM.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ValueError("must be a time of day as HH:MM on the 24-hour clock, e.g. 08:00")
    return time(int(match[1]), int(match[2]))


def _hh_mm(value: time) -> str:
    return value.strftime("%H:%M")


# A local time of day given as "HH:MM" (request) and shown as "HH:MM" (answer).
TimeOfDay = Annotated[time, BeforeValidator(_time_of_day), _HH_MM_SCHEMA]
TimeOfDayOut = Annotated[time, PlainSerializer(_hh_mm, return_type=str), _HH_MM_SCHEMA]

Password = Field(min_length=10, max_length=200, description="At least 10 characters")
AssignableRole = Literal["admin", "staff"]


class RegisterRequest(RequestModel):
    church_name: str = Field(min_length=1, max_length=200, examples=["Grace Chapel"])
    name: str = Field(min_length=1, max_length=200, examples=["Ruth Miller"])
    email: EmailStr = Field(examples=["ruth@grace.example"])
    password: str = Password
    timezone: TimeZoneName = "America/New_York"
    default_region: str = Field(
        "US", pattern=r"^[A-Z]{2}$", description="Region used to read national phone numbers"
    )


class LoginRequest(RequestModel):
    email: EmailStr
    password: str = Field(min_length=1, max_length=200)


class RefreshRequest(RequestModel):
    refresh_token: str = Field(min_length=10, max_length=200)


class TokenPair(ResponseModel):
    access_token: str
    refresh_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - not a secret
    expires_in: int


class UserOut(ResponseModel):
    id: uuid.UUID
    email: str
    name: str
    role: str
    is_active: bool
    last_login_at: Timestamp | None
    created_at: Timestamp


class ChurchOut(ResponseModel):
    id: uuid.UUID
    name: str
    phone_number: str | None
    number_status: str
    timezone: str
    send_window_start: TimeOfDayOut = Field(
        description="Local time (in `timezone`) from which broadcasts may go out"
    )
    send_window_end: TimeOfDayOut = Field(
        description="Local time at which broadcasts stop (exclusive); wraps midnight when "
        "earlier than the start, always open when equal to it"
    )
    default_region: str
    plan: str
    subscription_status: str
    help_text: str | None
    created_at: Timestamp


class ApiKeyIdentity(ResponseModel):
    id: uuid.UUID
    role: str


class MeOut(ResponseModel):
    user: UserOut | None
    api_key: ApiKeyIdentity | None = None
    church: ChurchOut


class RegisterOut(TokenPair):
    user: UserOut
    church: ChurchOut


class ChurchUpdate(RequestModel):
    name: str | None = Field(None, min_length=1, max_length=200)
    timezone: TimeZoneName | None = None
    default_region: str | None = Field(None, pattern=r"^[A-Z]{2}$")
    help_text: str | None = Field(None, max_length=320)
    send_window_start: TimeOfDay | None = Field(
        None, description="Local time from which broadcasts may go out, HH:MM (24-hour)"
    )
    send_window_end: TimeOfDay | None = Field(
        None,
        description="Local time at which broadcasts stop, HH:MM (exclusive); earlier than "
        "the start wraps midnight (22:00-06:00), equal to it means always open",
    )


class UserCreate(RequestModel):
    email: EmailStr
    name: str = Field(min_length=1, max_length=200)
    role: AssignableRole = "staff"
    password: str = Password


class UserUpdate(RequestModel):
    name: str | None = Field(None, min_length=1, max_length=200)
    role: AssignableRole | None = None
    is_active: bool | None = None
    password: str | None = Field(None, min_length=10, max_length=200)


class ApiKeyCreate(RequestModel):
    name: str = Field(min_length=1, max_length=100, examples=["Website sign-up form"])
    role: AssignableRole = "admin"


class ApiKeyOut(ResponseModel):
    id: uuid.UUID
    name: str
    prefix: str
    role: str
    last_used_at: Timestamp | None
    revoked_at: Timestamp | None
    created_at: Timestamp


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="The key itself; shown only in this answer")
