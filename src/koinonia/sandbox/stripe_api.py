"""The Stripe endpoints Koinonia calls, with Stripe's form encoding, errors, idempotency
and signed events."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from typing import Any

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from koinonia.sandbox.faults import inject
from koinonia.sandbox.signing import stripe_signature
from koinonia.sandbox.state import SandboxState, new_id

router = APIRouter()


def _state(request: Request) -> SandboxState:
    state: SandboxState = request.app.state.sandbox
    return state


def stripe_error(
    status: int,
    message: str,
    *,
    kind: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
) -> JSONResponse:
    error: dict[str, Any] = {"type": kind, "message": message}
    if code:
        error["code"] = code
    if param:
        error["param"] = param
    return JSONResponse({"error": error}, status_code=status)


def _authorised(request: Request, state: SandboxState) -> bool:
    header = request.headers.get("authorization", "")
    return header == f"Bearer {state.config.stripe_api_key}"


async def _params(request: Request) -> dict[str, str]:
    form = await request.form()
    return {key: str(value) for key, value in form.items()}


async def _guarded(request: Request) -> tuple[SandboxState, dict[str, str], JSONResponse | None]:
    state = _state(request)
    if not _authorised(request, state):
        return state, {}, stripe_error(401, "Invalid API Key provided", code="api_key_invalid")
    fault = await inject(state)
    if fault is not None:
        return state, {}, stripe_error(fault, "Sandbox fault", kind="api_error")
    return state, await _params(request), None


def _replay(
    request: Request, state: SandboxState, params: dict[str, str]
) -> tuple[str | None, JSONResponse | None]:
    key = request.headers.get("idempotency-key")
    if not key:
        return None, None
    fingerprint = hashlib.sha256(
        (request.url.path + json.dumps(params, sort_keys=True)).encode()
    ).hexdigest()
    saved = state.idempotency.get(key)
    if saved is None:
        return key, None
    if saved[0] != fingerprint:
        return key, stripe_error(
            400,
            "Keys for idempotent requests can only be used with the same parameters "
            "they were first used with.",
            kind="idempotency_error",
        )
    return key, JSONResponse(
        saved[2], status_code=saved[1], headers={"Idempotent-Replayed": "true"}
    )


def _save(
    request: Request,
    state: SandboxState,
    key: str | None,
    params: dict[str, str],
    body: dict[str, Any],
) -> JSONResponse:
    if key:
        fingerprint = hashlib.sha256(
            (request.url.path + json.dumps(params, sort_keys=True)).encode()
        ).hexdigest()
        state.idempotency[key] = (fingerprint, 200, body)
    return JSONResponse(body)


def _metadata(params: dict[str, str], prefix: str = "metadata") -> dict[str, str]:
    start = f"{prefix}["
    return {k[len(start) : -1]: v for k, v in params.items() if k.startswith(start)}


@router.post("/v1/customers")
async def create_customer(request: Request) -> JSONResponse:
    state, params, refused = await _guarded(request)
    if refused:
        return refused
    key, replay = _replay(request, state, params)
    if replay:
        return replay
    customer: dict[str, Any] = {
        "id": new_id("cus"),
        "object": "customer",
        "created": int(time.time()),
        "email": params.get("email"),
        "name": params.get("name"),
        "metadata": _metadata(params),
        "livemode": False,
    }
    state.stripe_objects[str(customer["id"])] = customer
    return _save(request, state, key, params, customer)


@router.get("/v1/customers/{customer_id}")
async def get_customer(customer_id: str, request: Request) -> JSONResponse:
    state, _, refused = await _guarded(request)
    if refused:
        return refused
    return _found(state, customer_id, "customer")


def _found(state: SandboxState, object_id: str, what: str) -> JSONResponse:
    found = state.stripe_objects.get(object_id)
    if found is None:
        return stripe_error(
            404, f"No such {what}: '{object_id}'", code="resource_missing", param="id"
        )
    return JSONResponse(found)


@router.post("/v1/checkout/sessions")
async def create_checkout_session(request: Request) -> JSONResponse:
    state, params, refused = await _guarded(request)
    if refused:
        return refused
    key, replay = _replay(request, state, params)
    if replay:
        return replay
    for required in ("success_url", "line_items[0][price]"):
        if not params.get(required):
            return stripe_error(400, f"Missing required param: {required}.", param=required)
    if params.get("mode") != "subscription":
        return stripe_error(400, "Only mode=subscription is played here.", param="mode")
    session_id = new_id("cs_test")
    session = {
        "id": session_id,
        "object": "checkout.session",
        "created": int(time.time()),
        "mode": "subscription",
        "status": "open",
        "customer": params.get("customer"),
        "client_reference_id": params.get("client_reference_id"),
        "success_url": params["success_url"],
        "cancel_url": params.get("cancel_url"),
        "metadata": _metadata(params),
        "subscription_metadata": _metadata(params, "subscription_data[metadata]"),
        "price": params["line_items[0][price]"],
        "subscription": None,
        "url": f"{state.config.public_base_url}/sandbox/stripe/checkout/{session_id}",
        "livemode": False,
    }
    state.stripe_objects[session_id] = session
    return _save(
        request,
        state,
        key,
        params,
        {k: v for k, v in session.items() if k not in ("price", "subscription_metadata")},
    )


@router.post("/v1/billing_portal/sessions")
async def create_portal_session(request: Request) -> JSONResponse:
    state, params, refused = await _guarded(request)
    if refused:
        return refused
    key, replay = _replay(request, state, params)
    if replay:
        return replay
    customer = params.get("customer", "")
    if customer not in state.stripe_objects:
        return stripe_error(
            400, f"No such customer: '{customer}'", code="resource_missing", param="customer"
        )
    portal_id = new_id("bps")
    portal = {
        "id": portal_id,
        "object": "billing_portal.session",
        "created": int(time.time()),
        "customer": customer,
        "return_url": params.get("return_url"),
        "url": f"{state.config.public_base_url}/sandbox/stripe/portal/{portal_id}",
        "livemode": False,
    }
    return _save(request, state, key, params, portal)


@router.get("/v1/subscriptions/{subscription_id}")
async def get_subscription(subscription_id: str, request: Request) -> JSONResponse:
    state, _, refused = await _guarded(request)
    if refused:
        return refused
    return _found(state, subscription_id, "subscription")


@router.get("/v1/balance")
async def balance(request: Request) -> JSONResponse:
    _, _, refused = await _guarded(request)
    if refused:
        return refused
    return JSONResponse(
        {"object": "balance", "available": [{"amount": 0, "currency": "usd"}], "livemode": False}
    )


def subscription_object(
    state: SandboxState,
    *,
    customer: str,
    price: str,
    metadata: dict[str, str],
    status: str = "active",
) -> dict[str, Any]:
    now = int(time.time())
    period_end = now + 30 * 86400
    subscription = {
        "id": new_id("sub"),
        "object": "subscription",
        "created": now,
        "customer": customer,
        "status": status,
        "cancel_at_period_end": False,
        "metadata": metadata,
        "items": {
            "object": "list",
            "data": [
                {
                    "id": new_id("si"),
                    "object": "subscription_item",
                    "price": {"id": price, "object": "price"},
                    "current_period_start": now,
                    "current_period_end": period_end,
                }
            ],
        },
        "livemode": False,
    }
    state.stripe_objects[str(subscription["id"])] = subscription
    return subscription


async def emit_event(
    state: SandboxState, event_type: str, obj: dict[str, Any], event_id: str | None = None
) -> tuple[str, int | None]:
    """Sign and deliver one event; answers (event id, the app's status or None)."""
    identifier = event_id or new_id("evt")
    event: dict[str, Any] = {
        "id": identifier,
        "object": "event",
        "type": event_type,
        "created": int(time.time()),
        "livemode": False,
        "api_version": "2025-03-31.basil",
        "data": {"object": obj},
    }
    state.stripe_events.append(event)
    url = state.config.stripe_webhook_url
    if not url or state.http is None:
        return identifier, None
    body = json.dumps(event).encode()
    for attempt in range(3):  # only a receiver that does not answer is retried here
        signature = stripe_signature(state.config.stripe_webhook_secret, body, int(time.time()))
        headers = {"Stripe-Signature": signature, "Content-Type": "application/json"}
        try:
            response = await state.http.post(url, content=body, headers=headers)
        except httpx.HTTPError:
            await asyncio.sleep(0.1 * (attempt + 1))
            continue
        return identifier, response.status_code
    return identifier, None


@router.post("/sandbox/stripe/checkout/{session_id}/complete", tags=["sandbox"])
async def complete_checkout(session_id: str, request: Request) -> JSONResponse:
    """Play the customer paying: a subscription appears and its events are sent."""
    state = _state(request)
    session = state.stripe_objects.get(session_id)
    if session is None or session["object"] != "checkout.session":
        return stripe_error(404, "No such checkout session", code="resource_missing")
    customer = session["customer"] or new_id("cus")
    state.stripe_objects.setdefault(customer, {"id": customer, "object": "customer"})
    metadata = {**session["metadata"], **session["subscription_metadata"]}
    subscription = subscription_object(
        state, customer=customer, price=session["price"], metadata=metadata
    )
    session.update(status="complete", customer=customer, subscription=subscription["id"])
    public = {k: v for k, v in session.items() if k not in ("price", "subscription_metadata")}
    statuses = {}
    for event_type, obj in (
        ("checkout.session.completed", public),
        ("customer.subscription.created", subscription),
        ("invoice.paid", _invoice(subscription, paid=True)),
    ):
        _, statuses[event_type] = await emit_event(state, event_type, obj)
    return JSONResponse({"subscription": subscription["id"], "deliveries": statuses})


def _invoice(subscription: dict[str, Any], *, paid: bool) -> dict[str, Any]:
    item = subscription["items"]["data"][0]
    return {
        "id": new_id("in"),
        "object": "invoice",
        "customer": subscription["customer"],
        "status": "paid" if paid else "open",
        "amount_paid": 2900 if paid else 0,
        "attempt_count": 1,
        "period_start": item["current_period_start"],
        "period_end": item["current_period_end"],
        "parent": {
            "subscription_details": {
                "subscription": subscription["id"],
                "metadata": subscription["metadata"],
            }
        },
        "livemode": False,
    }


@router.post("/sandbox/stripe/events", tags=["sandbox"])
async def send_event(request: Request) -> JSONResponse:
    """Emit a signed event: `{"type": "...", "data": {"object": {...}}, "id"?: "evt_..."}`."""
    state = _state(request)
    try:
        payload = await request.json()
        event_type = str(payload["type"])
        obj = dict(payload.get("data", {}).get("object", {}))
    except (ValueError, KeyError, TypeError, AttributeError):
        return JSONResponse({"detail": "send {type, data: {object}}"}, status_code=422)
    event_id, delivered = await emit_event(state, event_type, obj, payload.get("id"))
    return JSONResponse({"id": event_id, "delivered_status": delivered}, status_code=202)
