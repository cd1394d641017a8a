"""API keys: `kn_<prefix>_<secret>`, shown once, stored as a SHA-256 hash.

The keys carry 190+ bits of randomness, so a fast hash is safe (unlike passwords) and
lets every request authenticate with one indexed lookup by the public prefix.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
from dataclasses import dataclass

_ALPHABET = string.ascii_letters + string.digits
PREFIX_LENGTH = 8
SECRET_LENGTH = 32
KEY_MARKER = "kn_"


@dataclass(frozen=True, slots=True)
class NewApiKey:
    plaintext: str
    prefix: str
    key_hash: bytes


def _random(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


def generate_api_key() -> NewApiKey:
    prefix = _random(PREFIX_LENGTH)
    plaintext = f"{KEY_MARKER}{prefix}_{_random(SECRET_LENGTH)}"
    return NewApiKey(plaintext, prefix, hash_api_key(plaintext))


def hash_api_key(plaintext: str) -> bytes:
    return hashlib.sha256(plaintext.encode()).digest()


def looks_like_api_key(token: str) -> bool:
    return token.startswith(KEY_MARKER)


def split_api_key(token: str) -> str | None:
    """The public prefix of a well-formed key, else None."""
    parts = token.split("_")
    if len(parts) != 3 or len(parts[1]) != PREFIX_LENGTH or len(parts[2]) != SECRET_LENGTH:
        return None
    return parts[1]


def matches(token: str, key_hash: bytes) -> bool:
    return hmac.compare_digest(hash_api_key(token), key_hash)
