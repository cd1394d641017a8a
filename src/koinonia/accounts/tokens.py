"""Short-lived JWT access tokens (HS256)."""

from __future__ import annotations

import functools
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
    principal, expires = _verified(settings.jwt_secret.get_secret_value(), token)
    # pyjwt's own rule (`exp <= now` is expired), applied on every use of a cached token.
    if expires <= time.time():
        raise TokenExpiredError("The access token has expired")
    return principal


# A client sends the same token on every request for its lifetime (15 minutes): its
# signature and claims are checked once, not on every request (a tenth of an
# authenticated read's CPU). Keyed by the secret and the whole token, so a rotated secret
# or a token differing in any byte is verified afresh; expiry is checked on every use
# above; revocation is not a property of the token (the rate-limit gate compares its
# `ver` with the user's on every request). Failures are not cached (exceptions).
@functools.lru_cache(maxsize=8192)
def _verified(secret: str, token: str) -> tuple[Principal, float]:
    try:
        claims = jwt.decode(
            token,
            secret,
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
        principal = Principal(
            church_id=uuid.UUID(claims["church"]),
            role=str(claims["role"]),
            user_id=uuid.UUID(claims["sub"]),
            is_operator=bool(claims.get("op")),
            auth_version=_version(claims.get("ver", 0)),
        )
        return principal, float(claims["exp"])
    except (ValueError, TypeError):
        raise AuthenticationError("The access token is not valid") from None


def _version(value: object) -> int:
    if type(value) is not int or value < 0:
        raise ValueError("ver")
    return value
