"""Telnyx numbers and messaging profiles as Koinonia uses them: search, order, and point a
number's messages (receipts and inbound) at a profile's webhook URL."""

from __future__ import annotations

import threading
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from koinonia.sandbox.faults import inject
from koinonia.sandbox.state import SandboxState
from koinonia.sandbox.telnyx_api import E164, now, telnyx_error

router = APIRouter()

# Fictional but valid NANP numbers (NPA-555-01XX), so libphonenumber accepts them.
AREA_CODES = (
    "415", "212", "312", "512", "615", "206", "303", "404", "617", "720",
    "213", "214", "305", "469", "503", "602", "702", "713", "801", "919",
)  # fmt: skip


class NumberPool:
    """Hands out each fictional number at most once per process."""

    def __init__(self) -> None:
        self._issued: set[str] = set()
        self._lock = threading.Lock()

    def take(self, limit: int, area_code: str | None = None) -> list[str]:
        taken: list[str] = []
        with self._lock:
            for npa in (area_code,) if area_code else AREA_CODES:
                for line in range(100, 200):
                    number = f"+1{npa}5550{line}"
                    if len(taken) >= limit:
                        return taken
                    if number not in self._issued:
                        self._issued.add(number)
                        taken.append(number)
        return taken


POOL = NumberPool()


async def _guarded(request: Request) -> tuple[SandboxState, JSONResponse | None]:
    state: SandboxState = request.app.state.sandbox
    if request.headers.get("authorization", "") != f"Bearer {state.config.telnyx_api_key}":
        return state, telnyx_error(401, "10009", "Authentication failed", "Wrong API key")
    fault = await inject(state)
    if fault is not None:
        return state, telnyx_error(fault, "10007", "Unexpected error", "Sandbox fault")
    return state, None


async def _json(request: Request) -> dict[str, Any] | None:
    try:
        body = await request.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _invalid(detail: str, pointer: str) -> JSONResponse:
    return telnyx_error(422, "10015", "Bad Request", detail, pointer)


def _available(number: str) -> dict[str, Any]:
    return {
        "record_type": "available_phone_number",
        "phone_number": number,
        "vanity_format": None,
        "best_effort": False,
        "quickship": True,
        "reservable": True,
        "region_information": [
            {"region_type": "country_code", "region_name": "US"},
            {"region_type": "rate_center", "region_name": "SANDBOX"},
        ],
        "cost_information": {"upfront_cost": "1.00", "monthly_cost": "1.00", "currency": "USD"},
        "features": [{"name": "sms"}, {"name": "mms"}, {"name": "voice"}],
    }


@router.get("/v2/available_phone_numbers")
async def available_numbers(request: Request) -> JSONResponse:
    """`filter[country_code]` (US only here), `filter[national_destination_code]`,
    `filter[limit]`."""
    _, refused = await _guarded(request)
    if refused:
        return refused
    query = request.query_params
    area_code = query.get("filter[national_destination_code]")
    try:
        limit = max(1, min(int(query.get("filter[limit]", "10")), 100))
    except ValueError:
        return _invalid("filter[limit] must be a number", "/filter/limit")
    numbers: list[str] = []
    if query.get("filter[country_code]", "US").upper() == "US":
        numbers = POOL.take(limit, area_code if area_code and area_code.isdigit() else None)
    data = [_available(number) for number in numbers]
    return JSONResponse({"data": data, "meta": {"total_results": len(data)}})


def _phone_number(number: str, profile_id: str | None) -> dict[str, Any]:
    return {
        "record_type": "phone_number",
        "id": str(uuid.uuid4().int >> 64),  # Telnyx number ids are numeric strings
        "phone_number": number,
        "status": "active",
        "messaging_profile_id": profile_id,
        "country_code": "US",
        "type": "long-code",
        "created_at": now(),
        "updated_at": now(),
    }


@router.post("/v2/number_orders")
async def order_numbers(request: Request) -> JSONResponse:
    state, refused = await _guarded(request)
    if refused:
        return refused
    body = await _json(request)
    wanted = body.get("phone_numbers") if body else None
    if not isinstance(wanted, list) or not wanted:
        return _invalid("phone_numbers must list at least one number", "/phone_numbers")
    profile_id = body.get("messaging_profile_id") if body else None
    if profile_id is not None and profile_id not in state.telnyx_profiles:
        return _invalid("No such messaging profile", "/messaging_profile_id")
    numbers = [item.get("phone_number") if isinstance(item, dict) else None for item in wanted]
    for index, number in enumerate(numbers):
        if not isinstance(number, str) or not E164.match(number):
            return _invalid("phone_number must be in +E.164 format", f"/phone_numbers/{index}")
        if number in state.telnyx_numbers:
            return _invalid(f"{number} is not available", f"/phone_numbers/{index}")
    ordered = []
    for number in numbers:
        record = _phone_number(str(number), profile_id)
        state.telnyx_numbers[record["phone_number"]] = record
        ordered.append(
            {
                "id": record["id"],
                "record_type": "number_order_phone_number",
                "phone_number": number,
                "regulatory_requirements": [],
                "requirements_met": True,
                "status": "success",
            }
        )
    order: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "record_type": "number_order",
        "phone_numbers_count": len(ordered),
        "phone_numbers": ordered,
        "messaging_profile_id": profile_id,
        "connection_id": None,
        "customer_reference": body.get("customer_reference") if body else None,
        "status": "success",
        "requirements_met": True,
        "created_at": now(),
        "updated_at": now(),
    }
    state.telnyx_orders[order["id"]] = order
    return JSONResponse({"data": order})


@router.get("/v2/number_orders/{order_id}")
async def get_order(order_id: str, request: Request) -> JSONResponse:
    state, refused = await _guarded(request)
    if refused:
        return refused
    order = state.telnyx_orders.get(order_id)
    if order is None:
        return telnyx_error(404, "10005", "Resource not found", "No such number order")
    return JSONResponse({"data": order})


_PROFILE_FIELDS = ("name", "webhook_url", "webhook_failover_url", "enabled")


@router.post("/v2/messaging_profiles")
async def create_profile(request: Request) -> JSONResponse:
    state, refused = await _guarded(request)
    if refused:
        return refused
    body = await _json(request)
    if not body or not isinstance(body.get("name"), str) or not body["name"]:
        return _invalid("name is required", "/name")
    profile: dict[str, Any] = {
        "record_type": "messaging_profile",
        "id": str(uuid.uuid4()),
        "name": body["name"],
        "enabled": bool(body.get("enabled", True)),
        "webhook_url": body.get("webhook_url"),
        "webhook_failover_url": body.get("webhook_failover_url"),
        "webhook_api_version": "2",
        "whitelisted_destinations": body.get("whitelisted_destinations", ["US"]),
        "created_at": now(),
        "updated_at": now(),
    }
    state.telnyx_profiles[profile["id"]] = profile
    return JSONResponse({"data": profile})


@router.get("/v2/messaging_profiles/{profile_id}")
async def get_profile(profile_id: str, request: Request) -> JSONResponse:
    state, refused = await _guarded(request)
    if refused:
        return refused
    profile = state.telnyx_profiles.get(profile_id)
    if profile is None:
        return telnyx_error(404, "10005", "Resource not found", "No such messaging profile")
    return JSONResponse({"data": profile})


@router.patch("/v2/messaging_profiles/{profile_id}")
async def update_profile(profile_id: str, request: Request) -> JSONResponse:
    state, refused = await _guarded(request)
    if refused:
        return refused
    profile = state.telnyx_profiles.get(profile_id)
    if profile is None:
        return telnyx_error(404, "10005", "Resource not found", "No such messaging profile")
    body = await _json(request) or {}
    profile.update({k: v for k, v in body.items() if k in _PROFILE_FIELDS}, updated_at=now())
    return JSONResponse({"data": profile})


def _find_number(state: SandboxState, id_or_e164: str) -> dict[str, Any] | None:
    if id_or_e164 in state.telnyx_numbers:
        return state.telnyx_numbers[id_or_e164]
    return next((n for n in state.telnyx_numbers.values() if n["id"] == id_or_e164), None)


@router.patch("/v2/phone_numbers/{id_or_e164}/messaging")
async def set_number_messaging(id_or_e164: str, request: Request) -> JSONResponse:
    """Attach a number to a messaging profile (whose webhooks then apply to it)."""
    state, refused = await _guarded(request)
    if refused:
        return refused
    number = _find_number(state, id_or_e164)
    if number is None:
        return telnyx_error(404, "10005", "Resource not found", "No such phone number")
    body = await _json(request) or {}
    profile_id = body.get("messaging_profile_id")
    if profile_id is not None and profile_id not in state.telnyx_profiles:
        return _invalid("No such messaging profile", "/messaging_profile_id")
    number.update(messaging_profile_id=profile_id, updated_at=now())
    return JSONResponse({"data": _settings(number)})


def _settings(number: dict[str, Any]) -> dict[str, Any]:
    return {
        "record_type": "messaging_settings",
        "id": number["id"],
        "phone_number": number["phone_number"],
        "messaging_profile_id": number["messaging_profile_id"],
        "country_code": "US",
        "type": "long-code",
        "eligible_messaging_products": ["A2P"],
        "created_at": number["created_at"],
        "updated_at": number["updated_at"],
    }


@router.get("/v2/phone_numbers/{id_or_e164}/messaging")
async def get_number_messaging(id_or_e164: str, request: Request) -> JSONResponse:
    state, refused = await _guarded(request)
    if refused:
        return refused
    number = _find_number(state, id_or_e164)
    if number is None:
        return telnyx_error(404, "10005", "Resource not found", "No such phone number")
    return JSONResponse({"data": _settings(number)})
