"""The suppression list: "STOP always wins".

An inbound opt-out keyword (`STOP`, `STOPALL`, `UNSUBSCRIBE`, `CANCEL`, `END`, `QUIT`,
`REVOKE`, `OPT OUT`, …; `keywords.classify`) is recorded here by the webhook endpoint in
the same statement that stores the event (`telnyx/event_writer.py`), so once Telnyx has
its 2xx the opt-out is durable, whatever happens to the rest of the event's application
(member state, confirmation text, conversation). An opt-in keyword (`START`, `UNSTOP`,
`YES`) lifts it when the event is applied (`telnyx/events.py`), and only if it is later
than the opt-out: a late `START` never undoes a newer `STOP`.

Rows are keyed by the sending number the phone texted and `phone_hmac`: HMAC-SHA256 with
the member HMAC key over a domain prefix and the E.164 phone. Unlike the members' blind
index it does not depend on the church (the endpoint does not know it), and the domain
prefix keeps it unrelated to every other hash made with that key. Phones are never
stored in clear.

Senders call `suppressed()` right before each send chunk and skip what it returns.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.messaging.keywords import Keyword, classify
from koinonia.settings import Settings

DOMAIN = b"suppression:"
INBOUND = "message.received"


def suppression_key(settings: Settings) -> bytes:
    return settings.member_hmac_key.get_secret_value().encode()


def phone_hmac(key: bytes, e164: str) -> bytes:
    """The keyed hash of an E.164 phone, the same for every church."""
    return hmac.new(key, DOMAIN + e164.strip().encode(), hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class InboundKeyword:
    """A compliance keyword texted to `sender` (our number) by the phone hashed `phone_hmac`."""

    keyword: Keyword
    sender: str
    phone_hmac: bytes
    at: datetime | None  # the event's `occurred_at`, when it has a valid one


def event_time(event: Mapping[str, Any]) -> datetime | None:
    """`data.occurred_at` of a Telnyx event (aware), or None when absent or malformed."""
    data = event.get("data")
    value = data.get("occurred_at") if isinstance(data, Mapping) else None
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def inbound_keyword(event: Mapping[str, Any], key: bytes) -> InboundKeyword | None:
    """The opt-out / opt-in / help keyword an inbound `message.received` event carries."""
    data = event.get("data")
    if not isinstance(data, Mapping) or data.get("event_type") != INBOUND:
        return None
    payload = data.get("payload")
    if not isinstance(payload, Mapping) or not isinstance(payload.get("text"), str):
        return None
    keyword = classify(payload["text"])
    if keyword is None:
        return None
    try:
        phone = payload["from"]["phone_number"]
        sender = payload["to"][0]["phone_number"]
    except (KeyError, TypeError, IndexError):
        return None
    if not isinstance(phone, str) or not isinstance(sender, str) or not phone or not sender:
        return None
    return InboundKeyword(keyword, sender.strip(), phone_hmac(key, phone), event_time(event))


async def suppressed(
    session: AsyncSession, settings: Settings, sender: str, phones: list[str]
) -> set[str]:
    """Which of `phones` (E.164) opted out of `sender` (one query)."""
    if not phones:
        return set()
    key = suppression_key(settings)
    by_hmac: dict[bytes, list[str]] = {}
    for phone in phones:
        by_hmac.setdefault(phone_hmac(key, phone), []).append(phone)
    rows = await session.execute(
        text(
            "SELECT phone_hmac FROM suppressions "
            "WHERE sender_number = :sender AND phone_hmac = ANY(CAST(:hmacs AS bytea[]))"
        ),
        {"sender": sender.strip(), "hmacs": list(by_hmac)},
    )
    return {phone for (found,) in rows for phone in by_hmac.get(bytes(found), ())}


async def record_opt_outs(
    session: AsyncSession,
    settings: Settings,
    sender: str,
    phones: Iterable[str],
    *,
    source: str,
    at: datetime | None = None,
) -> None:
    """Suppress `phones` for `sender` in the caller's transaction (e.g. Telnyx `40300`:
    source `provider`). A newer opt-out time wins over an older one."""
    key = suppression_key(settings)
    hmacs = sorted({phone_hmac(key, phone) for phone in phones})
    if not hmacs:
        return
    await session.execute(
        text(
            "INSERT INTO suppressions (sender_number, phone_hmac, opted_out_at, source) "
            "SELECT :sender, h, :at, :source FROM unnest(CAST(:hmacs AS bytea[])) AS u(h) "
            "ON CONFLICT (sender_number, phone_hmac) DO UPDATE SET "
            "source = CASE WHEN EXCLUDED.opted_out_at > suppressions.opted_out_at "
            "THEN EXCLUDED.source ELSE suppressions.source END, "
            "opted_out_at = GREATEST(suppressions.opted_out_at, EXCLUDED.opted_out_at)"
        ),
        {
            "sender": sender.strip(),
            "hmacs": hmacs,
            "at": at or datetime.now(UTC),
            "source": source,
        },
    )


async def lift(
    session: AsyncSession, sender: str, hmac_value: bytes, opted_in_at: datetime
) -> bool:
    """An opt-in at `opted_in_at` lifts an older suppression (never a newer one: a STOP
    texted after this START wins). Answers whether a suppression was lifted."""
    deleted = await session.execute(
        text(
            "DELETE FROM suppressions WHERE sender_number = :sender AND phone_hmac = :hmac "
            "AND opted_out_at < :at RETURNING 1"
        ),
        {"sender": sender, "hmac": hmac_value, "at": opted_in_at},
    )
    return deleted.first() is not None
