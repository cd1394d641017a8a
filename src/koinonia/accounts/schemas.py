"""Request and response bodies of auth, staff and API keys."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, EmailStr, Field

from koinonia.http.schemas import RequestModel, ResponseModel, Timestamp


def _known_timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError("not a known IANA time zone, e.g. America/Chicago") from None
    return value


TimeZoneName = Annotated[str, Field(max_length=64), AfterValidator(_known_timezone)]
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
