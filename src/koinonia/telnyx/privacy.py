"""No plain-text phone or message body in a Telnyx event once it is settled.

A stored event is sealed when it has been applied, or dead-lettered: its `data.payload`
(phone numbers, text, media, error details) is encrypted with the member encryption keys
(AES-256-GCM, members/crypto.py; the row id is the authenticated data, so a sealed payload
copied to another row does not open) into `sealed`, and only non-personal fields stay
readable beside it — among them the two keys the reconciler queries,
`payload->>'koinonia_ref'` and `payload->'data'->'payload'->>'id'`.

Replaying a dead-lettered event (telnyx/replay.py) reopens the row; the worker unseals it
before applying, so it applies exactly as the original. A sealed event stays readable
while its key id is in `MEMBER_ENCRYPTION_KEYS`.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

from koinonia.members.crypto import ContactCipher

SEALED = "sealed"
# Fields of a message object that name nobody: kept readable for operators.
READABLE_FIELDS = (
    "id",
    "record_type",
    "direction",
    "type",
    "parts",
    "encoding",
    "messaging_profile_id",
    "organization_id",
    "completed_at",
    "sent_at",
    "received_at",
    "valid_until",
    "autoresponse_type",
    "cost",
)
READABLE_RECIPIENT_FIELDS = ("status", "carrier", "line_type")
READABLE_ERROR_FIELDS = ("code", "title")


def _associated_data(row_id: int) -> uuid.UUID:
    # Ids are positive bigints; modulo 2**128 keeps any integer a row may hold (a negative
    # id written by hand) sealable instead of crashing the batch it is claimed in.
    return uuid.UUID(int=row_id % 2**128)


def _readable(payload: Any) -> dict[str, Any]:
    if not isinstance(payload, dict):
        return {}
    kept = {k: payload[k] for k in READABLE_FIELDS if k in payload}
    if "id" in kept and not isinstance(kept["id"], str | int):
        kept.pop("id")

    def pick(items: Any, fields: tuple[str, ...]) -> list[dict[str, Any]]:
        if not isinstance(items, list):
            return []
        return [{f: i[f] for f in fields if f in i} for i in items if isinstance(i, dict)]

    if "to" in payload:
        kept["to"] = pick(payload["to"], READABLE_RECIPIENT_FIELDS)
    if "errors" in payload:
        kept["errors"] = pick(payload["errors"], READABLE_ERROR_FIELDS)
    return kept


def is_sealed(event: dict[str, Any]) -> bool:
    return isinstance(event.get(SEALED), str)


def seal(cipher: ContactCipher, row_id: int, event: dict[str, Any]) -> dict[str, Any]:
    """The event with its message object encrypted; only non-personal fields readable."""
    if is_sealed(event):
        return event
    data = event.get("data")
    if not isinstance(data, dict):
        data = {}
    secret = json.dumps({"payload": data.get("payload")})
    blob = cipher.encrypt(secret, _associated_data(row_id))
    sealed = {k: v for k, v in event.items() if k != "data"}
    sealed["data"] = {k: v for k, v in data.items() if k != "payload"}
    sealed["data"]["payload"] = _readable(data.get("payload"))
    sealed[SEALED] = base64.b64encode(blob).decode()
    return sealed


def unseal(cipher: ContactCipher, row_id: int, event: dict[str, Any]) -> dict[str, Any]:
    """The event as received; raises `DecryptionError` (a ValueError) if it cannot open."""
    if not is_sealed(event):
        return event
    blob = base64.b64decode(event[SEALED])
    secret = json.loads(cipher.decrypt(blob, _associated_data(row_id)))
    opened = {k: v for k, v in event.items() if k != SEALED}
    data = dict(opened.get("data") or {})
    data["payload"] = secret["payload"]
    opened["data"] = data
    return opened
