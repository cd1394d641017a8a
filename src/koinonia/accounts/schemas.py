"""Request and response bodies of auth, staff and API keys."""

from __future__ import annotations

import re
import uuid
from datetime import time
from functools import cache
from typing import Annotated, Literal
from zoneinfo import available_timezones

import email_validator
import phonenumbers
from pydantic import (
    AfterValidator,
    BeforeValidator,
    EmailStr,
    Field,
    PlainSerializer,
    WithJsonSchema,
    model_validator,
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


def _known_region(value: str) -> str:
    if value not in phonenumbers.SUPPORTED_REGIONS:
        raise ValueError("not a region the phone library knows (ISO 3166-1 alpha-2, e.g. US)")
    return value


# The region national-format phones are read in: one `phonenumbers` knows ("ZZ" is not).
PhoneRegion = Annotated[str, Field(pattern=r"^[A-Z]{2}$"), AfterValidator(_known_region)]


_PLAIN_EMAIL = re.compile(r"[^@\s]+@[^@\s]+")


def _login_email(value: str) -> str:
    # Signing in only looks an account up: an address that has the shape of one is enough,
    # special-use domains included (the demo owner printed by `koinonia dev` is
    # demo@koinonia.local, which `email_validator` refuses in every mode). Registration and
    # staff creation keep the stricter `EmailStr`.
    value = value.strip()
    try:
        return email_validator.validate_email(value, check_deliverability=False).normalized
    except email_validator.EmailNotValidError as error:
        if _PLAIN_EMAIL.fullmatch(value):
            return value
        raise ValueError(f"value is not a valid email address: {error}") from None


LoginEmail = Annotated[
    str, Field(max_length=254, json_schema_extra={"format": "email"}), AfterValidator(_login_email)
]

Password = Field(min_length=10, max_length=200, description="At least 10 characters")
AssignableRole = Literal["admin", "staff"]


class RegisterRequest(RequestModel):
    church_name: str = Field(min_length=1, max_length=200, examples=["Grace Chapel"])
    name: str = Field(min_length=1, max_length=200, examples=["Ruth Miller"])
    email: EmailStr = Field(examples=["ruth@grace.example"])
    password: str = Password
    timezone: TimeZoneName = "America/New_York"
    default_region: PhoneRegion = Field(
        "US", description="Region used to read national phone numbers"
    )


class LoginRequest(RequestModel):
    email: LoginEmail
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
    mfa_enabled: bool = Field(description="Whether the user has confirmed TOTP MFA")
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
    require_mfa: bool = Field(
        description="Staff must use MFA to log in (users without it must enrol first)"
    )
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
    default_region: PhoneRegion | None = None
    help_text: str | None = Field(None, max_length=320)
    send_window_start: TimeOfDay | None = Field(
        None, description="Local time from which broadcasts may go out, HH:MM (24-hour)"
    )
    send_window_end: TimeOfDay | None = Field(
        None,
        description="Local time at which broadcasts stop, HH:MM (exclusive); earlier than "
        "the start wraps midnight (22:00-06:00), equal to it means always open",
    )
    require_mfa: bool | None = Field(
        None,
        description="Owner only, who must have MFA on: staff without MFA must enrol at their "
        "next login (their sessions end now); API keys are not affected",
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


# --- MFA (accounts/mfa.py) ---------------------------------------------------------------

Challenge = Field(min_length=20, max_length=2000, description="The `challenge` of the login answer")
MfaCode = Field(
    min_length=6,
    max_length=32,
    description="A 6-digit code from the authenticator app, or a recovery code",
    examples=["123456", "abcde-fgh23"],
)
TotpCode = Field(pattern=r"^[0-9]{6}$", description="A 6-digit code from the authenticator app")


class MfaChallengeOut(ResponseModel):
    """Login answer of a user with MFA on: no tokens until `POST /auth/mfa/verify`."""

    mfa_required: Literal[True] = True
    challenge: str
    expires_in: int = Field(description="Seconds the challenge stays usable")


class MfaEnrolmentRequiredOut(ResponseModel):
    """Login answer of a user without MFA in a church that requires it: the challenge only
    enrols (`POST /auth/mfa/enrol` and `/auth/mfa/confirm` with it), then gives tokens."""

    mfa_enrolment_required: Literal[True] = True
    challenge: str
    expires_in: int = Field(description="Seconds the challenge stays usable")


class MfaVerifyRequest(RequestModel):
    challenge: str = Challenge
    code: str = MfaCode


class MfaEnrolRequest(RequestModel):
    password: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="Your password (required with an access token)",
    )
    challenge: str | None = Field(
        None,
        min_length=20,
        max_length=2000,
        description="Instead of an access token: the `mfa_enrolment_required` login challenge",
    )


class MfaEnrolment(ResponseModel):
    secret: str = Field(description="Base32 TOTP secret, for typing into an app by hand")
    provisioning_uri: str = Field(
        description="`otpauth://` URI to show as a QR code",
        examples=["otpauth://totp/Koinonia:ruth%40grace.example?secret=JBSW…&issuer=Koinonia"],
    )


class MfaConfirmRequest(RequestModel):
    code: str = TotpCode
    challenge: str | None = Field(
        None,
        min_length=20,
        max_length=2000,
        description="Instead of an access token: the `mfa_enrolment_required` login challenge",
    )


class MfaRecoveryCodesOut(ResponseModel):
    recovery_codes: list[str] = Field(description="Single-use codes, shown only in this answer")
    tokens: TokenPair = Field(
        description="A fresh token pair: every other session of the user was ended"
    )


class MfaDisableRequest(RequestModel):
    code: str | None = Field(
        None, min_length=6, max_length=32, description="A TOTP or recovery code"
    )
    password: str | None = Field(None, min_length=1, max_length=200)

    @model_validator(mode="after")
    def _one_proof(self) -> MfaDisableRequest:
        if (self.code is None) == (self.password is None):
            raise ValueError("send either `code` or `password`")
        return self


class MfaDisabledOut(ResponseModel):
    mfa_enabled: Literal[False] = False
    tokens: TokenPair | None = Field(
        description="A fresh token pair (every session was ended); null when the church "
        "requires MFA: log in again and enrol"
    )


class MfaCodeRequest(RequestModel):
    code: str = MfaCode


class MfaStatusOut(ResponseModel):
    enabled: bool
    pending: bool = Field(description="Enrolled but not confirmed yet")
    recovery_codes_left: int
    church_requires_mfa: bool
