"""How the real providers sign webhooks (see ../shared/reference)."""

from __future__ import annotations

import base64
import hashlib
import hmac

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat


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


def load_telnyx_key(seed_b64: str | None) -> Ed25519PrivateKey:
    if seed_b64:
        return Ed25519PrivateKey.from_private_bytes(base64.b64decode(seed_b64))
    return Ed25519PrivateKey.generate()


def public_key_b64(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw).decode()
