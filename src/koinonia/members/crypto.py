"""Encryption at rest of member phones and emails, and their blind index.

AES-256-GCM (`cryptography`). A ciphertext is `key id | 0x00 | nonce | sealed`, so keys
rotate: new writes use the active key, old rows stay readable with theirs until
`koinonia members rotate-keys` re-encrypts them. The church id is authenticated data, so a
ciphertext copied to another church's row does not decrypt.

The blind index is HMAC-SHA256 over (church id, field, normalised value) with its own key:
equal values in one church give equal hashes (de-duplication, exact lookup) without the
value, and the same phone in two churches gives unrelated hashes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import uuid

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from koinonia.settings import Settings

NONCE_BYTES = 12


class DecryptionError(ValueError):
    pass


def parse_keyring(value: str) -> dict[str, bytes]:
    keyring = {}
    for entry in value.split(","):
        key_id, _, encoded = entry.strip().partition(":")
        keyring[key_id] = base64.b64decode(encoded)
    return keyring


class ContactCipher:
    def __init__(self, keyring: dict[str, bytes], active_key_id: str, hmac_key: bytes) -> None:
        self._ciphers = {key_id: AESGCM(key) for key_id, key in keyring.items()}
        self.active_key_id = active_key_id
        self._active = self._ciphers[active_key_id]
        self._header = active_key_id.encode() + b"\x00"
        self._hmac_key = hmac_key
        self._prefixes: dict[bytes, hmac.HMAC] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> ContactCipher:
        return cls(
            parse_keyring(settings.member_encryption_keys.get_secret_value()),
            settings.member_encryption_active_key,
            settings.member_hmac_key.get_secret_value().encode(),
        )

    def encrypt(self, value: str, church_id: uuid.UUID) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return self._header + nonce + self._active.encrypt(nonce, value.encode(), church_id.bytes)

    def decrypt(self, blob: bytes, church_id: uuid.UUID) -> str:
        key_id, separator, rest = bytes(blob).partition(b"\x00")
        cipher = self._ciphers.get(key_id.decode(errors="replace"))
        if not separator or cipher is None:
            raise DecryptionError("unknown encryption key id")
        try:
            plain = cipher.decrypt(rest[:NONCE_BYTES], rest[NONCE_BYTES:], church_id.bytes)
        except InvalidTag:
            raise DecryptionError("ciphertext does not authenticate") from None
        return plain.decode()

    @staticmethod
    def key_id_of(blob: bytes) -> str:
        return bytes(blob).partition(b"\x00")[0].decode(errors="replace")

    def blind_index(self, field: str, value: str, church_id: uuid.UUID) -> bytes:
        prefix = church_id.bytes + field.encode() + b"\x00"
        # HMAC state after the (church, field) prefix, reused for every value.
        state = self._prefixes.get(prefix)
        if state is None:
            if len(self._prefixes) > 1024:
                self._prefixes.clear()
            state = self._prefixes[prefix] = hmac.new(self._hmac_key, prefix, hashlib.sha256)
        mac = state.copy()
        mac.update(value.encode())
        return mac.digest()

    def phone_hash(self, e164: str, church_id: uuid.UUID) -> bytes:
        return self.blind_index("phone", e164, church_id)

    def email_hash(self, email: str, church_id: uuid.UUID) -> bytes:
        return self.blind_index("email", email.strip().lower(), church_id)
