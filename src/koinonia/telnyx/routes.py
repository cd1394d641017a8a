"""`POST /webhooks/telnyx`: verify, store once, answer fast; workers apply the events."""

from __future__ import annotations

from typing import Annotated, Any

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi import Query, Request
from pydantic import BaseModel

from koinonia import provider_json
from koinonia.errors import AppError, problem_responses
from koinonia.http.routing import FeatureRouter
from koinonia.settings import Settings
from koinonia.telnyx import signatures
from koinonia.telnyx.event_writer import EventWriter

router = FeatureRouter(prefix="/api/v1/webhooks", tags=["webhooks"])
log = structlog.get_logger(__name__)


class MalformedEventError(AppError):
    """Correctly signed, but not a Telnyx event at all (no `data.id`/`data.event_type`)."""

    status = 400
    code = "malformed_event"
    title = "The webhook payload is not a valid event"


class TelnyxAck(BaseModel):
    received: bool
    duplicate: bool


def _keys(request: Request) -> list[Ed25519PublicKey]:
    cached: list[Ed25519PublicKey] | None = getattr(request.app.state, "telnyx_keys", None)
    if cached is None:
        settings: Settings = request.app.state.settings
        cached = []
        for position, encoded in enumerate(settings.telnyx_public_key.split(","), start=1):
            if not encoded.strip():
                continue
            try:  # settings refuse a malformed key; this keeps a bad one from ever 500-ing
                cached.append(signatures.load_public_key(encoded.strip()))
            except ValueError:
                log.error("telnyx_public_key_malformed", entry=position)
        request.app.state.telnyx_keys = cached
    return cached


def _event(body: bytes) -> dict[str, Any]:
    """The signed event, storable (provider_json); a 400 for one that is not an event.

    Only the envelope is checked here: a payload of the wrong shape is stored and
    acknowledged, and the workers settle it (events.py: malformed → dead letter)."""
    try:
        event = provider_json.loads(body)
        data = event["data"]
        if not isinstance(data["id"], str) or not isinstance(data["event_type"], str):
            raise TypeError
        if not data["id"].strip() or not data["event_type"].strip():
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise MalformedEventError("The payload is not a Telnyx event") from None
    return dict(event)


@router.post(
    "/telnyx",
    summary="Telnyx webhook (receipts and inbound SMS)",
    description="Verifies the Ed25519 signature over `telnyx-timestamp|raw body` (5-minute "
    "window) before touching anything, stores the event once per event id and answers at "
    "once; workers apply stored events in batches. An opt-out keyword (STOP, …) is "
    "suppressed in the same statement that stores its event. `503 service_unavailable` "
    "(with `Retry-After`) within about 2 s when the event cannot be stored; Telnyx retries "
    "it. `ref` is the reference Koinonia put in a send's `webhook_url`.",
    responses=problem_responses(400, 401, 413, 429, 503),
)
async def telnyx_webhook(
    request: Request,
    ref: Annotated[str | None, Query(max_length=80, pattern=r"^[A-Za-z0-9._=-]+$")] = None,
) -> TelnyxAck:
    body = await request.body()
    signatures.verify(
        _keys(request),
        body,
        request.headers.get(signatures.SIGNATURE_HEADER),
        request.headers.get(signatures.TIMESTAMP_HEADER),
    )
    event = _event(body)
    if ref:
        event["koinonia_ref"] = ref
    data = event["data"]
    writer: EventWriter = request.app.state.telnyx_events
    # Raises EventStoreUnavailableError (503 + Retry-After) on any storage failure or timeout.
    new = await writer.store(data["id"][:100], data["event_type"][:100], event)
    return TelnyxAck(received=True, duplicate=not new)
