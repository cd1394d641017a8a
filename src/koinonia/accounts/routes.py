"""Auth (`/auth`), the church profile (`/church`), staff (`/users`) and API keys."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Depends, Request, status
from sqlalchemy import select

from koinonia.accounts import mfa, service, sessions
from koinonia.accounts.deps import CurrentPrincipal, Manager
from koinonia.accounts.lockout import LoginLockout
from koinonia.accounts.schemas import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyIdentity,
    ApiKeyOut,
    ChurchOut,
    ChurchUpdate,
    LoginRequest,
    MeOut,
    MfaChallengeOut,
    MfaEnrolmentRequiredOut,
    RefreshRequest,
    RegisterOut,
    RegisterRequest,
    TokenPair,
    UserCreate,
    UserOut,
    UserUpdate,
)
from koinonia.accounts.tables import ApiKey, Church, User
from koinonia.accounts.tokens import issue_access_token
from koinonia.errors import AuthenticationError, RateLimitedError, problem_responses
from koinonia.http.deps import AppSettings, DbSession, get_database
from koinonia.http.pagination import Page, PageParams, cursor_key, make_page, page_params
from koinonia.http.ratelimits import client_ip, limit_per_ip, record_failure
from koinonia.http.routing import FeatureRouter
from koinonia.jobs import defer_in_transaction
from koinonia.messaging.broadcasts import follow_window_change
from koinonia.numbers.jobs import NUMBERS_QUEUE, PROVISION_TASK, queueing_lock
from koinonia.replicas import ReadSession

auth = FeatureRouter(prefix="/api/v1/auth", tags=["auth"])
church = FeatureRouter(prefix="/api/v1/church", tags=["auth"])
users = FeatureRouter(prefix="/api/v1/users", tags=["staff"])
keys = FeatureRouter(prefix="/api/v1/api-keys", tags=["staff"])
routers = [auth, church, users, keys]

Pages = Annotated[PageParams, Depends(page_params)]
AUTHED = problem_responses(401, 429)
MANAGED = problem_responses(401, 403, 404, 422, 429)
# Revoking a user's tokens needs Redis: without it the change is refused with 503.
REVOKING = problem_responses(401, 403, 404, 422, 429, 503)


def _lockout(request: Request) -> LoginLockout:
    settings = request.app.state.settings
    return LoginLockout(
        request.app.state.redis,
        failures=settings.login_lockout_failures,
        seconds=settings.login_lockout_seconds,
    )


@auth.post(
    "/register",
    status_code=status.HTTP_201_CREATED,
    dependencies=[Depends(limit_per_ip("register"))],
    responses=problem_responses(409, 422, 429),
)
async def register(
    body: RegisterRequest, request: Request, session: DbSession, settings: AppSettings
) -> RegisterOut:
    """Create a church and its owner; answers the owner's first token pair.

    The church's sending number is provisioned by a job (deferred in this transaction),
    so registration never waits on Telnyx; `GET /auth/me` shows it once assigned."""
    church_row, user = await service.register(session, body)
    await defer_in_transaction(
        request.app.state.job_app,
        session,
        PROVISION_TASK,
        queue=NUMBERS_QUEUE,
        queueing_lock=queueing_lock(church_row.id),
        church_id=str(church_row.id),
    )
    pair = await service.token_pair(session, settings, user)
    return RegisterOut(
        **pair.model_dump(),
        user=UserOut.model_validate(user),
        church=ChurchOut.model_validate(church_row),
    )


@auth.post(
    "/login",
    # Per IP, and an IP over its failed-authentication limit is refused before any work.
    dependencies=[Depends(limit_per_ip("login", refuse_failing=True))],
    responses=problem_responses(401, 422, 429),
)
async def login(
    body: LoginRequest, request: Request, session: DbSession, settings: AppSettings
) -> TokenPair | MfaChallengeOut | MfaEnrolmentRequiredOut:
    """The token pair; or, with MFA on, `{"mfa_required": true, "challenge"}` (no tokens:
    send the challenge and a code to `POST /auth/mfa/verify`); or, when the church requires
    MFA and the user has none, `{"mfa_enrolment_required": true, "challenge"}` (the
    challenge only enrols: `POST /auth/mfa/enrol` and `/auth/mfa/confirm`)."""
    lockout = _lockout(request)
    ip = client_ip(request)
    # Keyed by email AND client IP: failing from elsewhere cannot lock the real user out.
    if wait := await lockout.locked_for(body.email, ip):
        raise RateLimitedError(
            "Too many failed logins; try again later", headers={"Retry-After": str(wait)}
        )
    try:
        user = await service.authenticate(session, body.email, body.password)
    except AuthenticationError:
        await lockout.failed(body.email, ip)
        await record_failure(request)
        raise
    if user.mfa_enabled_at is not None:
        # Not a success yet: failures keep counting until the second factor passes.
        return MfaChallengeOut(
            challenge=mfa.issue_challenge(settings, user, "verify"),
            expires_in=mfa.challenge_ttl("verify"),
        )
    await lockout.succeeded(body.email, ip)
    church_row = await session.get(Church, user.church_id)
    if church_row is not None and church_row.require_mfa:
        return MfaEnrolmentRequiredOut(
            challenge=mfa.issue_challenge(settings, user, "enrol"),
            expires_in=mfa.challenge_ttl("enrol"),
        )
    service.record_login(session, user)
    return await service.token_pair(session, settings, user)


@auth.post(
    "/refresh",
    dependencies=[Depends(limit_per_ip("refresh", refuse_failing=True))],
    responses=problem_responses(401, 422, 429),
)
async def refresh(body: RefreshRequest, request: Request, settings: AppSettings) -> TokenPair:
    """Exchange a refresh token for a new pair; a token works once. Limited per client IP
    (`RATE_LIMIT_REFRESH_PER_MINUTE`); bad tokens count as failed authentications."""
    # Its own transaction: revoking a reused token's family must commit even though the
    # answer is an error.
    async with get_database(request).unit_of_work() as session:
        rotation = await sessions.rotate(
            session, body.refresh_token, settings.refresh_token_ttl_seconds
        )
        if rotation.user is not None and rotation.token is not None:
            user = rotation.user
            return TokenPair(
                access_token=issue_access_token(
                    settings,
                    user_id=user.id,
                    church_id=user.church_id,
                    role=user.role,
                    is_operator=user.is_operator,
                    auth_version=user.auth_version,
                ),
                refresh_token=rotation.token,
                expires_in=settings.access_token_ttl_seconds,
            )
    await record_failure(request)
    if rotation.reused:
        raise AuthenticationError("This refresh token was already used; log in again")
    raise AuthenticationError("The refresh token is not valid")


@auth.post("/logout", status_code=status.HTTP_204_NO_CONTENT, responses=AUTHED)
async def logout(body: RefreshRequest, principal: CurrentPrincipal, session: DbSession) -> None:
    """Revoke the session (the refresh token's family). Access tokens expire on their own."""
    if principal.user_id is None or not await sessions.revoke_token_family(
        session, body.refresh_token, principal.user_id
    ):
        raise AuthenticationError("The refresh token is not valid")


@auth.get("/me", responses=AUTHED)
async def me(principal: CurrentPrincipal, session: ReadSession) -> MeOut:
    church_row = await session.get(Church, principal.church_id)
    if church_row is None:
        raise AuthenticationError()
    user = await session.get(User, principal.user_id) if principal.user_id else None
    return MeOut(
        user=UserOut.model_validate(user) if user else None,
        api_key=(
            ApiKeyIdentity(id=principal.api_key_id, role=principal.role)
            if principal.api_key_id
            else None
        ),
        church=ChurchOut.model_validate(church_row),
    )


@church.patch("", responses=problem_responses(401, 403, 404, 409, 422, 429, 503))
async def update_church(
    body: ChurchUpdate, principal: Manager, session: DbSession, request: Request
) -> ChurchOut:
    """Change the church profile (owner, admin): name, IANA time zone, default region, HELP
    text and the sending window (`send_window_start`/`send_window_end`, local "HH:MM").
    `require_mfa` is the owner's alone (see docs/auth.md)."""
    row = await session.get(Church, principal.church_id)
    if row is None:
        raise AuthenticationError()
    changes = body.model_dump(exclude_unset=True)
    if (required := changes.pop("require_mfa", None)) is not None:
        limiter = request.app.state.rate_limiter
        await mfa.set_church_requirement(session, limiter, principal, row, required)
    for field, value in changes.items():
        if value is not None or field == "help_text":
            setattr(row, field, value)
    await session.flush()
    await session.refresh(row)
    if changes.keys() & {"timezone", "send_window_start", "send_window_end"}:
        await follow_window_change(session, row)
    return ChurchOut.model_validate(row)


@users.get("", responses=MANAGED)
async def list_users(principal: Manager, session: DbSession, page: Pages) -> Page[UserOut]:
    query = select(User).where(User.church_id == principal.church_id)
    if page.cursor:
        query = query.where(User.id > cursor_key(page, uuid.UUID)[0])
    rows = (await session.scalars(query.order_by(User.id).limit(page.limit + 1))).all()
    return make_page([UserOut.model_validate(r) for r in rows], page.limit, lambda u: [u.id])


@users.post(
    "", status_code=status.HTTP_201_CREATED, responses=problem_responses(401, 403, 409, 422, 429)
)
async def create_user(body: UserCreate, principal: Manager, session: DbSession) -> UserOut:
    return UserOut.model_validate(await service.create_user(session, principal, body))


@users.patch("/{user_id}", responses=REVOKING)
async def update_user(
    user_id: uuid.UUID, body: UserUpdate, principal: Manager, session: DbSession, request: Request
) -> UserOut:
    """Role, status and password changes end the user's access tokens on their next
    request; deactivating also revokes their API keys."""
    user = await service.update_user(
        session, principal, user_id, body, limiter=request.app.state.rate_limiter
    )
    return UserOut.model_validate(user)


@users.delete("/{user_id}", status_code=status.HTTP_204_NO_CONTENT, responses=REVOKING)
async def delete_user(
    user_id: uuid.UUID, principal: Manager, session: DbSession, request: Request
) -> None:
    """Delete a user: their access tokens and API keys stop working at once."""
    await service.delete_user(session, principal, user_id, limiter=request.app.state.rate_limiter)


@keys.get("", responses=MANAGED)
async def list_api_keys(principal: Manager, session: DbSession, page: Pages) -> Page[ApiKeyOut]:
    query = select(ApiKey).where(ApiKey.church_id == principal.church_id)
    if page.cursor:
        query = query.where(ApiKey.id > cursor_key(page, uuid.UUID)[0])
    rows = (await session.scalars(query.order_by(ApiKey.id).limit(page.limit + 1))).all()
    return make_page([ApiKeyOut.model_validate(r) for r in rows], page.limit, lambda k: [k.id])


@keys.post("", status_code=status.HTTP_201_CREATED, responses=MANAGED)
async def create_api_key(
    body: ApiKeyCreate, principal: Manager, session: DbSession
) -> ApiKeyCreated:
    """Create a key. The key is shown once, in this answer; only its hash is kept."""
    key, plaintext = await service.create_api_key(session, principal, body)
    return ApiKeyCreated(**ApiKeyOut.model_validate(key).model_dump(), key=plaintext)


@keys.delete("/{key_id}", status_code=status.HTTP_204_NO_CONTENT, responses=MANAGED)
async def revoke_api_key(key_id: uuid.UUID, principal: Manager, session: DbSession) -> None:
    await service.revoke_api_key(session, principal, key_id)
