"""Staff MFA endpoints (`/auth/mfa/*`) and a manager's reset of a user's MFA.

Every wrong code or password here counts against the client IP's failed-authentication
limit, the login lockout of the user's email from that IP, and a lockout of the user's
MFA from any address (`mfa.USER_LOCKOUT_FAILURES`); see docs/auth.md.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Body, Depends, Request, Response, status
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.accounts import mfa, passwords, service
from koinonia.accounts.deps import CurrentPrincipal, Manager, get_principal
from koinonia.accounts.lockout import LoginLockout
from koinonia.accounts.principal import Principal
from koinonia.accounts.schemas import (
    MfaCodeRequest,
    MfaConfirmRequest,
    MfaDisabledOut,
    MfaDisableRequest,
    MfaEnrolment,
    MfaEnrolRequest,
    MfaRecoveryCodesOut,
    MfaStatusOut,
    MfaVerifyRequest,
    TokenPair,
)
from koinonia.accounts.tables import Church, User
from koinonia.errors import (
    AppError,
    AuthenticationError,
    AuthorizationError,
    ConflictError,
    FieldError,
    RateLimitedError,
    ValidationError,
    problem_responses,
)
from koinonia.http.deps import AppSettings, DbSession
from koinonia.http.ratelimits import client_ip, limit_per_ip, record_failure
from koinonia.http.routing import FeatureRouter
from koinonia.settings import Settings
from koinonia.tenancy import get_owned

auth_mfa = FeatureRouter(prefix="/api/v1/auth/mfa", tags=["auth"])
users_mfa = FeatureRouter(prefix="/api/v1/users", tags=["staff"])
routers = [auth_mfa, users_mfa]

# Changes end the user's sessions, which needs Redis (503 without it, see revocation.py).
CHANGING = problem_responses(401, 403, 409, 422, 429, 503)


def _lockouts(request: Request, user: User) -> list[tuple[LoginLockout, str, str | None]]:
    settings: Settings = request.app.state.settings
    redis = request.app.state.redis
    return [
        # The login lockout (email and client IP): password and code guesses share it.
        (
            LoginLockout(
                redis,
                failures=settings.login_lockout_failures,
                seconds=settings.login_lockout_seconds,
            ),
            user.email,
            client_ip(request),
        ),
        # The user's MFA from every address: bounds guessing spread over many IPs.
        (
            LoginLockout(
                redis,
                failures=mfa.USER_LOCKOUT_FAILURES,
                seconds=settings.login_lockout_seconds,
            ),
            f"mfa-user:{user.id}",
            None,
        ),
    ]


async def _prove(
    request: Request,
    session: AsyncSession,
    user: User,
    *,
    code: str | None = None,
    password: str | None = None,
    recovery: bool,
    error: AppError,
) -> str:
    """Check a code (or the password) under the lockouts; answers how it was proved."""
    lockouts = _lockouts(request, user)
    for lockout, subject, ip in lockouts:
        if wait := await lockout.locked_for(subject, ip):
            raise RateLimitedError(
                "Too many wrong codes or passwords; try again later",
                headers={"Retry-After": str(wait)},
            )
    method: str | None
    if password is not None:
        valid = await passwords.verify_password(user.password_hash, password)
        method = "password" if valid else None
    else:
        settings: Settings = request.app.state.settings
        method = await mfa.check_code(session, settings, user, code or "", recovery=recovery)
    if method is None:
        for lockout, subject, ip in lockouts:
            await lockout.failed(subject, ip)
        await record_failure(request)
        raise error
    for lockout, subject, ip in lockouts:
        await lockout.succeeded(subject, ip)
    return method


def _wrong(field: str) -> ValidationError:
    what = "password is wrong" if field == "password" else "code is wrong or was already used"
    return ValidationError(f"The {what}", errors=[FieldError(field, what)])


async def _challenged_user(
    request: Request, session: AsyncSession, settings: Settings, token: str, purpose: mfa.Purpose
) -> User:
    try:
        challenge = mfa.decode_challenge(settings, token, purpose)
    except AuthenticationError:
        await record_failure(request)
        raise
    user = await mfa.locked_user(session, challenge.user_id)
    if (
        user is None
        or not user.is_active
        or user.auth_version != challenge.auth_version
        or user.church_id != challenge.church_id
        or (purpose == "verify" and user.mfa_enabled_at is None)
    ):
        await record_failure(request)
        raise AuthenticationError("The MFA challenge is not valid; log in again")
    return user


async def _user_of(session: AsyncSession, principal: Principal) -> User:
    if principal.user_id is None:
        raise AuthorizationError("MFA is for staff users; API keys are not affected by it")
    user = await mfa.locked_user(session, principal.user_id)
    if user is None:
        raise AuthenticationError()
    return user


async def _bearer_user(request: Request, response: Response, session: AsyncSession) -> User:
    return await _user_of(session, await get_principal(request, response))


@auth_mfa.get("", responses=problem_responses(401, 403, 429))
async def mfa_status(principal: CurrentPrincipal, session: DbSession) -> MfaStatusOut:
    """Whether the caller has MFA on, and how many recovery codes are left."""
    user = await _user_of(session, principal)
    church_row = await session.get(Church, user.church_id)
    return MfaStatusOut(
        enabled=user.mfa_enabled_at is not None,
        pending=user.mfa_enabled_at is None and user.mfa_secret is not None,
        recovery_codes_left=await mfa.recovery_codes_left(session, user.id),
        church_requires_mfa=bool(church_row and church_row.require_mfa),
    )


@auth_mfa.post("/enrol", responses=problem_responses(401, 403, 409, 422, 429))
async def mfa_enrol(
    request: Request,
    response: Response,
    session: DbSession,
    settings: AppSettings,
    body: Annotated[MfaEnrolRequest | None, Body()] = None,
) -> MfaEnrolment:
    """Start enrolling a TOTP app: answers the secret and its `otpauth://` URI. Nothing
    changes until `POST /auth/mfa/confirm` with a code from the app; enrolling again
    replaces an unconfirmed secret.

    With an access token, send `{"password"}` (a stolen access token alone cannot put an
    attacker's device on the account); after a login answered `mfa_enrolment_required`,
    send `{"challenge"}` and no `Authorization`."""
    body = body or MfaEnrolRequest()
    if body.challenge is not None:
        user = await _challenged_user(request, session, settings, body.challenge, "enrol")
    else:
        user = await _bearer_user(request, response, session)
        if user.mfa_enabled_at is not None:
            raise ConflictError("MFA is already on; disable it first to enrol a new device")
        if body.password is None:
            raise ValidationError(
                "Send your password to enrol",
                errors=[FieldError("password", "required with an access token")],
            )
        await _prove(
            request, session, user, password=body.password, recovery=False, error=_wrong("password")
        )
    secret = mfa.start_enrolment(session, settings, user)
    return MfaEnrolment(secret=secret, provisioning_uri=mfa.provisioning_uri(secret, user.email))


@auth_mfa.post("/confirm", responses=CHANGING)
async def mfa_confirm(
    body: MfaConfirmRequest,
    request: Request,
    response: Response,
    session: DbSession,
    settings: AppSettings,
) -> MfaRecoveryCodesOut:
    """Turn MFA on with a first code from the app. Answers the 10 recovery codes (shown
    only here) and a fresh token pair: every other session of the user ends. With
    `{"challenge"}` (an `mfa_enrolment_required` login) this completes the login."""
    via_challenge = body.challenge is not None
    if body.challenge is not None:
        user = await _challenged_user(request, session, settings, body.challenge, "enrol")
    else:
        user = await _bearer_user(request, response, session)
    if user.mfa_enabled_at is not None:
        raise ConflictError("MFA is already on")
    if user.mfa_secret is None:
        raise ConflictError("Nothing to confirm: start with POST /auth/mfa/enrol")
    await _prove(request, session, user, code=body.code, recovery=False, error=_wrong("code"))
    codes = await mfa.enable(session, settings, user)
    await mfa.end_sessions(session, request.app.state.rate_limiter, user)
    if via_challenge:
        service.record_login(session, user, mfa="totp")
    return MfaRecoveryCodesOut(
        recovery_codes=codes, tokens=await service.token_pair(session, settings, user)
    )


@auth_mfa.post(
    "/verify",
    # Like a login: per IP, and an IP over its failed-authentication limit is refused first.
    dependencies=[Depends(limit_per_ip("login", refuse_failing=True))],
    responses=problem_responses(401, 422, 429),
)
async def mfa_verify(
    body: MfaVerifyRequest, request: Request, session: DbSession, settings: AppSettings
) -> TokenPair:
    """Second step of a login answered `mfa_required`: the challenge and a code from the
    app (each works once) or a recovery code (each works once) → the token pair."""
    user = await _challenged_user(request, session, settings, body.challenge, "verify")
    method = await _prove(
        request,
        session,
        user,
        code=body.code,
        recovery=True,
        error=AuthenticationError("The code is wrong or was already used"),
    )
    service.record_login(session, user, mfa=method)
    return await service.token_pair(session, settings, user)


@auth_mfa.post("/disable", responses=CHANGING)
async def mfa_disable(
    body: MfaDisableRequest,
    principal: CurrentPrincipal,
    request: Request,
    session: DbSession,
    settings: AppSettings,
) -> MfaDisabledOut:
    """Turn MFA off with a code (or recovery code) or the password. Every session of the
    user ends; the answer carries a fresh pair unless the church requires MFA (then log
    in again and enrol)."""
    user = await _user_of(session, principal)
    if user.mfa_enabled_at is None:
        raise ConflictError("MFA is not on")
    method = await _prove(
        request,
        session,
        user,
        code=body.code,
        password=body.password,
        recovery=True,
        error=_wrong("password" if body.password is not None else "code"),
    )
    await mfa.turn_off(session, user, method=method)
    await mfa.end_sessions(session, request.app.state.rate_limiter, user)
    church_row = await session.get(Church, user.church_id)
    required = church_row is not None and church_row.require_mfa
    return MfaDisabledOut(
        tokens=None if required else await service.token_pair(session, settings, user)
    )


@auth_mfa.post("/recovery-codes", responses=CHANGING)
async def mfa_recovery_codes(
    body: MfaCodeRequest,
    principal: CurrentPrincipal,
    request: Request,
    session: DbSession,
    settings: AppSettings,
) -> MfaRecoveryCodesOut:
    """Replace the recovery codes (the old ones stop working) with a code from the app or
    a recovery code. Every other session of the user ends; answers a fresh pair."""
    user = await _user_of(session, principal)
    if user.mfa_enabled_at is None:
        raise ConflictError("MFA is not on")
    await _prove(request, session, user, code=body.code, recovery=True, error=_wrong("code"))
    codes = await mfa.regenerate_recovery_codes(session, settings, user)
    await mfa.end_sessions(session, request.app.state.rate_limiter, user)
    return MfaRecoveryCodesOut(
        recovery_codes=codes, tokens=await service.token_pair(session, settings, user)
    )


@users_mfa.delete(
    "/{user_id}/mfa",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=problem_responses(401, 403, 404, 422, 429, 503),
)
async def reset_user_mfa(
    user_id: uuid.UUID, principal: Manager, request: Request, session: DbSession
) -> None:
    """Remove a user's MFA (a lost device and no recovery codes left): owner or admin, with
    an access token, not API keys; admins cannot reset the owner. The user's sessions end;
    they log in with their password (and must enrol again if the church requires MFA)."""
    if principal.user_id is None:
        raise AuthorizationError("Resetting MFA needs a signed-in owner or admin, not an API key")
    user = await get_owned(session, User, user_id, principal.church_id, what="user")
    if user.id == principal.user_id:
        raise AuthorizationError("Turn your own MFA off with POST /auth/mfa/disable")
    if user.role == "owner" and principal.role != "owner":
        raise AuthorizationError("Only the owner can change the owner's account")
    if user.mfa_secret is None and user.mfa_enabled_at is None:
        return
    await mfa.turn_off(session, user, actor=principal)
    await mfa.end_sessions(session, request.app.state.rate_limiter, user)
