"""Business rules of registration, login, staff and API keys. Services never commit."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.accounts import api_keys, passwords, revocation, sessions
from koinonia.accounts.principal import Principal
from koinonia.accounts.schemas import (
    ApiKeyCreate,
    RegisterRequest,
    TokenPair,
    UserCreate,
    UserUpdate,
)
from koinonia.accounts.tables import ApiKey, Church, User
from koinonia.accounts.tokens import issue_access_token
from koinonia.audit import service as audit
from koinonia.errors import AuthenticationError, AuthorizationError, ConflictError
from koinonia.ratelimit import RateLimiter
from koinonia.settings import Settings
from koinonia.tenancy import get_owned


async def email_taken(session: AsyncSession, email: str) -> bool:
    found = await session.scalar(
        select(func.count()).select_from(User).where(func.lower(User.email) == email.lower())
    )
    return bool(found)


async def token_pair(session: AsyncSession, settings: Settings, user: User) -> TokenPair:
    return TokenPair(
        access_token=issue_access_token(
            settings,
            user_id=user.id,
            church_id=user.church_id,
            role=user.role,
            is_operator=user.is_operator,
            auth_version=user.auth_version,
        ),
        refresh_token=await sessions.issue(session, user, settings.refresh_token_ttl_seconds),
        expires_in=settings.access_token_ttl_seconds,
    )


async def register(session: AsyncSession, body: RegisterRequest) -> tuple[Church, User]:
    if await email_taken(session, body.email):
        raise ConflictError("An account with this email already exists")
    church = Church(
        name=body.church_name, timezone=body.timezone, default_region=body.default_region
    )
    session.add(church)
    await session.flush()
    user = User(
        church_id=church.id,
        email=body.email.lower(),
        name=body.name,
        role="owner",
        password_hash=await passwords.hash_password(body.password),
    )
    session.add(user)
    await session.flush()
    audit.record(
        session,
        action="church.registered",
        church_id=church.id,
        actor_id=user.id,
        target_type="church",
        target_id=church.id,
    )
    return church, user


async def authenticate(session: AsyncSession, email: str, password: str) -> User:
    user = (
        await session.execute(select(User).where(func.lower(User.email) == email.lower()))
    ).scalar_one_or_none()
    # Unknown email, inactive user or wrong password: same work, same answer.
    valid = await passwords.verify_password(user.password_hash if user else None, password)
    if user is None or not valid or not user.is_active:
        raise AuthenticationError("The email or password is wrong")
    if passwords.needs_rehash(user.password_hash):
        user.password_hash = await passwords.hash_password(password)
    return user


def record_login(session: AsyncSession, user: User, *, mfa: str | None = None) -> None:
    """A login completed: the password, and the second factor when MFA is on."""
    user.last_login_at = datetime.now(UTC)
    audit.record(
        session,
        action="user.login",
        church_id=user.church_id,
        actor_id=user.id,
        details={"mfa": mfa} if mfa else None,
    )


async def create_user(session: AsyncSession, actor: Principal, body: UserCreate) -> User:
    if await email_taken(session, body.email):
        raise ConflictError("An account with this email already exists")
    user = User(
        church_id=actor.church_id,
        email=body.email.lower(),
        name=body.name,
        role=body.role,
        password_hash=await passwords.hash_password(body.password),
    )
    session.add(user)
    await session.flush()
    audit.record(
        session,
        action="user.created",
        church_id=actor.church_id,
        actor_id=actor.actor_id,
        actor_kind=actor.actor_kind,
        target_type="user",
        target_id=user.id,
        details={"role": user.role},
    )
    return user


def _guard_target(actor: Principal, target: User) -> None:
    if target.role == "owner" and actor.role != "owner":
        raise AuthorizationError("Only the owner can change the owner's account")
    if target.id == actor.user_id:
        raise AuthorizationError("Change your own role or status through another manager")


async def update_user(
    session: AsyncSession,
    actor: Principal,
    user_id: uuid.UUID,
    body: UserUpdate,
    *,
    limiter: RateLimiter,
) -> User:
    user = await get_owned(session, User, user_id, actor.church_id, what="user")
    changes = body.model_dump(exclude_unset=True)
    if "role" in changes or "is_active" in changes:
        _guard_target(actor, user)
        if user.role == "owner":
            raise AuthorizationError("The owner's role and status cannot change")
    elif user.role == "owner" and actor.role != "owner":
        raise AuthorizationError("Only the owner can change the owner's account")
    previous_role, previous_active = user.role, user.is_active
    if body.name is not None:
        user.name = body.name
    if body.role is not None:
        user.role = body.role
    if body.is_active is not None:
        user.is_active = body.is_active
        if not body.is_active:
            await sessions.revoke_user(session, user.id)
    if body.password is not None:
        user.password_hash = await passwords.hash_password(body.password)
        await sessions.revoke_user(session, user.id)
    role_changed = body.role is not None and body.role != previous_role
    status_changed = body.is_active is not None and body.is_active != previous_active
    if role_changed or status_changed or body.password is not None:
        # Access tokens end on their next request; deactivating also revokes the API keys
        # (a demotion caps them at use instead, see revocation.py).
        await session.flush()
        await revocation.revoke_user(
            session, limiter, user.id, api_keys=status_changed and not user.is_active
        )
    audit.record(
        session,
        action="user.updated",
        church_id=actor.church_id,
        actor_id=actor.actor_id,
        actor_kind=actor.actor_kind,
        target_type="user",
        target_id=user.id,
        details={k: v for k, v in changes.items() if k != "password"}
        | ({"password": "changed"} if "password" in changes else {}),
    )
    return user


async def delete_user(
    session: AsyncSession, actor: Principal, user_id: uuid.UUID, *, limiter: RateLimiter
) -> None:
    user = await get_owned(session, User, user_id, actor.church_id, what="user")
    _guard_target(actor, user)
    if user.role == "owner":
        raise AuthorizationError("The owner cannot be deleted")
    # Tokens and API keys end at once (before the row goes: keys keep no creator after).
    await revocation.revoke_user(session, limiter, user.id, api_keys=True)
    await session.delete(user)
    audit.record(
        session,
        action="user.deleted",
        church_id=actor.church_id,
        actor_id=actor.actor_id,
        actor_kind=actor.actor_kind,
        target_type="user",
        target_id=user_id,
    )


async def create_api_key(
    session: AsyncSession, actor: Principal, body: ApiKeyCreate
) -> tuple[ApiKey, str]:
    generated = api_keys.generate_api_key()
    key = ApiKey(
        church_id=actor.church_id,
        name=body.name,
        prefix=generated.prefix,
        key_hash=generated.key_hash,
        role=body.role,
        # A key made by a key acts for the same user, so it is capped by them too.
        created_by=actor.user_id or actor.key_creator_id,
    )
    session.add(key)
    await session.flush()
    audit.record(
        session,
        action="api_key.created",
        church_id=actor.church_id,
        actor_id=actor.actor_id,
        actor_kind=actor.actor_kind,
        target_type="api_key",
        target_id=key.id,
    )
    return key, generated.plaintext


async def revoke_api_key(session: AsyncSession, actor: Principal, key_id: uuid.UUID) -> None:
    key = await get_owned(session, ApiKey, key_id, actor.church_id, what="API key")
    if key.revoked_at is None:
        key.revoked_at = datetime.now(UTC)
        audit.record(
            session,
            action="api_key.revoked",
            church_id=actor.church_id,
            actor_id=actor.actor_id,
            actor_kind=actor.actor_kind,
            target_type="api_key",
            target_id=key.id,
        )
