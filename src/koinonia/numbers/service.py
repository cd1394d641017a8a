"""Provisioning a church's sending number: a small state machine over `churches`.

    pending ──(profile, search, order)──▶ ordered ──(order succeeded)──▶ active
       ▲                                     │                             │
       └──────────(order failed)─────────────┘        (number → profile)   ▼
                                                                        assigned

Each call of `provision_step` moves one step, in its own transaction, with the church's
row locked (`SELECT … FOR NO KEY UPDATE`) while it decides and talks to Telnyx, so two workers
never order two numbers for one church. A step that fails (Telnyx error, order still
pending) raises and leaves the row as it was; calling again is always safe.
"""

from __future__ import annotations

import uuid
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
ORDERED = "ordered"
ACTIVE = "active"
ASSIGNED = "assigned"
GONE = "gone"  # the church no longer exists: nothing to do

# pending (profile) → pending (order) → ordered → active → assigned, plus one failed order.
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


async def _choose_number(client: TelnyxClient, session: AsyncSession) -> str:
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


async def _step_pending(
    session: AsyncSession, settings: Settings, client: TelnyxClient, church: Church
) -> None:
    profile_id = settings.telnyx_messaging_profile_id or church.messaging_profile_id
    if profile_id is None:
        # Its own step: committed before ordering, so a failed order never makes a second one.
        church.messaging_profile_id = await _create_profile(client, settings, church.id)
        log.info("messaging_profile_created", church_id=str(church.id))
        return
    church.messaging_profile_id = profile_id
    number = await _choose_number(client, session)
    body = {
        "phone_numbers": [{"phone_number": number}],
        "messaging_profile_id": profile_id,
        "customer_reference": str(church.id),
    }
    try:
        order = (await client.request("POST", "/v2/number_orders", "order_number", json=body))[
            "data"
        ]
    except TelnyxError as error:
        if error.status == 422:  # taken between search and order: search again
            raise ProvisioningError(f"number order refused: {error.detail}") from error
        raise
    church.phone_number = number
    church.number_order_id = str(order["id"])
    _transition(church, PENDING, ORDERED, order_status=order.get("status"))


async def _step_ordered(client: TelnyxClient, church: Church) -> None:
    if church.number_order_id is None:
        church.phone_number = None
        _transition(church, ORDERED, PENDING, reason="no order id")
        return
    order = (
        await client.request(
            "GET", f"/v2/number_orders/{quote(church.number_order_id, safe='')}", "get_order"
        )
    )["data"]
    status = str(order.get("status"))
    if status == "success":
        _transition(church, ORDERED, ACTIVE)
    elif status == "failure":
        log.warning(
            "number_order_failed", church_id=str(church.id), number_last4=last4(church.phone_number)
        )
        _transition(church, ORDERED, PENDING, reason="order failed")
        church.phone_number = None
        church.number_order_id = None
    else:
        raise OrderPendingError(f"number order is {status}")


async def _step_active(settings: Settings, client: TelnyxClient, church: Church) -> None:
    profile_id = church.messaging_profile_id or settings.telnyx_messaging_profile_id
    if church.phone_number is None or profile_id is None:
        church.phone_number = None
        church.number_order_id = None
        _transition(church, ACTIVE, PENDING, reason="number or profile missing")
        return
    await client.request(
        "PATCH",
        f"/v2/phone_numbers/{quote(church.phone_number, safe='')}/messaging",
        "assign_number",
        json={"messaging_profile_id": profile_id},
    )
    _transition(church, ACTIVE, ASSIGNED)


async def provision_step(
    database: Database, settings: Settings, client: TelnyxClient, church_id: uuid.UUID
) -> str:
    """Move the church's number one step on; answers the status it is in afterwards."""
    try:
        async with database.unit_of_work() as session:
            church = await _locked_church(session, church_id)
            if church is None:
                return GONE
            status = church.number_status
            if status == PENDING:
                await _step_pending(session, settings, client, church)
            elif status == ORDERED:
                await _step_ordered(client, church)
            elif status == ACTIVE:
                await _step_active(settings, client, church)
            elif status != ASSIGNED:
                log.warning("number_status_unknown", church_id=str(church_id), status=status)
                church.phone_number = None
                church.number_order_id = None
                _transition(church, status, PENDING, reason="unknown status")
            await session.flush()
            return church.number_status
    except IntegrityError as error:
        if "phone_number" not in str(error.orig):
            raise
        # Another church holds this number: the transaction rolled back, so the church is
        # still pending; the next step searches again.
        log.warning("number_taken_by_other_church", church_id=str(church_id))
        return PENDING


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
