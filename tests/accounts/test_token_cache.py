"""Verified access tokens are remembered; expiry and validity still hold on every use."""

from __future__ import annotations

import time
import uuid

import pytest

from koinonia.accounts import tokens
from koinonia.accounts.tokens import TokenExpiredError, decode_access_token, issue_access_token
from koinonia.errors import AuthenticationError
from tests.conftest import make_settings


def test_a_cached_token_still_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(access_token_ttl_seconds=60)
    token = issue_access_token(settings, user_id=uuid.uuid4(), church_id=uuid.uuid4(), role="staff")
    first = decode_access_token(settings, token)
    assert decode_access_token(settings, token) is first  # verified once, then remembered
    later = time.time() + 61
    monkeypatch.setattr(tokens.time, "time", lambda: later)
    with pytest.raises(TokenExpiredError):
        decode_access_token(settings, token)


def test_another_secret_or_a_changed_byte_is_verified_afresh() -> None:
    settings = make_settings()
    token = issue_access_token(settings, user_id=uuid.uuid4(), church_id=uuid.uuid4(), role="owner")
    decode_access_token(settings, token)
    rotated = make_settings(jwt_secret="another-secret-of-at-least-32-bytes-long!!")
    with pytest.raises(AuthenticationError):
        decode_access_token(rotated, token)
    head, payload, signature = token.split(".")
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    with pytest.raises(AuthenticationError):
        decode_access_token(settings, f"{head}.{payload}.{flipped}")
