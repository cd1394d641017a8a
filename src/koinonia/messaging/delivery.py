"""One SMS through Telnyx, and what its answer means for our row.

Shared by broadcasts and inbox replies: the same client, breaker, per-number rate and
retry rules. What may be retried is decided by what surely was not sent (see
`koinonia.telnyx.client`); an answer in doubt is left for receipts to settle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import structlog
from prometheus_client import Counter
from redis.asyncio import Redis

from koinonia.breaker import CircuitBreaker
from koinonia.members.crypto import ContactCipher
from koinonia.messaging import refs
from koinonia.messaging.pauses import Scope, scope_of
from koinonia.messaging.throughput import SendThroughput
from koinonia.observability import RETRIES
from koinonia.retry import backoff_seconds
from koinonia.settings import Settings
from koinonia.telnyx.client import (
    SendDeferredError,
    SendInDoubtError,
    SendRefusedError,
    TelnyxClient,
)

log = structlog.get_logger(__name__)
SMS_OUTCOMES = Counter(
    "koinonia_sms_sends_total",
    "SMS send attempts by outcome (sent, skipped, failed, retry, in_doubt)",
    ["kind", "outcome"],
)

OPTED_OUT_CODES = frozenset({"40300"})
INVALID_CODES = frozenset({"40310", "40311", "40012", "10016", "40013"})
LANDLINE_CODES = frozenset({"40001"})
# Telnyx pacing us: API requests over the limit (10011, HTTP 429) or the sender's queue
# full (40318). Slow down; never fail a recipient for it.
THROTTLE_CODES = frozenset({"10011", "40318"})


@dataclass
class SendContext:
    """What sending needs, opened once per worker process."""

    settings: Settings
    telnyx: TelnyxClient
    breaker: CircuitBreaker
    throughput: SendThroughput
    cipher: ContactCipher
    ref_key: bytes

    @classmethod
    def build(cls, settings: Settings, redis: Redis, telnyx: TelnyxClient) -> SendContext:
        return cls(
            settings=settings,
            telnyx=telnyx,
            breaker=CircuitBreaker(redis, "telnyx"),
            throughput=SendThroughput(
                redis,
                account_per_second=settings.telnyx_account_sends_per_second,
                number_per_second=settings.sends_per_second_per_number,
                number_overrides=settings.rate_overrides,
            ),
            cipher=ContactCipher.from_settings(settings),
            ref_key=refs.ref_key(settings.member_hmac_key.get_secret_value()),
        )

    def webhook_url(self, ref: refs.RowRef) -> str:
        base = str(self.settings.public_base_url).rstrip("/")
        return f"{base}/api/v1/webhooks/telnyx?ref={refs.encode(self.ref_key, ref)}"


@dataclass
class Result:
    """The new state of one row after one attempt."""

    row_id: int
    status: str  # sent | skipped | failed | queued (retry later) | sending (in doubt)
    provider_id: str | None = None
    parts: int | None = None
    skip_reason: str | None = None
    error_code: str | None = None
    error_detail: str | None = None
    next_attempt_at: datetime | None = None
    in_doubt: bool = False
    opted_out: bool = False  # Telnyx says the phone texted STOP (40300)
    exhausted: bool = False  # out of retries: dead-lettered
    breaker_failure: bool = field(default=False, repr=False)
    uncounted: bool = False  # not one of the row's retries (a probe, pacing, a pause)
    pause: Scope | None = None  # the provider refused the sender, not this recipient
    throttled: bool = False  # the provider asked us to slow down


async def attempt(
    context: SendContext,
    *,
    kind: str,
    row_id: int,
    attempts: int,
    sender: str,
    to: str,
    text: str,
    ref: refs.RowRef,
    messaging_profile_id: str | None,
) -> Result:
    """Send once; `attempts` counts this one."""
    try:
        sent = await context.telnyx.send_message(
            sender=sender,
            to=to,
            text=text,
            webhook_url=context.webhook_url(ref),
            messaging_profile_id=messaging_profile_id,
        )
    except SendRefusedError as error:
        code = error.code or str(error.status)
        if code in THROTTLE_CODES:
            return _throttled(kind, row_id, code, error.detail, None, attempts)
        scope = scope_of(error.status, error.code, sender)
        if scope is not None:
            SMS_OUTCOMES.labels(kind, "paused").inc()
            return Result(
                row_id,
                "queued",
                error_code=code,
                error_detail=f"sender refused: {error.detail}"[:300],
                uncounted=True,
                pause=scope,
            )
        if code in OPTED_OUT_CODES:
            SMS_OUTCOMES.labels(kind, "skipped").inc()
            return Result(
                row_id, "skipped", skip_reason="opted_out", error_code=code, opted_out=True
            )
        if code in INVALID_CODES or code in LANDLINE_CODES:
            SMS_OUTCOMES.labels(kind, "skipped").inc()
            reason = "landline" if code in LANDLINE_CODES else "invalid"
            return Result(row_id, "skipped", skip_reason=reason, error_code=code)
        SMS_OUTCOMES.labels(kind, "failed").inc()
        return Result(row_id, "failed", error_code=code, error_detail=error.detail[:300])
    except SendDeferredError as error:
        if error.status == 429 or error.code in THROTTLE_CODES:
            return _throttled(
                kind, row_id, error.code or "429", error.detail, error.retry_after, attempts
            )
        failure = True  # a refused connection: Telnyx may be down
        if attempts > context.settings.telnyx_max_retries:
            SMS_OUTCOMES.labels(kind, "failed").inc()
            return Result(
                row_id,
                "failed",
                error_code=error.code or "retries_exhausted",
                error_detail=f"gave up after {attempts} attempts: {error.detail}"[:300],
                exhausted=True,
                breaker_failure=failure,
            )
        wait = max(error.retry_after or 0.0, backoff_seconds(attempts))
        SMS_OUTCOMES.labels(kind, "retry").inc()
        RETRIES.labels("telnyx_send").inc()
        # Ids and codes only: the row id leads to the phone for those allowed to see it.
        log.info(
            "send_retry_scheduled",
            kind=kind,
            row_id=row_id,
            attempt=attempts,
            status=error.status,
            code=error.code,
            wait_seconds=round(wait, 3),
        )
        return Result(
            row_id,
            "queued",
            error_code=error.code,
            error_detail=error.detail[:300],
            next_attempt_at=datetime.now(UTC) + timedelta(seconds=wait),
            breaker_failure=failure,
        )
    except SendInDoubtError as error:
        SMS_OUTCOMES.labels(kind, "in_doubt").inc()
        return Result(
            row_id,
            "sending",
            error_code=error.code or "in_doubt",
            error_detail=f"in doubt: {error.detail}"[:300],
            in_doubt=True,
            breaker_failure=True,
        )
    SMS_OUTCOMES.labels(kind, "sent").inc()
    return Result(row_id, "sent", provider_id=sent.id, parts=sent.parts)


def _throttled(
    kind: str, row_id: int, code: str, detail: str, retry_after: float | None, attempts: int
) -> Result:
    wait = retry_after if retry_after is not None else backoff_seconds(min(attempts, 5), 8)
    SMS_OUTCOMES.labels(kind, "throttled").inc()
    RETRIES.labels("telnyx_throttled").inc()
    return Result(
        row_id,
        "queued",
        error_code=code,
        error_detail=f"throttled: {detail}"[:300],
        next_attempt_at=datetime.now(UTC) + timedelta(seconds=max(wait, 0.5)),
        uncounted=True,
        throttled=True,
    )


async def report_to_breaker(context: SendContext, results: list[Result]) -> None:
    """One success closes a half-open circuit; each failure counts toward opening it."""
    if any(r.status == "sent" for r in results):
        await context.breaker.success()
    for result in results:
        if result.breaker_failure:
            await context.breaker.failure()
