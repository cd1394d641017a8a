"""Provisioning a church's sending number: a small state machine over `churches`.

    pending ──(profile, search, order)──▶ ordered ──(order succeeded)──▶ active
       ▲                                     │                             │
       └──────────(order failed)─────────────┘        (number → profile)   ▼
                                                                        assigned

Each call of `provision_step` moves one step. No Telnyx call happens inside a database
transaction (a slow provider must not hold a row lock or a pooled connection): a step
reads the church, calls Telnyx, then applies the answer in a short transaction with the
row locked (`SELECT … FOR NO KEY UPDATE`) only if the church is still where the step
found it (compare-and-set; otherwise another worker moved it and the answer is dropped).
Ordering a number is the one call that must not happen twice: the step first claims the
church (`pending` → `ordering`, committed), orders, then records the order (`ordered`) or
releases the claim (`pending`) on failure. A claim older than `ORDERING_LEASE` (its worker
died mid-call) is released by the next step, logged `number_ordering_abandoned` (check
Telnyx for an order with the church id as `customer_reference`). A step that fails
(Telnyx error, order still pending) raises and leaves the row as it was; calling again
is always safe.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import structlog
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.accounts.tables import Church
from koinonia.db import Database
from koinonia.settings import Settings
from koinonia.telnyx.client import TelnyxClient, TelnyxError

log = structlog.get_logger(__name__)

PENDING = "pending"
ORDERING = "ordering"  # claimed by a step that is ordering a number now
ORDERING_LEASE = timedelta(minutes=2)
ORDERED = "ordered"
ACTIVE = "active"
ASSIGNED = "assigned"
GONE = "gone"  # the church no longer exists: nothing to do

# pending (profile) → pending (claim and order) → ordered → active → assigned, plus one
# failed order.
MAX_STEPS = 6
SEARCH_LIMIT = 5


class ProvisioningError(Exception):
    """A step could not finish now; running it again later may succeed."""


class OrderPendingError(ProvisioningError):
    """Telnyx has not completed the number order yet."""


def last4(number: str | None) -> str | None:
    """What logs may show of a phone number."""
    return number[-4:] if number else None


def webhook_url(settings: Settings) -> str:
    return f"{str(settings.public_base_url).rstrip('/')}/api/v1/webhooks/telnyx"


def _transition(church: Church, before: str, after: str, **extra: Any) -> None:
    church.number_status = after
    log.info(
        "number_transition",
        church_id=str(church.id),
        from_status=before,
        to_status=after,
        number_last4=last4(church.phone_number),
        **extra,
    )


async def _locked_church(session: AsyncSession, church_id: uuid.UUID) -> Church | None:
    # FOR NO KEY UPDATE: serialises provisioning steps without blocking the foreign-key
    # checks (FOR KEY SHARE) of rows inserted for this church meanwhile.
    query = select(Church).where(Church.id == church_id).with_for_update(key_share=True)
    return (await session.execute(query)).scalar_one_or_none()


async def _create_profile(client: TelnyxClient, settings: Settings, church_id: uuid.UUID) -> str:
    body = {
        "name": f"koinonia-{church_id}",
        "enabled": True,
        "webhook_url": webhook_url(settings),
        "webhook_api_version": "2",
        "whitelisted_destinations": ["US"],
    }
    data = (await client.request("POST", "/v2/messaging_profiles", "create_profile", json=body))[
        "data"
    ]
    return str(data["id"])


async def _choose_number(client: TelnyxClient, database: Database) -> str:
    params = {
        "filter[country_code]": "US",
        "filter[features]": "sms",
        "filter[limit]": SEARCH_LIMIT,
    }
    found = await client.request(
        "GET", "/v2/available_phone_numbers", "search_numbers", params=params
    )
    candidates = [str(item["phone_number"]) for item in found.get("data") or []]
    if not candidates:
        raise ProvisioningError("no US number is available")
    async with database.sessions() as session:
        held = set(
            (
                await session.execute(
                    select(Church.phone_number).where(Church.phone_number.in_(candidates))
                )
            ).scalars()
        )
    for number in candidates:
        if number not in held:
            return number
    raise ProvisioningError("every available number is already held by a church")


@dataclass(frozen=True)
class _Seen:
    """What a step read of the church before calling Telnyx."""

    status: str
    phone_number: str | None
    number_order_id: str | None
    messaging_profile_id: str | None
    updated_at: datetime


async def _read(database: Database, church_id: uuid.UUID) -> _Seen | None:
    async with database.sessions() as session:
        church = await session.get(Church, church_id)
        if church is None:
            return None
        return _Seen(
            church.number_status,
            church.phone_number,
            church.number_order_id,
            church.messaging_profile_id,
            church.updated_at,
        )


def _unchanged(church: Church, seen: _Seen) -> bool:
    return (
        church.number_status,
        church.phone_number,
        church.number_order_id,
        church.messaging_profile_id,
    ) == (seen.status, seen.phone_number, seen.number_order_id, seen.messaging_profile_id)


async def _apply(database: Database, church_id: uuid.UUID, seen: _Seen | None, change: Any) -> str:
    """Run `change(church)` on the locked church if it is still as `seen` (or always,
    when `seen` is None); answers the status afterwards."""
    async with database.unit_of_work() as session:
        church = await _locked_church(session, church_id)
        if church is None:
            return GONE
        if seen is not None and not _unchanged(church, seen):
            log.info(
                "number_step_superseded", church_id=str(church_id), status=church.number_status
            )
            return church.number_status
        change(church)
        await session.flush()
        return church.number_status


async def _release_claim(database: Database, church_id: uuid.UUID, reason: str) -> None:
    def release(church: Church) -> None:
        if church.number_status == ORDERING:
            _transition(church, ORDERING, PENDING, reason=reason)

    await _apply(database, church_id, None, release)


async def _step_pending(
    database: Database, settings: Settings, client: TelnyxClient, church_id: uuid.UUID, seen: _Seen
) -> str:
    profile_id = settings.telnyx_messaging_profile_id or seen.messaging_profile_id
    if profile_id is None:
        # Its own step: committed before ordering, so a failed order never makes a second
        # profile. Two steps racing may both create one; only the first is kept.
        created = await _create_profile(client, settings, church_id)

        def keep_profile(church: Church) -> None:
            church.messaging_profile_id = created
            log.info("messaging_profile_created", church_id=str(church_id))

        return await _apply(database, church_id, seen, keep_profile)

    def claim(church: Church) -> None:
        church.messaging_profile_id = profile_id
        _transition(church, PENDING, ORDERING)

    if await _apply(database, church_id, seen, claim) != ORDERING:
        return await _status(database, church_id)  # another step got there first
    try:
        number = await _choose_number(client, database)
        body = {
            "phone_numbers": [{"phone_number": number}],
            "messaging_profile_id": profile_id,
            "customer_reference": str(church_id),
        }
        try:
            order = (await client.request("POST", "/v2/number_orders", "order_number", json=body))[
                "data"
            ]
        except TelnyxError as error:
            if error.status == 422:  # taken between search and order: search again
                raise ProvisioningError(f"number order refused: {error.detail}") from error
            raise
    except BaseException:
        await _release_claim(database, church_id, "order not placed")
        raise

    def record_order(church: Church) -> None:
        church.phone_number = number
        church.number_order_id = str(order["id"])
        _transition(church, ORDERING, ORDERED, order_status=order.get("status"))

    try:
        return await _apply(database, church_id, None, record_order)
    except IntegrityError as error:
        if "phone_number" not in str(error.orig):
            raise
        # Another church holds this number: release the claim; the next step searches again.
        log.warning("number_taken_by_other_church", church_id=str(church_id))
        await _release_claim(database, church_id, "number held by another church")
        return PENDING


async def _status(database: Database, church_id: uuid.UUID) -> str:
    seen = await _read(database, church_id)
    return GONE if seen is None else seen.status


async def _step_ordering(database: Database, church_id: uuid.UUID, seen: _Seen) -> str:
    if datetime.now(UTC) - seen.updated_at < ORDERING_LEASE:
        raise ProvisioningError("another step is ordering a number for this church")
    log.warning("number_ordering_abandoned", church_id=str(church_id))

    def release(church: Church) -> None:
        _transition(church, ORDERING, PENDING, reason="ordering abandoned")

    return await _apply(database, church_id, seen, release)


async def _step_ordered(
    database: Database, client: TelnyxClient, church_id: uuid.UUID, seen: _Seen
) -> str:
    if seen.number_order_id is None:

        def reset(church: Church) -> None:
            church.phone_number = None
            _transition(church, ORDERED, PENDING, reason="no order id")

        return await _apply(database, church_id, seen, reset)
    order = (
        await client.request(
            "GET", f"/v2/number_orders/{quote(seen.number_order_id, safe='')}", "get_order"
        )
    )["data"]
    status = str(order.get("status"))
    if status not in ("success", "failure"):
        raise OrderPendingError(f"number order is {status}")

    def settle(church: Church) -> None:
        if status == "success":
            _transition(church, ORDERED, ACTIVE)
            return
        log.warning(
            "number_order_failed", church_id=str(church.id), number_last4=last4(church.phone_number)
        )
        _transition(church, ORDERED, PENDING, reason="order failed")
        church.phone_number = None
        church.number_order_id = None

    return await _apply(database, church_id, seen, settle)


async def _step_active(
    database: Database, settings: Settings, client: TelnyxClient, church_id: uuid.UUID, seen: _Seen
) -> str:
    profile_id = seen.messaging_profile_id or settings.telnyx_messaging_profile_id
    if seen.phone_number is None or profile_id is None:

        def reset(church: Church) -> None:
            church.phone_number = None
            church.number_order_id = None
            _transition(church, ACTIVE, PENDING, reason="number or profile missing")

        return await _apply(database, church_id, seen, reset)
    await client.request(
        "PATCH",
        f"/v2/phone_numbers/{quote(seen.phone_number, safe='')}/messaging",
        "assign_number",
        json={"messaging_profile_id": profile_id},
    )
    return await _apply(
        database, church_id, seen, lambda church: _transition(church, ACTIVE, ASSIGNED)
    )


async def provision_step(
    database: Database, settings: Settings, client: TelnyxClient, church_id: uuid.UUID
) -> str:
    """Move the church's number one step on; answers the status it is in afterwards.
    Telnyx is called between transactions, never inside one (module docstring)."""
    seen = await _read(database, church_id)
    if seen is None:
        return GONE
    status = seen.status
    if status == PENDING:
        return await _step_pending(database, settings, client, church_id, seen)
    if status == ORDERING:
        return await _step_ordering(database, church_id, seen)
    if status == ORDERED:
        return await _step_ordered(database, client, church_id, seen)
    if status == ACTIVE:
        return await _step_active(database, settings, client, church_id, seen)
    if status == ASSIGNED:
        return ASSIGNED
    log.warning("number_status_unknown", church_id=str(church_id), status=status)

    def reset(church: Church) -> None:
        church.phone_number = None
        church.number_order_id = None
        _transition(church, status, PENDING, reason="unknown status")

    return await _apply(database, church_id, seen, reset)


async def provision(
    database: Database, settings: Settings, client: TelnyxClient, church_id: uuid.UUID
) -> str:
    """Run steps until the number is assigned (or a step raises); answers the status."""
    status = PENDING
    for _ in range(MAX_STEPS):
        status = await provision_step(database, settings, client, church_id)
        if status in (ASSIGNED, GONE):
            return status
    raise ProvisioningError(f"number still {status} after {MAX_STEPS} steps")
