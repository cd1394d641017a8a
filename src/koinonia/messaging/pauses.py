"""Sending paused by scope, after the provider refused a whole account or one number.

Per-recipient refusals (opted out, invalid, landline) stay per recipient. A refusal that
says the *sender* is wrong — the account's key rotated, its profile disabled, its spend
limit reached; one number spam-blocked or its campaign rejected — would fail every
recipient in turn, so instead sending stops for that scope: work stays queued, nobody is
failed, refunded or dead-lettered. An operator clears the pause, or a probe (one text,
after a growing wait) finds the provider accepting again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from prometheus_client import Counter
from sqlalchemy import or_, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.messaging.tables import SenderPause

log = structlog.get_logger(__name__)

ACCOUNT = "account"
NUMBER = "number"
ACCOUNT_KEY = "telnyx"
FIRST_PROBE_SECONDS = 30.0
MAX_PROBE_SECONDS = 600.0

PAUSES_STARTED = Counter(
    "koinonia_sending_pauses_total", "Sending paused by a provider refusal", ["scope", "code"]
)

# Telnyx's error scopes (shared/reference/telnyx.md, "Errors").
ACCOUNT_CODES = frozenset({"10009", "10010", "40333"})
ACCOUNT_STATUSES = frozenset({401, 403})
NUMBER_CODES = frozenset(
    {
        "40002",  # blocked as spam, temporary
        "40003",  # blocked as spam, permanent for this number
        "40305",  # invalid sending number / not on the profile
        "40306",  # alphanumeric sender not allowed
        "40312",  # number not enabled for messaging
        "40319",  # 10DLC campaign not registered / suspended
        "40321",  # campaign rejected
    }
)


@dataclass(frozen=True)
class Scope:
    scope: str
    key: str


def scope_of(status: int | None, code: str | None, sender: str) -> Scope | None:
    """The scope a refusal pauses, or None when it concerns one recipient only."""
    if code in ACCOUNT_CODES or status in ACCOUNT_STATUSES:
        return Scope(ACCOUNT, ACCOUNT_KEY)
    if code in NUMBER_CODES:
        return Scope(NUMBER, sender)
    return None


async def active(session: AsyncSession, sender: str) -> SenderPause | None:
    """The pause that stops `sender` now (the account's first), if any."""
    found: SenderPause | None = await session.scalar(
        select(SenderPause)
        .where(
            or_(
                (SenderPause.scope == ACCOUNT) & (SenderPause.key == ACCOUNT_KEY),
                (SenderPause.scope == NUMBER) & (SenderPause.key == sender),
            )
        )
        .order_by(SenderPause.scope)
        .limit(1)
    )
    return found


async def pause(session: AsyncSession, scope: Scope, *, code: str | None, reason: str) -> None:
    """Start (or extend, after a failed probe) a pause; the next probe waits twice as long."""
    await session.execute(
        text(
            "INSERT INTO sender_pauses (scope, key, reason, error_code, next_probe_at) "
            "VALUES (:scope, :key, :reason, :code, now() + make_interval(secs => :first)) "
            "ON CONFLICT (scope, key) DO UPDATE SET reason = excluded.reason, "
            "error_code = excluded.error_code, probes = sender_pauses.probes + 1, "
            "next_probe_at = now() + make_interval(secs => least(:most, "
            ":first * power(2, sender_pauses.probes + 1)))"
        ),
        {
            "scope": scope.scope,
            "key": scope.key,
            "reason": reason[:200],
            "code": code,
            "first": FIRST_PROBE_SECONDS,
            "most": MAX_PROBE_SECONDS,
        },
    )
    PAUSES_STARTED.labels(scope.scope, code or "none").inc()
    # The key of a number pause is a sending number; only its last digits are logged.
    log.error(
        "sending_paused",
        scope=scope.scope,
        key=scope.key if scope.scope == ACCOUNT else f"…{scope.key[-4:]}",
        code=code,
        reason=reason[:200],
    )


async def clear(session: AsyncSession, scope: str, key: str) -> bool:
    """Lift a pause and wake the batches waiting on it; False if there was none."""
    gone = await session.execute(
        text("DELETE FROM sender_pauses WHERE scope = :scope AND key = :key RETURNING 1"),
        {"scope": scope, "key": key},
    )
    if gone.first() is None:
        return False
    await wake_waiting(session)
    log.info("sending_resumed", scope=scope)
    return True


async def wake_waiting(session: AsyncSession) -> None:
    """Paused batches sleep in lock-free wake jobs: bring them forward to now."""
    await session.execute(
        text(
            "UPDATE procrastinate_jobs SET scheduled_at = now() WHERE status = 'todo' "
            "AND task_name = 'messaging:wake_batch' AND scheduled_at > now()"
        )
    )


def probe_due(found: SenderPause, now: datetime) -> bool:
    return found.next_probe_at <= now


def wait_for_probe(found: SenderPause, now: datetime) -> float:
    return max(0.0, (found.next_probe_at - now) / timedelta(seconds=1))
