"""The segment allowance: balance checks and debits under SERIALIZABLE, never below zero."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Select, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.accounts.tables import Church
from koinonia.billing.tables import LedgerEntry, Subscription
from koinonia.cache import invalidate_on_commit, usage_tag
from koinonia.db import Database
from koinonia.errors import PaymentRequiredError, QuotaExceededError
from koinonia.retry import in_transaction
from koinonia.settings import Settings

SENDING_STATUSES = frozenset({"trialing", "active"})


class SubscriptionInactiveError(PaymentRequiredError):
    code = "subscription_inactive"
    title = "The subscription does not allow sending"


@dataclass(frozen=True, slots=True)
class Usage:
    used: int
    included: int
    remaining: int
    period_start: datetime
    period_end: datetime


async def ensure_subscription(
    session: AsyncSession, settings: Settings, church_id: uuid.UUID
) -> Subscription:
    """The church's subscription row; a new church starts a trial with its allowance."""
    found = await session.get(Subscription, church_id)
    if found is not None:
        return found
    now = datetime.now(UTC)
    await session.execute(
        insert(Subscription)
        .values(
            church_id=church_id,
            plan="trial",
            status="trialing",
            period_start=now,
            period_end=now + timedelta(days=settings.trial_days),
        )
        .on_conflict_do_nothing()
    )
    subscription = await session.get(Subscription, church_id, populate_existing=True)
    assert subscription is not None
    # Not invalidated: no usage can be cached for a church without a subscription
    # (computing it creates one), so the first `GET /billing/usage` is cached at once.
    await _insert_grant(
        session, church_id, subscription.period_start, settings.trial_segments, "trial"
    )
    return subscription


def _usage_changed(session: AsyncSession, church_id: uuid.UUID) -> None:
    """Every write to the ledger or the subscription's period: the cached
    `GET /billing/usage` is invalidated once the transaction commits (any path: request,
    job, webhook)."""
    invalidate_on_commit(session, usage_tag(church_id))


async def grant(
    session: AsyncSession,
    church_id: uuid.UUID,
    period_start: datetime,
    segments: int,
    reference: str,
) -> None:
    _usage_changed(session, church_id)
    await _insert_grant(session, church_id, period_start, segments, reference)


async def _insert_grant(
    session: AsyncSession,
    church_id: uuid.UUID,
    period_start: datetime,
    segments: int,
    reference: str,
) -> None:
    await session.execute(
        insert(LedgerEntry)
        .values(
            church_id=church_id,
            period_start=period_start,
            kind="grant",
            segments=segments,
            reference=reference,
        )
        .on_conflict_do_nothing()
    )


async def usage(session: AsyncSession, settings: Settings, church_id: uuid.UUID) -> Usage:
    subscription = await ensure_subscription(session, settings, church_id)
    rows = await session.execute(
        select(LedgerEntry.kind, func.coalesce(func.sum(LedgerEntry.segments), 0))
        .where(
            LedgerEntry.church_id == church_id,
            LedgerEntry.period_start == subscription.period_start,
        )
        .group_by(LedgerEntry.kind)
    )
    totals = {kind: int(total) for kind, total in rows}
    included = totals.get("grant", 0)
    remaining = included + totals.get("debit", 0) + totals.get("credit", 0)
    return Usage(
        included - remaining,
        included,
        remaining,
        subscription.period_start,
        subscription.period_end,
    )


def check_can_send(subscription: Subscription, now: datetime | None = None) -> None:
    now = now or datetime.now(UTC)
    if subscription.status not in SENDING_STATUSES:
        raise SubscriptionInactiveError(
            f"Sending is paused: the subscription is {subscription.status}. "
            "Update the payment method in the billing portal; reading still works."
        )
    if subscription.status == "trialing" and subscription.period_end <= now:
        raise SubscriptionInactiveError(
            "The trial has ended; choose a plan to keep sending. Reading still works."
        )


async def debit_in(
    session: AsyncSession,
    settings: Settings,
    church_id: uuid.UUID,
    segments: int,
    reference: str,
) -> int:
    """Check and debit inside the caller's transaction; answers the balance left.

    The church's subscription row is locked first, so concurrent debits of one church
    queue up behind each other and each sees the ones before it: never below zero at any
    isolation level (under SERIALIZABLE a conflict is a retried serialization failure).
    """
    await ensure_subscription(session, settings, church_id)
    subscription = await session.scalar(
        select(Subscription)
        .where(Subscription.church_id == church_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    assert subscription is not None
    check_can_send(subscription)
    balance = (await usage(session, settings, church_id)).remaining
    if segments > balance:
        raise QuotaExceededError(
            f"This needs {segments} segments and {balance} remain in this period"
        )
    _usage_changed(session, church_id)
    await session.execute(
        insert(LedgerEntry)
        .values(
            church_id=church_id,
            period_start=subscription.period_start,
            kind="debit",
            segments=-segments,
            reference=reference,
        )
        .on_conflict_do_nothing()
    )
    return balance - segments


async def debit(
    database: Database, settings: Settings, church_id: uuid.UUID, segments: int, reference: str
) -> tuple[int, int]:
    """Debit in its own SERIALIZABLE transaction: (balance left, serialization retries)."""

    async def work(session: AsyncSession) -> int:
        return await debit_in(session, settings, church_id, segments, reference)

    outcome = await in_transaction(
        database, "SERIALIZABLE", work, operation="segment_debit", attempts=30
    )
    return outcome.value, outcome.retries


async def _debit(session: AsyncSession, church_id: uuid.UUID, reference: str) -> LedgerEntry | None:
    found: LedgerEntry | None = await session.scalar(
        select(LedgerEntry).where(
            LedgerEntry.church_id == church_id,
            LedgerEntry.kind == "debit",
            LedgerEntry.reference == reference,
        )
    )
    return found


async def credit(
    session: AsyncSession, church_id: uuid.UUID, segments: int, reference: str
) -> None:
    """Give back a debit (a broadcast cancelled before sending), once per reference."""
    debited = await _debit(session, church_id, reference)
    if debited is None:
        return
    _usage_changed(session, church_id)
    await session.execute(
        insert(LedgerEntry)
        .values(
            church_id=church_id,
            period_start=debited.period_start,
            kind="credit",
            segments=min(segments, -debited.segments),
            reference=reference,
        )
        .on_conflict_do_nothing()
    )


def debited_total(church_id: uuid.UUID, debit_reference: str) -> Select[int]:
    """Segments debited for `debit_reference`: the debit and its replay debits
    (`<debit>:replay:…`). Both arms are ranges of `ix_usage_ledger_debit_reference`;
    the prefix is escaped, so `_` and `%` in a reference match only themselves."""
    return select(func.coalesce(func.sum(-LedgerEntry.segments), 0)).where(
        LedgerEntry.church_id == church_id,
        LedgerEntry.kind == "debit",
        (LedgerEntry.reference == debit_reference)
        | LedgerEntry.reference.startswith(f"{debit_reference}:replay:", autoescape=True),
    )


def refunded_total(church_id: uuid.UUID, debit_reference: str) -> Select[int]:
    """Segments credited back against `debit_reference` (credits `<debit>:…`): a range
    of `ix_usage_ledger_credit_reference`, the prefix escaped as in `debited_total`."""
    return select(func.coalesce(func.sum(LedgerEntry.segments), 0)).where(
        LedgerEntry.church_id == church_id,
        LedgerEntry.kind == "credit",
        LedgerEntry.reference.startswith(f"{debit_reference}:", autoescape=True),
    )


async def refund(
    session: AsyncSession,
    church_id: uuid.UUID,
    segments: int,
    *,
    debit_reference: str,
    credit_reference: str,
) -> int:
    """Give back part of a debit under a reference of its own (a broadcast refunds what
    it did not send, batch by batch); never more than was debited for it — the first
    debit plus any replay debits (`<debit>:replay:…`) — in the first debit's period.
    Answers the segments refunded."""
    debited = await _debit(session, church_id, debit_reference)
    if debited is None:
        return 0
    total_debited = await session.scalar(debited_total(church_id, debit_reference))
    refunded = await session.scalar(refunded_total(church_id, debit_reference))
    amount = min(segments, int(total_debited or 0) - int(refunded or 0))
    if amount <= 0:
        return 0
    _usage_changed(session, church_id)
    await session.execute(
        insert(LedgerEntry)
        .values(
            church_id=church_id,
            period_start=debited.period_start,
            kind="credit",
            segments=amount,
            reference=credit_reference,
        )
        .on_conflict_do_nothing()
    )
    return amount


async def sync_church(session: AsyncSession, subscription: Subscription) -> None:
    """Mirror plan and status on the church row (what `/auth/me` shows). Called after
    every change of the subscription (Stripe events): its period is the usage's too."""
    _usage_changed(session, subscription.church_id)
    church = await session.get(Church, subscription.church_id)
    if church is not None:
        church.plan = subscription.plan
        church.subscription_status = subscription.status
        church.stripe_customer_id = subscription.stripe_customer_id
