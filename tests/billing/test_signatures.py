"""Stripe-Signature verification: valid, rotation, stale, tampered, wrong secret."""

from __future__ import annotations

import hashlib
import hmac
import json
import time

import pytest

from koinonia.billing.webhooks import StripeSignatureError, verify
from koinonia.sandbox.signing import stripe_signature

BODY = json.dumps({"id": "evt_1", "type": "invoice.paid", "data": {"object": {}}}).encode()


def _v1(secret: str, body: bytes, t: int) -> str:
    return hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()


def test_valid_signature() -> None:
    header = stripe_signature("whsec_a", BODY, int(time.time()))
    assert verify(BODY, header, ["whsec_a"], 300)["id"] == "evt_1"


def test_two_v1_values_while_stripe_rolls_the_secret() -> None:
    t = int(time.time())
    header = f"t={t},v1={_v1('whsec_old', BODY, t)},v1={_v1('whsec_new', BODY, t)},v0=abc"
    assert verify(BODY, header, ["whsec_new"], 300)["type"] == "invoice.paid"


def test_several_secrets_of_ours() -> None:
    header = stripe_signature("whsec_second", BODY, int(time.time()))
    assert verify(BODY, header, ["whsec_first", "whsec_second"], 300)


@pytest.mark.parametrize(
    ("header", "secrets"),
    [
        (stripe_signature("whsec_a", BODY, int(time.time()) - 301), ["whsec_a"]),  # stale
        (stripe_signature("whsec_a", BODY + b" ", int(time.time())), ["whsec_a"]),  # tampered
        (stripe_signature("whsec_a", BODY, int(time.time())), ["whsec_b"]),  # wrong secret
        ("t=123", ["whsec_a"]),  # no v1
        ("garbage", ["whsec_a"]),
        (None, ["whsec_a"]),  # missing header
    ],
)
def test_rejected(header: str | None, secrets: list[str]) -> None:
    with pytest.raises(StripeSignatureError):
        verify(BODY, header, secrets, 300)


def test_signed_non_event_is_rejected() -> None:
    body = b"[1, 2]"
    with pytest.raises(StripeSignatureError):
        verify(body, stripe_signature("s", body, int(time.time())), ["s"], 300)
