"""The reference we put in each send's `webhook_url`, so its receipts name our row.

A send that timed out has no Telnyx id; its receipts still reach us with this reference,
which settles whether it was accepted. The reference carries an HMAC tag: a replayed
receipt cannot be pointed at another row by editing the URL.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

Kind = Literal["r", "c"]  # a broadcast recipient, a conversation message
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)


@dataclass(frozen=True)
class RowRef:
    kind: Kind
    id: int
    created_at: datetime

    def _plain(self) -> str:
        micros = (self.created_at - _EPOCH) // _MICRO  # exact, unlike float seconds
        return f"{self.kind}.{self.id}.{micros}"


def _tag(key: bytes, plain: str) -> str:
    digest = hmac.new(key, plain.encode(), hashlib.sha256).digest()[:9]
    return base64.urlsafe_b64encode(digest).decode()


def encode(key: bytes, ref: RowRef) -> str:
    plain = ref._plain()
    return f"{plain}.{_tag(key, plain)}"


def decode(key: bytes, value: str | None) -> RowRef | None:
    """The reference, or None when absent, malformed or not signed by us."""
    if not value or len(value) > 80:
        return None
    parts = value.split(".")
    if len(parts) != 4 or parts[0] not in ("r", "c"):
        return None
    plain = ".".join(parts[:3])
    if not hmac.compare_digest(_tag(key, plain), parts[3]):
        return None
    try:
        row_id, micros = int(parts[1]), int(parts[2])
    except ValueError:
        return None
    created = _EPOCH + micros * _MICRO
    kind: Kind = "r" if parts[0] == "r" else "c"
    return RowRef(kind, row_id, created)


def ref_key(hmac_secret: str) -> bytes:
    """A key of its own, derived from the blind-index secret."""
    return hmac.new(hmac_secret.encode(), b"koinonia-webhook-ref", hashlib.sha256).digest()
