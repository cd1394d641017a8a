"""Short-lived JWT access tokens (HS256)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import jwt

from koinonia.accounts.principal import Principal
from koinonia.errors import AuthenticationError
from koinonia.settings import Settings

ALGORITHM = "HS256"


class TokenExpiredError(AuthenticationError):
    """A genuine token past its lifetime: routine for clients, not an attack signal."""


ISSUER = "koinonia"


def issue_access_token(
    settings: Settings,
    *,
    user_id: uuid.UUID,
    church_id: uuid.UUID,
    role: str,
    is_operator: bool = False,
    auth_version: int = 0,
) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": str(user_id),
        "church": str(church_id),
        "role": role,
        "op": is_operator,
        "iat": now,
        "exp": now + settings.access_token_ttl_seconds,
        "jti": uuid.uuid4().hex,
        "typ": "access",
        # The user's version when issued: a later revocation raises it (revocation.py).
        "ver": auth_version,
    }
    return jwt.encode(claims, settings.jwt_secret.get_secret_value(), algorithm=ALGORITHM)


def decode_access_token(settings: Settings, token: str) -> Principal:
    try:
        claims = jwt.decode(
            token,
            settings.jwt_secret.get_secret_value(),
            algorithms=[ALGORITHM],
            issuer=ISSUER,
            options={"require": ["exp", "iat", "sub", "church", "role"]},
        )
    except jwt.ExpiredSignatureError:
        raise TokenExpiredError("The access token has expired") from None
    except jwt.PyJWTError:
        raise AuthenticationError("The access token is not valid") from None
    if claims.get("typ") != "access":
        raise AuthenticationError("The access token is not valid")
    try:
        return Principal(
            church_id=uuid.UUID(claims["church"]),
            role=str(claims["role"]),
            user_id=uuid.UUID(claims["sub"]),
            is_operator=bool(claims.get("op")),
            auth_version=_version(claims.get("ver", 0)),
        )
    except (ValueError, TypeError):
        raise AuthenticationError("The access token is not valid") from None


def _version(value: object) -> int:
    if type(value) is not int or value < 0:
        raise ValueError("ver")
    return value
