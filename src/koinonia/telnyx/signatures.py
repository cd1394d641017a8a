"""Telnyx API v2 webhook signatures: Ed25519 over `timestamp|raw body`.

Our own few lines with `cryptography`: the official SDK's `unwrap()` checks Standard
Webhooks HMAC headers by default and rejects real Telnyx events.
"""

from __future__ import annotations

import base64
import binascii
import time

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from koinonia.errors import WebhookSignatureError

SIGNATURE_HEADER = "telnyx-signature-ed25519"
TIMESTAMP_HEADER = "telnyx-timestamp"
TOLERANCE_SECONDS = 300


def load_public_key(encoded: str) -> Ed25519PublicKey:
    """The portal's public key: base64 of the raw 32 bytes."""
    raw = base64.b64decode(encoded, validate=True)
    return Ed25519PublicKey.from_public_bytes(raw)


def verify(
    keys: list[Ed25519PublicKey],
    body: bytes,
    signature: str | None,
    timestamp: str | None,
    *,
    now: float | None = None,
    tolerance: int = TOLERANCE_SECONDS,
) -> None:
    """Raise `WebhookSignatureError` unless one of `keys` signed `timestamp|body` recently."""
    if not signature or not timestamp:
        raise WebhookSignatureError("Missing telnyx-signature-ed25519 or telnyx-timestamp header")
    try:
        if len(timestamp) > 12:  # Unix seconds; a longer number overflows a float below
            raise ValueError
        sent_at = int(timestamp)
        signature_bytes = base64.b64decode(signature, validate=True)
    except (ValueError, binascii.Error):
        raise WebhookSignatureError("Malformed signature headers") from None
    if abs((now if now is not None else time.time()) - sent_at) > tolerance:
        raise WebhookSignatureError("The webhook timestamp is outside the 5-minute window")
    signed = timestamp.encode() + b"|" + body
    for key in keys:
        try:
            key.verify(signature_bytes, signed)
            return
        except InvalidSignature:
            continue
    raise WebhookSignatureError("The signature does not verify")
