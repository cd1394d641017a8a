"""How the real providers sign webhooks (see ../shared/reference)."""

from __future__ import annotations

import base64
import hashlib
import hmac

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)


def stripe_signature(secret: str, body: bytes, timestamp: int) -> str:
    """`Stripe-Signature`: HMAC-SHA256 over `{t}.{raw body}` with the endpoint secret."""
    signed = f"{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def telnyx_headers(key: Ed25519PrivateKey, body: bytes, timestamp: int) -> dict[str, str]:
    """Telnyx: Ed25519 over `{timestamp}|{raw body}`, base64, with the timestamp header."""
    signature = key.sign(f"{timestamp}|".encode() + body)
    return {
        "telnyx-signature-ed25519": base64.b64encode(signature).decode(),
        "telnyx-timestamp": str(timestamp),
    }


def load_telnyx_key(secret: str | None) -> Ed25519PrivateKey:
    """The signing key from a PEM (PKCS#8) or a base64 32-byte seed; a new one when None."""
    if not secret:
        return Ed25519PrivateKey.generate()
    if secret.lstrip().startswith("-----BEGIN"):
        key = load_pem_private_key(secret.encode(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("the Telnyx signing key must be an Ed25519 key")
        return key
    return Ed25519PrivateKey.from_private_bytes(base64.b64decode(secret))


def public_key_b64(key: Ed25519PrivateKey) -> str:
    """Base64 of the raw 32-byte public key, as the Telnyx portal shows it."""
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw).decode()
