"""Telnyx Messaging v2 as Koinonia uses it: sends, message lookup, signed receipts and
inbound messages, with Telnyx's error shape and fault injection."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from koinonia.messaging.segments import count
from koinonia.sandbox.faults import hang_until_gone, inject, maybe_hang
from koinonia.sandbox.limits import NO_LIMITS, AcceptanceStats, Limits, Throughput
from koinonia.sandbox.signing import telnyx_headers
from koinonia.sandbox.state import SandboxState

router = APIRouter()
# ASCII digits only (`\d` also matches other scripts' digits); used with fullmatch, as
# `$` would let a trailing newline through.
E164 = re.compile(r"\+[1-9][0-9]{7,14}", re.ASCII)
# What Telnyx answers with an injected fault's status.
FAULT_ERRORS = {
    401: ("10009", "Authentication failed"),
    403: ("10010", "Authorization failed"),
    429: ("10011", "Too many requests"),
}


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def telnyx_error(
    status: int, code: str, title: str, detail: str, pointer: str | None = None
) -> JSONResponse:
    error: dict[str, Any] = {"code": code, "title": title, "detail": detail}
    if pointer:
        error["source"] = {"pointer": pointer}
    headers = {"Retry-After": "1"} if status == 429 else None
    return JSONResponse({"errors": [error]}, status_code=status, headers=headers)


def fault_error(status: int) -> JSONResponse:
    code, title = FAULT_ERRORS.get(status, ("10007", "Unexpected error"))
    return telnyx_error(status, code, title, "Sandbox fault")


def _state(request: Request) -> SandboxState:
    state: SandboxState = request.app.state.sandbox
    return state


def _authorised(request: Request, state: SandboxState) -> bool:
    return request.headers.get("authorization", "") == f"Bearer {state.config.telnyx_api_key}"


async def deliver(
    request: Request,
    urls: list[str],
    event_type: str,
    payload: dict[str, Any],
    event_id: str | None = None,
) -> int | None:
    """POST one signed event, retrying then trying the failover URL, as Telnyx does;
    answers the receiver's status (None when nothing answered below 500)."""
    state = _state(request)
    if state.http is None:
        return None
    event = {
        "event_type": event_type,
        "id": event_id or str(uuid.uuid4()),
        "occurred_at": now(),
        "record_type": "event",
        "payload": payload,
    }
    attempt = 0
    for url in urls:
        # Telnyx retries a webhook that got no 2xx for a while before the failover URL;
        # ours rides out a receiver's short outage (a database restart) the same way.
        for pause in state.config.webhook_retry_pauses:
            attempt += 1
            meta = {"attempt": attempt, "delivered_to": url}
            body = json.dumps({"data": event, "meta": meta}).encode()
            headers = telnyx_headers(request.app.state.telnyx_key, body, int(time.time()))
            headers["Content-Type"] = "application/json"
            try:
                async with state.delivery_slots:
                    response = await state.http.post(url, content=body, headers=headers)
                if response.status_code < 500:
                    return response.status_code
            except httpx.HTTPError:  # the receiver is down: try again shortly
                pass
            await asyncio.sleep(pause)
    return None


async def _receipts(
    request: Request, message: dict[str, Any], urls: list[str], leaves_in: float
) -> None:
    """`message.sent` once the text leaves Telnyx's queue, then `message.finalized`."""
    state = _state(request)
    faults = state.faults
    delay_ms = faults.receipt_delay_ms
    delay = (state.config.delivery_delay_ms if delay_ms is None else delay_ms) / 1000
    await asyncio.sleep(leaves_in + delay)
    sent = json.loads(json.dumps(message))
    sent["to"][0]["status"] = "sent"
    sent["sent_at"] = now()
    if faults.reorder_receipts:
        final = _finalized(state, message, sent)
        await _emit(request, urls, "message.finalized", final)
        await asyncio.sleep(delay)
        await _emit(request, urls, "message.sent", sent)
        return
    await _emit(request, urls, "message.sent", sent)
    await asyncio.sleep(delay)
    await _emit(request, urls, "message.finalized", _finalized(state, message, sent))


def _finalized(
    state: SandboxState, message: dict[str, Any], sent: dict[str, Any]
) -> dict[str, Any]:
    """The final receipt; its status is also what `GET /v2/messages/{id}` shows."""
    final: dict[str, Any] = json.loads(json.dumps(sent))
    if state.roll(state.faults.delivery_failure_rate):
        final["to"][0]["status"] = "delivery_failed"
        final["errors"] = [
            {
                "code": "40008",
                "title": "Undeliverable",
                "detail": "The message could not be delivered",
            }
        ]
    else:
        final["to"][0]["status"] = "delivered"
    final["completed_at"] = now()
    final["cost"] = {"amount": f"{0.004 * final['parts']:.4f}", "currency": "USD"}
    message["to"][0]["status"] = final["to"][0]["status"]
    return final


async def _emit(
    request: Request, urls: list[str], event_type: str, payload: dict[str, Any]
) -> None:
    """One receipt; at `duplicate_receipt_rate` the same event (same id) arrives twice."""
    state = _state(request)
    event_id = str(uuid.uuid4())
    for _ in range(2 if state.roll(state.faults.duplicate_receipt_rate) else 1):
        await deliver(request, urls, event_type, payload, event_id)


@router.post("/v2/messages")
async def send_message(request: Request) -> JSONResponse:
    state = _state(request)
    if not _authorised(request, state):
        return telnyx_error(
            401, "10009", "Authentication failed", "The API key is missing or wrong"
        )
    fault = await inject(state)
    if fault is not None:
        return fault_error(fault)
    if state.faults.spend_limit_reached:
        return telnyx_error(
            400, "40333", "Spend limit reached", "The account's spend limit is reached"
        )
    try:
        body = await request.json()
        sender, to, text = str(body["from"]), str(body["to"]), str(body["text"])
    except (ValueError, KeyError, TypeError):
        return telnyx_error(422, "10015", "Invalid request", "from, to and text are required")
    for field, value in (("from", sender), ("to", to)):
        if not E164.fullmatch(value):
            return telnyx_error(
                422,
                "10016",
                "Phone number must be in +E.164 format",
                f"'{field}' is not E.164",
                f"/{field}",
            )
    if sender in state.faults.blocked_numbers:
        return telnyx_error(
            400,
            "40003",
            "Blocked as spam - permanent",
            "The carrier blocks texts from this number as spam",
            "/from",
        )
    if to.endswith("0000"):
        return telnyx_error(
            400, "40300", "Blocked due to STOP message", "The recipient opted out", "/to"
        )
    if to.endswith("0001"):
        return telnyx_error(400, "40001", "Not routable", "A landline", "/to")
    if to.endswith("0002"):
        return telnyx_error(
            400, "40310", "Invalid destination", "The number cannot receive SMS", "/to"
        )
    leaves_in = state.throughput.admit(sender, time.monotonic())
    if leaves_in is None:
        return telnyx_error(
            400, "40318", "Message queue full", "Too many texts queued for this number", "/from"
        )
    state.stats.record(sender, time.time())
    segments = count(text)
    message: dict[str, Any] = {
        "record_type": "message",
        "direction": "outbound",
        "id": str(uuid.uuid4()),
        "type": "SMS",
        "messaging_profile_id": body.get("messaging_profile_id"),
        "from": {"phone_number": sender, "carrier": "Sandbox", "line_type": "Wireless"},
        "to": [
            {"phone_number": to, "status": "queued", "carrier": "Sandbox", "line_type": "Wireless"}
        ],
        "text": text,
        "parts": segments.segments,
        "encoding": segments.encoding,
        "cost": None,
        "received_at": now(),
        "sent_at": None,
        "completed_at": None,
        "valid_until": None,
        "webhook_url": body.get("webhook_url"),
        "errors": [],
    }
    state.telnyx_messages.append(message)
    if state.config.telnyx_receipts:
        urls = _receipt_urls(state, body, sender)
        state.spawn(_receipts(request, message, urls, leaves_in))
    await maybe_hang(state)  # accepted, but the answer may never come: ambiguous
    if state.roll(state.faults.accept_then_hang_rate):
        gone = await hang_until_gone(request, state)
        if not gone:  # a client that waits this long gets a load balancer's answer
            return telnyx_error(504, "10007", "Gateway timeout", "No answer in time")
    return JSONResponse({"data": message})


def _receipt_urls(state: SandboxState, body: dict[str, Any], sender: str) -> list[str]:
    """The message's own URLs, else (unless `use_profile_webhooks` is false) the profile's."""
    if body.get("webhook_url"):
        urls = [body["webhook_url"], body.get("webhook_failover_url")]
        return [str(url) for url in urls if url]
    if body.get("use_profile_webhooks") is False:
        return []
    return state.telnyx_webhook_urls(sender, body.get("messaging_profile_id"))


@router.get("/v2/messages/{message_id}")
async def get_message(message_id: str, request: Request) -> JSONResponse:
    state = _state(request)
    if not _authorised(request, state):
        return telnyx_error(401, "10009", "Authentication failed", "Wrong API key")
    for message in state.telnyx_messages:
        if message["id"] == message_id:
            return JSONResponse({"data": message})
    return telnyx_error(404, "10005", "Resource not found", "No such message")


@router.get("/v2/balance")
async def balance(request: Request) -> JSONResponse:
    state = _state(request)
    if not _authorised(request, state):
        return telnyx_error(401, "10009", "Authentication failed", "Wrong API key")
    fault = await inject(state)  # the health probe sees an outage too
    if fault is not None:
        return fault_error(fault)
    return JSONResponse(
        {"data": {"record_type": "balance", "balance": "100.00", "currency": "USD"}}
    )


@router.post("/sandbox/inbound", tags=["sandbox"])
async def inbound(request: Request) -> JSONResponse:
    """A phone texts a church number: a signed `message.received` goes to the app."""
    try:
        body = await request.json()
        sender, to, text = str(body["from"]), str(body["to"]), str(body["text"])
    except (ValueError, KeyError, TypeError):
        return JSONResponse({"detail": "send {from, to, text}"}, status_code=422)
    payload = {
        "record_type": "message",
        "direction": "inbound",
        "id": str(uuid.uuid4()),
        "type": "SMS",
        "from": {"phone_number": sender, "carrier": "Sandbox", "line_type": "Wireless"},
        "to": [{"phone_number": to, "status": "webhook_delivered"}],
        "text": text,
        "media": [],
        "received_at": now(),
        "parts": count(text).segments,
        "encoding": count(text).encoding,
        "errors": [],
    }
    urls = _state(request).telnyx_webhook_urls(to, None)
    status = await deliver(request, urls, "message.received", payload)
    return JSONResponse({"id": payload["id"], "delivered_status": status}, status_code=202)


@router.get("/sandbox/messages", tags=["sandbox"])
async def accepted_messages(request: Request, to: str | None = None) -> JSONResponse:
    """Every SMS accepted, in order, so a test can count what a phone really received."""
    messages = _state(request).telnyx_messages
    return JSONResponse(
        {"data": [m for m in messages if to is None or m["to"][0]["phone_number"] == to]}
    )


@router.delete("/sandbox/messages", status_code=204, tags=["sandbox"])
async def clear_messages(request: Request) -> None:
    _state(request).telnyx_messages.clear()


@router.get("/sandbox/limits", tags=["sandbox"])
async def get_limits(request: Request) -> Limits:
    return _state(request).throughput.limits


@router.post("/sandbox/limits", tags=["sandbox"])
async def set_limits(limits: Limits, request: Request) -> Limits:
    """Telnyx's throughput limits from now on; the queues start empty."""
    _state(request).throughput = Throughput(limits)
    return limits


@router.delete("/sandbox/limits", status_code=204, tags=["sandbox"])
async def clear_limits(request: Request) -> None:
    _state(request).throughput = Throughput(NO_LIMITS)


@router.get("/sandbox/stats", tags=["sandbox"])
async def send_stats(request: Request) -> JSONResponse:
    """Texts accepted per second of arrival, account-wide and per sending number, and
    how many each number has waiting in Telnyx's queue now."""
    state = _state(request)
    queued = state.throughput.queued(time.monotonic())
    return JSONResponse(state.stats.report() | {"queued": queued})


@router.delete("/sandbox/stats", status_code=204, tags=["sandbox"])
async def clear_stats(request: Request) -> None:
    _state(request).stats = AcceptanceStats()
