"""Staff MFA: TOTP (RFC 6238, through `pyotp`), recovery codes and login challenges.

- The TOTP secret (160 random bits) is AES-256-GCM encrypted with the member key ring
  (`members/crypto.py`, the user id as authenticated data, so a secret copied to another
  user's row does not decrypt). It is re-encrypted under the active key on its next use.
  A secret without `mfa_enabled_at` is an enrolment not yet confirmed: it does nothing.
- Codes are 6 digits, 30-second steps, accepted one step either side (clock drift); the
  step of the last accepted code is stored and a code of that step or an earlier one is
  refused, so each code works once (the user row is locked while checking).
- Recovery codes: 10, shown once, ~50 random bits each, stored as HMAC-SHA256 keyed by a
  key derived from `MEMBER_HMAC_KEY` (a pepper: a database dump alone cannot test
  guesses) over the user id and the code; each is used once (one conditional UPDATE).
- Login challenges are short-lived JWTs (`JWT_SECRET`) of their own type, so they are never
  accepted as access tokens: `mfa_verify` (the password was right, the second factor is
  due; 5 minutes) and `mfa_enrol` (the church requires MFA and the user has none: usable
  only to enrol and confirm; 10 minutes). Both carry the user's `auth_version`, so any
  revocation (password change, deactivation, MFA change) voids them.

Every time here comes from `clock` (tests replace it).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import jwt
import pyotp
from pyotp.exceptions import OTPVerificationError
from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.accounts import revocation, sessions
from koinonia.accounts.principal import Principal
from koinonia.accounts.tables import Church, MfaRecoveryCode, User
from koinonia.accounts.tokens import ALGORITHM, ISSUER
from koinonia.audit import service as audit
from koinonia.errors import AuthenticationError, AuthorizationError, ConflictError
from koinonia.members.crypto import ContactCipher
from koinonia.ratelimit import RateLimiter
from koinonia.settings import Settings

TOTP_ISSUER = "Koinonia"
STEP_SECONDS = 30
VALID_WINDOW = 1  # steps either side of now
CHALLENGE_TTL_SECONDS = 300
ENROL_CHALLENGE_TTL_SECONDS = 600
RECOVERY_CODE_COUNT = 10
RECOVERY_CODE_LENGTH = 10
# No 0/o, 1/l: codes are read off paper. 32 symbols, so 10 of them are 50 bits.
_RECOVERY_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"
# Wrong second factors per user, from any address, before MFA checks lock for
# `LOGIN_LOCKOUT_SECONDS` (beside the per email-and-IP lockout of logins they also count in).
USER_LOCKOUT_FAILURES = 10

_TOTP_CODE = re.compile(r"[0-9]{6}")
_RECOVERY_CODE = re.compile(f"[{_RECOVERY_ALPHABET}]{{{RECOVERY_CODE_LENGTH}}}")

Purpose = Literal["verify", "enrol"]
Method = Literal["totp", "recovery_code", "password"]

clock: Callable[[], float] = time.time


@dataclass(frozen=True, slots=True)
class Challenge:
    user_id: uuid.UUID
    church_id: uuid.UUID
    purpose: Purpose
    auth_version: int


# --- challenges --------------------------------------------------------------------------


def challenge_ttl(purpose: Purpose) -> int:
    return CHALLENGE_TTL_SECONDS if purpose == "verify" else ENROL_CHALLENGE_TTL_SECONDS


def issue_challenge(settings: Settings, user: User, purpose: Purpose) -> str:
    now = int(clock())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": str(user.id),
        "church": str(user.church_id),
        "iat": now,
        "exp": now + challenge_ttl(purpose),
        "jti": uuid.uuid4().hex,
        "typ": f"mfa_{purpose}",
        "ver": user.auth_version,
    }
    return jwt.encode(claims, settings.jwt_secret.get_secret_value(), algorithm=ALGORITHM)


def decode_challenge(settings: Settings, token: str, purpose: Purpose) -> Challenge:
    """The challenge's claims; `AuthenticationError` when forged, expired or of another use."""
    try:
        claims = jwt.decode(
            token,
            settings.jwt_secret.get_secret_value(),
            algorithms=[ALGORITHM],
            issuer=ISSUER,
            # Expiry is checked against `clock` below (testable without sleeping).
            options={
                "require": ["exp", "iat", "sub", "church", "typ"],
                "verify_exp": False,
                "verify_iat": False,
            },
        )
    except jwt.PyJWTError:
        raise AuthenticationError("The MFA challenge is not valid; log in again") from None
    if claims.get("typ") != f"mfa_{purpose}":
        raise AuthenticationError("The MFA challenge is not valid; log in again")
    expires = claims.get("exp")
    if type(expires) is not int or expires <= clock():
        raise AuthenticationError("The MFA challenge has expired; log in again")
    version = claims.get("ver")
    try:
        if type(version) is not int or version < 0:
            raise ValueError("ver")
        return Challenge(
            user_id=uuid.UUID(str(claims["sub"])),
            church_id=uuid.UUID(str(claims["church"])),
            purpose=purpose,
            auth_version=version,
        )
    except ValueError:
        raise AuthenticationError("The MFA challenge is not valid; log in again") from None


# --- secrets and codes ---------------------------------------------------------------------


def _cipher(settings: Settings) -> ContactCipher:
    return ContactCipher.from_settings(settings)


def new_secret() -> str:
    return pyotp.random_base32()  # 32 base32 characters: 160 bits, as RFC 4226 recommends


def provisioning_uri(secret: str, email: str) -> str:
    """`otpauth://totp/Koinonia:<email>?secret=…&issuer=Koinonia` (for a QR code)."""
    return pyotp.TOTP(secret, interval=STEP_SECONDS).provisioning_uri(
        name=email, issuer_name=TOTP_ISSUER
    )


def seal_secret(settings: Settings, user_id: uuid.UUID, secret: str) -> bytes:
    return _cipher(settings).encrypt(secret, user_id)


def match_totp(secret: str, code: str, now: float, last_step: int | None) -> int | None:
    """The time step `code` belongs to (now ± 1 step), if it is newer than `last_step`."""
    if not _TOTP_CODE.fullmatch(code):
        return None
    try:
        step = pyotp.TOTP(secret, interval=STEP_SECONDS).verify_and_get_timecode(
            code, for_time=now, valid_window=VALID_WINDOW
        )
    except (OTPVerificationError, ValueError):
        return None
    if last_step is not None and step <= last_step:
        return None  # this code (or a later one) was already used
    return step


def generate_recovery_codes() -> list[str]:
    codes = []
    for _ in range(RECOVERY_CODE_COUNT):
        raw = "".join(secrets.choice(_RECOVERY_ALPHABET) for _ in range(RECOVERY_CODE_LENGTH))
        codes.append(f"{raw[:5]}-{raw[5:]}")
    return codes


def normalise_recovery_code(code: str) -> str:
    return "".join(code.split()).replace("-", "").lower()


def recovery_code_hash(settings: Settings, user_id: uuid.UUID, code: str) -> bytes:
    pepper = hmac.new(
        settings.member_hmac_key.get_secret_value().encode(),
        b"koinonia/mfa-recovery-codes/v1",
        hashlib.sha256,
    ).digest()
    message = user_id.bytes + normalise_recovery_code(code).encode()
    return hmac.new(pepper, message, hashlib.sha256).digest()


# --- state changes (inside the request's transaction; never commit) -------------------------


async def locked_user(session: AsyncSession, user_id: uuid.UUID) -> User | None:
    """The user row, locked until the commit: a code's step is checked and stored under it,
    so two requests with the same code cannot both pass."""
    return await session.get(User, user_id, with_for_update=True, populate_existing=True)


async def check_code(
    session: AsyncSession, settings: Settings, user: User, code: str, *, recovery: bool
) -> Method | None:
    """Check a TOTP code (or, with `recovery`, a recovery code) and use it up."""
    if user.mfa_secret is None:
        return None
    code = code.strip()
    if _TOTP_CODE.fullmatch(code):
        cipher = _cipher(settings)
        secret = cipher.decrypt(user.mfa_secret, user.id)
        step = match_totp(secret, code, clock(), user.mfa_last_step)
        if step is None:
            return None
        user.mfa_last_step = step
        if ContactCipher.key_id_of(user.mfa_secret) != cipher.active_key_id:
            user.mfa_secret = cipher.encrypt(secret, user.id)  # key rotation, on use
        return "totp"
    if not recovery or user.mfa_enabled_at is None:
        return None
    if not _RECOVERY_CODE.fullmatch(normalise_recovery_code(code)):
        return None
    used = await session.scalar(
        update(MfaRecoveryCode)
        .where(
            MfaRecoveryCode.user_id == user.id,
            MfaRecoveryCode.code_hash == recovery_code_hash(settings, user.id, code),
            MfaRecoveryCode.used_at.is_(None),
        )
        .values(used_at=datetime.now(UTC))
        .returning(MfaRecoveryCode.id)
    )
    if used is None:
        return None
    audit.record(
        session,
        action="user.mfa_recovery_code_used",
        church_id=user.church_id,
        actor_id=user.id,
        target_type="user",
        target_id=user.id,
    )
    return "recovery_code"


async def recovery_codes_left(session: AsyncSession, user_id: uuid.UUID) -> int:
    count = await session.scalar(
        select(func.count())
        .select_from(MfaRecoveryCode)
        .where(MfaRecoveryCode.user_id == user_id, MfaRecoveryCode.used_at.is_(None))
    )
    return int(count or 0)


def start_enrolment(session: AsyncSession, settings: Settings, user: User) -> str:
    """A new secret, stored but not active until confirmed; answers it in plain text."""
    if user.mfa_enabled_at is not None:
        raise ConflictError("MFA is already on; disable it first to enrol a new device")
    secret = new_secret()
    user.mfa_secret = seal_secret(settings, user.id, secret)
    user.mfa_last_step = None
    audit.record(
        session,
        action="user.mfa_enrolment_started",
        church_id=user.church_id,
        actor_id=user.id,
        target_type="user",
        target_id=user.id,
    )
    return secret


async def _store_recovery_codes(session: AsyncSession, settings: Settings, user: User) -> list[str]:
    await session.execute(delete(MfaRecoveryCode).where(MfaRecoveryCode.user_id == user.id))
    codes = generate_recovery_codes()
    session.add_all(
        MfaRecoveryCode(user_id=user.id, code_hash=recovery_code_hash(settings, user.id, code))
        for code in codes
    )
    await session.flush()
    return codes


async def enable(session: AsyncSession, settings: Settings, user: User) -> list[str]:
    """Turn MFA on (after the first code was checked); answers the recovery codes."""
    user.mfa_enabled_at = datetime.now(UTC)
    codes = await _store_recovery_codes(session, settings, user)
    audit.record(
        session,
        action="user.mfa_enabled",
        church_id=user.church_id,
        actor_id=user.id,
        target_type="user",
        target_id=user.id,
    )
    return codes


async def regenerate_recovery_codes(
    session: AsyncSession, settings: Settings, user: User
) -> list[str]:
    codes = await _store_recovery_codes(session, settings, user)
    audit.record(
        session,
        action="user.mfa_recovery_codes_regenerated",
        church_id=user.church_id,
        actor_id=user.id,
        target_type="user",
        target_id=user.id,
    )
    return codes


async def turn_off(
    session: AsyncSession, user: User, *, actor: Principal | None = None, method: str = ""
) -> None:
    """Remove the user's MFA: by themselves (`method` they proved it with) or a manager."""
    user.mfa_secret = None
    user.mfa_enabled_at = None
    user.mfa_last_step = None
    await session.execute(delete(MfaRecoveryCode).where(MfaRecoveryCode.user_id == user.id))
    audit.record(
        session,
        action="user.mfa_reset" if actor else "user.mfa_disabled",
        church_id=user.church_id,
        actor_id=actor.actor_id if actor else user.id,
        actor_kind=actor.actor_kind if actor else "user",
        target_type="user",
        target_id=user.id,
        details={"method": method} if method else None,
    )


async def end_sessions(session: AsyncSession, limiter: RateLimiter, user: User) -> None:
    """End every session of the user: refresh tokens revoked, access tokens (and MFA
    challenges) refused from their next request. The caller issues a fresh pair."""
    await sessions.revoke_user(session, user.id)
    await revocation.revoke_user(session, limiter, user.id, api_keys=False)
    await session.refresh(user, attribute_names=["auth_version"])


async def set_church_requirement(
    session: AsyncSession,
    limiter: RateLimiter,
    actor: Principal,
    church: Church,
    required: bool,
) -> None:
    """`PATCH /church {"require_mfa"}`: the owner only, who must have MFA on to turn it on.
    Turning it on ends the sessions of the church's users without MFA (their next login
    must enrol); API keys are not affected."""
    if required == church.require_mfa:
        return
    if actor.role != "owner" or actor.user_id is None:
        raise AuthorizationError("Only the owner can change whether the church requires MFA")
    if required:
        owner = await session.get(User, actor.user_id)
        if owner is None or owner.mfa_enabled_at is None:
            raise ConflictError("Turn on MFA for your own account before requiring it")
    church.require_mfa = required
    ended = 0
    if required:
        without = (
            await session.scalars(
                select(User.id).where(
                    User.church_id == church.id,
                    User.is_active.is_(True),
                    User.mfa_enabled_at.is_(None),
                )
            )
        ).all()
        for user_id in without:
            await sessions.revoke_user(session, user_id)
            await revocation.revoke_user(session, limiter, user_id, api_keys=False)
        ended = len(without)
    audit.record(
        session,
        action="church.mfa_requirement_changed",
        church_id=church.id,
        actor_id=actor.actor_id,
        actor_kind=actor.actor_kind,
        target_type="church",
        target_id=church.id,
        details={"require_mfa": required, "sessions_ended_for_users": ended},
    )
