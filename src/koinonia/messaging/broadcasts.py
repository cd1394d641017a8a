"""Broadcasts: preview, creation (one transaction: message, recipients, debit, dispatch
jobs), cancellation, and what clients read back."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from procrastinate import App
from sqlalchemy import TextClause, func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.accounts.principal import Principal
from koinonia.accounts.tables import Church
from koinonia.billing import ledger
from koinonia.db import Database
from koinonia.errors import AuthorizationError, ConflictError, FieldError, ValidationError
from koinonia.groups.tables import Group
from koinonia.jobs import defer_in_transaction, defer_many_in_transaction
from koinonia.members.tables import Member
from koinonia.messaging import segments as sms
from koinonia.messaging import window
from koinonia.messaging.counters import apply_transitions
from koinonia.messaging.schemas import Counts, MessageOut, MessageRequest, PreviewOut
from koinonia.messaging.tables import Message
from koinonia.partitions import month_bounds
from koinonia.retry import in_transaction
from koinonia.settings import Settings
from koinonia.templates.rendering import fields_used, problems, render
from koinonia.templates.tables import Template
from koinonia.tenancy import get_owned

MAX_SEGMENTS = 10
SEND_QUEUE = "sms"
BATCH_TASK = "messaging:send_batch"
WAKE_TASK = "messaging:wake_batch"
START_TASK = "messaging:start_broadcast"


# A batch's next run is looked up rather than guarded by a procrastinate queueing lock:
# a job retried after a failure (or recovered from a dead worker) goes back to `todo`,
# and a queueing lock already taken by its continuation would make that retry fail and
# leave the job `doing` — holding its church's lock — for ever.
PENDING_RUN_SQL = """
SELECT EXISTS (
  SELECT 1 FROM procrastinate_jobs
  WHERE status = 'todo' AND task_name = ANY(:tasks)
    AND args->>'message_id' = :message_id AND (args->>'batch_no')::int = :batch_no)
"""


async def batch_run_pending(session: AsyncSession, message_id: uuid.UUID, batch_no: int) -> bool:
    """Whether a run (or a wake-up) of this batch is queued already."""
    return bool(
        await session.scalar(
            text(PENDING_RUN_SQL),
            {
                "tasks": [BATCH_TASK, WAKE_TASK],
                "message_id": str(message_id),
                "batch_no": batch_no,
            },
        )
    )


class NumberNotReadyError(ConflictError):
    code = "number_not_ready"
    title = "The church's sending number is not ready yet"


class IdempotencyConflictError(ConflictError):
    code = "idempotency_key_reused"
    title = "This Idempotency-Key was used for a different request"


class MessageNotCancellableError(ConflictError):
    code = "not_cancellable"
    title = "This message can no longer be cancelled"


# The audience: distinct live members of the chosen groups and ids, in one statement.
# (`id IN (… UNION …)` plans as a hash join with a true row estimate; the equivalent
# `id = ANY(…) OR EXISTS (…)` was costed ~40× higher, which switched on JIT compilation
# for ~200 ms per large broadcast.)
AUDIENCE_SQL = """
SELECT m.id, m.opted_out, m.first_name, m.last_name FROM members m
WHERE m.church_id = :church_id AND m.deleted_at IS NULL
  AND m.id IN (
        SELECT unnest(CAST(:member_ids AS uuid[]))
        UNION
        SELECT gm.member_id FROM group_members gm
        WHERE gm.group_id = ANY(CAST(:group_ids AS uuid[])))
"""

# The audience is constant SQL with bound parameters.
FAN_OUT_SQL = f"""
WITH audience AS ({AUDIENCE_SQL}),
numbered AS (
  SELECT id, opted_out,
         row_number() OVER (PARTITION BY opted_out ORDER BY id) - 1 AS position
  FROM audience
),
inserted AS (
  INSERT INTO message_recipients
    (created_at, church_id, message_id, member_id, batch_no, status, skip_reason, segments)
  SELECT :created_at, :church_id, :message_id, id,
         CASE WHEN opted_out THEN -1 ELSE position / :batch_size END,
         CASE WHEN opted_out THEN 'skipped' ELSE 'queued' END,
         CASE WHEN opted_out THEN 'opted_out' END,
         CASE WHEN opted_out THEN 0 ELSE :segments END
  FROM numbered
  RETURNING status
)
SELECT status, count(*) FROM inserted GROUP BY status
"""  # noqa: S608


@dataclass(frozen=True)
class Estimate:
    body: str  # as rendered for the first recipient
    encoding: str
    characters: int
    segments: int  # the most one recipient's text can take: what is reserved per recipient


def _audience_params(church_id: uuid.UUID, request: MessageRequest) -> dict[str, Any]:
    return {
        "church_id": church_id,
        "member_ids": list(dict.fromkeys(request.member_ids)),
        "group_ids": list(dict.fromkeys(request.group_ids)),
    }


async def _check_audience_ids(
    session: AsyncSession, church_id: uuid.UUID, request: MessageRequest
) -> None:
    errors: list[FieldError] = []
    if request.group_ids:
        found = set(
            await session.scalars(
                select(Group.id).where(
                    Group.church_id == church_id, Group.id.in_(request.group_ids)
                )
            )
        )
        errors += [
            FieldError("group_ids", f"no such group: {g}")
            for g in request.group_ids
            if g not in found
        ]
    if request.member_ids:
        found = set(
            await session.scalars(
                select(Member.id).where(
                    Member.church_id == church_id,
                    Member.deleted_at.is_(None),
                    Member.id.in_(request.member_ids),
                )
            )
        )
        errors += [
            FieldError("member_ids", f"no such member: {m}")
            for m in request.member_ids
            if m not in found
        ][:100]
    if errors:
        raise ValidationError("Some recipients do not exist", errors=errors)


def _require_text(body: str, field: str) -> str:
    if not body.strip():
        raise ValidationError(
            "The text is blank", errors=[FieldError(field, "must contain visible text")]
        )
    return body


async def _body_of(session: AsyncSession, church_id: uuid.UUID, request: MessageRequest) -> str:
    if request.template_id is not None:
        template = await get_owned(
            session, Template, request.template_id, church_id, what="template"
        )
        return _require_text(template.body, "template_id")
    assert request.body is not None
    _require_text(request.body, "body")
    found = problems(request.body)
    if found:
        raise ValidationError(
            "The body has merge-field problems",
            errors=[FieldError("body", f"at {p.position}: {p.message}") for p in found],
        )
    return request.body


async def estimate(
    session: AsyncSession, church: Church, body: str, request: MessageRequest
) -> Estimate:
    """Segments reserved per recipient: exact without merge fields, else the worst case
    over the audience's names (Telnyx's `parts` later settle the real cost)."""
    used = fields_used(body)
    params = _audience_params(church.id, request)
    first = (await session.execute(text(AUDIENCE_SQL + " ORDER BY m.id LIMIT 1"), params)).first()
    sample = render(
        body,
        {
            "first_name": first.first_name if first else "",
            "last_name": first.last_name if first else "",
            "church_name": church.name,
        },
    )
    counted = sms.count(sample)
    if not used - {"church_name"}:
        return Estimate(sample, counted.encoding, counted.characters, counted.segments)
    longest = (
        await session.execute(
            text(
                "SELECT coalesce(max(length(first_name)), 0), "  # noqa: S608
                f"coalesce(max(length(last_name)), 0) FROM ({AUDIENCE_SQL}) a"
            ),
            params,
        )
    ).one()
    unusual = await session.scalars(
        text(
            f"SELECT DISTINCT first_name || last_name FROM ({AUDIENCE_SQL}) a "  # noqa: S608
            "WHERE first_name || last_name ~ '[^ -~]' LIMIT 1000"
        ),
        params,
    )
    names = "".join(unusual)
    if sms.encoding_of(names) == "GSM-7":
        filler = "{"  # an extension character: two septets, the most a GSM-7 one costs
    else:
        filler = "😀" if any(ord(c) > 0xFFFF for c in names) else "ж"
    worst = render(
        body,
        {
            "first_name": filler * int(longest[0]),
            "last_name": filler * int(longest[1]),
            "church_name": church.name,
        },
    )
    worst_count = sms.count(worst)
    return Estimate(
        sample,
        worst_count.encoding,
        counted.characters,
        max(counted.segments, worst_count.segments),
    )


async def validated(
    session: AsyncSession, church: Church, request: MessageRequest
) -> tuple[str, Estimate]:
    """Every check of a broadcast's audience and text, shared by preview and send (so a
    preview never accepts what sending refuses): ids that exist, a text that is not
    blank, merge fields that render, at most `MAX_SEGMENTS` segments. Returns the text
    as written (merge fields and all) and its estimate."""
    await _check_audience_ids(session, church.id, request)
    body = await _body_of(session, church.id, request)
    guess = await estimate(session, church, body, request)
    if guess.segments > MAX_SEGMENTS:
        raise ValidationError(
            f"The text takes {guess.segments} segments; at most {MAX_SEGMENTS} are allowed",
            errors=[FieldError("body", "too long")],
        )
    return body, guess


async def preview(
    session: AsyncSession, church_id: uuid.UUID, request: MessageRequest
) -> PreviewOut:
    church = await session.get_one(Church, church_id)
    _, guess = await validated(session, church, request)
    counts: dict[bool, int] = dict(
        (
            await session.execute(
                text(f"SELECT opted_out, count(*) FROM ({AUDIENCE_SQL}) a GROUP BY opted_out"),  # noqa: S608
                _audience_params(church_id, request),
            )
        ).all()
    )
    friendly = sms.gsm_friendly(guess.body)
    suggestion = (
        friendly if guess.encoding == "UCS-2" and sms.encoding_of(friendly) == "GSM-7" else None
    )
    return PreviewOut(
        segments=guess.segments,
        encoding="UCS-2" if guess.encoding == "UCS-2" else "GSM-7",
        characters=guess.characters,
        recipients=int(counts.get(False, 0)),
        skipped=int(counts.get(True, 0)),
        body=guess.body,
        gsm_suggestion=suggestion,
    )


def request_hash(request: MessageRequest) -> bytes:
    canonical = json.dumps(request.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(canonical).digest()


_RECIPIENT_COLUMNS = (
    "SELECT id, member_id, status, skip_reason, segments, attempts, "
    "provider_message_id, error_code, error_detail, sent_at, finalized_at, "
    "in_doubt_since IS NOT NULL OR (status = 'sending') AS in_doubt "
    "FROM message_recipients "
    "WHERE created_at >= :partition_start AND created_at < :partition_end "
)
RECIPIENTS_PAGE_SQL = (
    _RECIPIENT_COLUMNS + "AND (message_id, id) > (:id, :after) "
    "AND (message_id, id) <= (:id, :last) "
    "ORDER BY message_id, id LIMIT :limit"
)
RECIPIENTS_STATUS_PAGE_SQL = (
    _RECIPIENT_COLUMNS + "AND (message_id, status, id) > (:id, :status, :after) "
    "AND (message_id, status, id) <= (:id, :status, :last) "
    "ORDER BY message_id, status, id LIMIT :limit"
)
_LAST_ID = 2**63 - 1  # bigint's largest


def recipients_page(
    message_id: uuid.UUID, created_at: datetime, *, after: int, status: str | None, limit: int
) -> TextClause:
    """`GET /messages/{id}/recipients`: the broadcast's recipients after id `after`, in id
    order (only `status` ones when given), at most `limit`. The plan reads them in order
    from `(message_id, id)` — `(message_id, status, id)` with a status — and stops after
    `limit`: no sort of the broadcast per page (tests/platform/test_query_plans.py).

    The filter is that index's key range from the cursor to the broadcast's end, and the
    order its whole key, which no other index yields. Not `message_id = :id AND id > :after
    ORDER BY id`: with `message_id` constant the order is just `id`, which the primary key
    `(id, created_at)` yields too, and for a big broadcast the planner walks it from
    `after` — on a broadcast's last page through the rest of its month's rows.

    Every recipient row carries its broadcast's `created_at`; bounding `created_at` by its
    month's partition prunes the plan to that one partition (and, unlike `created_at =
    :created`, does not multiply the estimate by a selectivity `message_id` already has)."""
    start, end = month_bounds(created_at)
    params: dict[str, Any] = {
        "id": message_id,
        "partition_start": start,
        "partition_end": end,
        "after": after,
        "last": _LAST_ID,
        "limit": limit,
    }
    if status is None:
        return text(RECIPIENTS_PAGE_SQL).bindparams(**params)
    return text(RECIPIENTS_STATUS_PAGE_SQL).bindparams(status=status, **params)


def to_out(message: Message, paused_reason: str | None = None) -> MessageOut:
    audience = message.audience or {}
    return MessageOut(
        starts_at=message.starts_at,
        urgent=message.urgent,
        paused_reason=paused_reason if message.status in ("queued", "sending") else None,
        id=message.id,
        status=message.status,
        body=message.body,
        segments=message.segments,
        encoding=message.encoding,
        characters=message.characters,
        recipients_total=message.recipients_total,
        counts=Counts(
            queued=message.queued_count,
            sent=message.sent_count,
            delivered=message.delivered_count,
            failed=message.failed_count,
            skipped=message.skipped_count,
        ),
        group_ids=[uuid.UUID(g) for g in audience.get("group_ids", [])],
        member_ids=[uuid.UUID(m) for m in audience.get("member_ids", [])],
        template_id=message.template_id,
        scheduled_at=message.scheduled_at,
        started_at=message.started_at,
        completed_at=message.completed_at,
        cancelled_at=message.cancelled_at,
        created_at=message.created_at,
    )


@dataclass(frozen=True)
class Created:
    message: MessageOut
    replayed: bool


async def create(
    database: Database,
    settings: Settings,
    job_app: App,
    principal: Principal,
    request: MessageRequest,
    idempotency_key: str | None,
) -> Created:
    """Everything in one transaction: message, recipients, debit and dispatch jobs.

    READ COMMITTED: the debit locks the church's subscription row, which serialises
    debits without making concurrent broadcasts (of any church) fail each other's
    fan-out. A lost connection is retried whole unless its COMMIT may have landed
    (`in_transaction` settles that through the transaction id)."""
    fingerprint = request_hash(request)
    now = datetime.now(UTC)
    if request.scheduled_at is not None:
        if request.scheduled_at <= now:
            raise ValidationError(
                "scheduled_at must be in the future",
                errors=[FieldError("scheduled_at", "must be in the future")],
            )
        if request.scheduled_at > now + timedelta(days=90):
            raise ValidationError(
                "scheduled_at is too far ahead",
                errors=[FieldError("scheduled_at", "at most 90 days ahead")],
            )

    if request.urgent and principal.role not in ("owner", "admin"):
        raise AuthorizationError("Only owners and admins may send outside the sending window")

    async def work(session: AsyncSession) -> Created:
        church_id = principal.church_id
        if idempotency_key is not None:
            earlier = await session.scalar(
                select(Message).where(
                    Message.church_id == church_id, Message.idempotency_key == idempotency_key
                )
            )
            if earlier is not None:
                if earlier.request_hash != fingerprint:
                    raise IdempotencyConflictError(
                        "Use a new Idempotency-Key for a different message"
                    )
                assert earlier.first_response is not None
                return Created(MessageOut.model_validate(earlier.first_response), True)
        church = await session.get_one(Church, church_id)
        if not church.phone_number or church.number_status != "assigned":
            raise NumberNotReadyError(
                "Your sending number is still being set up; try again in a few minutes"
            )
        body, guess = await validated(session, church, request)
        starts_at = hold_until(church, request.scheduled_at, urgent=request.urgent, now=now)
        message = Message(
            church_id=church_id,
            created_by=principal.user_id,
            body=body,
            template_id=request.template_id,
            encoding=guess.encoding,
            segments=guess.segments,
            characters=guess.characters,
            audience={
                "group_ids": [str(g) for g in request.group_ids],
                "member_ids": [str(m) for m in request.member_ids],
            },
            status="scheduled" if starts_at else "queued",
            scheduled_at=request.scheduled_at,
            starts_at=starts_at,
            urgent=request.urgent,
            idempotency_key=idempotency_key,
            request_hash=fingerprint if idempotency_key else None,
        )
        session.add(message)
        await session.flush()
        await session.refresh(message)
        rows = await session.execute(
            text(FAN_OUT_SQL),
            {
                **_audience_params(church_id, request),
                "created_at": message.created_at,
                "message_id": message.id,
                "batch_size": settings.dispatch_batch_size,
                "segments": guess.segments,
            },
        )
        by_status = {str(status): int(n) for status, n in rows}
        queued, skipped = by_status.get("queued", 0), by_status.get("skipped", 0)
        reserved = queued * guess.segments
        if reserved:
            await ledger.debit_in(session, settings, church_id, reserved, f"message:{message.id}")
        batches = -(-queued // settings.dispatch_batch_size)
        message.recipients_total = queued + skipped
        message.queued_count = queued
        message.skipped_count = skipped
        message.segments_reserved = reserved
        message.batches = batches
        if queued == 0:
            message.status = "completed"
            message.completed_at = now
        if queued and starts_at is not None:
            await defer_start(job_app, session, message, starts_at)
        elif queued:
            await defer_batches(job_app, session, message, batches)
        await session.flush()
        out = to_out(message)
        message.first_response = out.model_dump(mode="json")
        return Created(out, False)

    try:
        outcome = await in_transaction(
            database, "READ COMMITTED", work, operation="broadcast_create", attempts=5
        )
    except IntegrityError as error:
        if idempotency_key is None or "idempotency_key" not in str(error.orig):
            raise
        # A concurrent request with the same key committed first: answer as a replay.
        outcome = await in_transaction(
            database, "READ COMMITTED", work, operation="broadcast_create", attempts=5
        )
    return outcome.value


def hold_until(
    church: Church, scheduled_at: datetime | None, *, urgent: bool, now: datetime
) -> datetime | None:
    """When a new broadcast may start: None for now, else its schedule or, unless urgent,
    the next opening of the church's sending window."""
    start = scheduled_at if scheduled_at is not None and scheduled_at > now else now
    if not urgent:
        opening = window.next_opening(
            start, church.timezone, church.send_window_start, church.send_window_end
        )
        if opening is not None:
            start = opening
    return start if start > now else None


async def defer_start(
    job_app: App, session: AsyncSession, message: Message, starts_at: datetime
) -> None:
    """A held broadcast has one lock-free start job and no batch job until it is due, so
    it never holds back the church's other sends (procrastinate #1599)."""
    await defer_in_transaction(
        job_app,
        session,
        START_TASK,
        queue=SEND_QUEUE,
        priority=0,
        schedule_at=starts_at,
        message_id=str(message.id),
    )


async def start_held(database: Database, job_app: App, message_id: uuid.UUID) -> str:
    """A held broadcast's start job: queue its batches, or wait again if the sending
    window is closed (a schedule can fall outside it). Conditional on `scheduled`, so a
    cancel always wins."""
    async with database.unit_of_work() as session:
        message = await session.get(Message, message_id, with_for_update=True)
        if message is None or message.status != "scheduled":
            return "nothing_to_do"
        church = await session.get_one(Church, message.church_id)
        now = datetime.now(UTC)
        later = hold_until(church, None, urgent=message.urgent, now=now)
        if later is not None:
            message.starts_at = later
            await defer_start(job_app, session, message, later)
            return "held_for_window"
        message.status = "queued"
        message.starts_at = None
        await defer_batches(job_app, session, message, message.batches)
        return "started"


async def follow_window_change(session: AsyncSession, church: Church) -> int:
    """The church changed its sending window or time zone: held broadcasts move their
    start to the new opening, and batches waiting for the old one wake now to look again
    (they pause again at once if the window is still closed). Answers how many moved."""
    now = datetime.now(UTC)
    held = (
        await session.scalars(
            select(Message).where(
                Message.church_id == church.id,
                Message.status == "scheduled",
                Message.urgent.is_(False),
            )
        )
    ).all()
    moved = 0
    for message in held:
        starts = hold_until(church, message.scheduled_at, urgent=False, now=now) or now
        if starts == message.starts_at:
            continue
        message.starts_at = starts
        await session.execute(
            text(
                "UPDATE procrastinate_jobs SET scheduled_at = :at WHERE status = 'todo' "
                "AND task_name = :task AND args->>'message_id' = :id"
            ),
            {"at": starts, "task": START_TASK, "id": str(message.id)},
        )
        moved += 1
    await session.execute(
        text(
            "UPDATE procrastinate_jobs SET scheduled_at = now() WHERE status = 'todo' "
            "AND task_name = :task AND args->>'church_id' = :church AND scheduled_at > now()"
        ),
        {"task": WAKE_TASK, "church": str(church.id)},
    )
    return moved


async def defer_batches(
    job_app: App, session: AsyncSession, message: Message, batches: int
) -> None:
    """All of a new broadcast's batch jobs in one statement (see `defer_batch_of`)."""
    await defer_many_in_transaction(
        job_app,
        session,
        BATCH_TASK,
        [
            (
                -batch_no,
                {
                    "message_id": str(message.id),
                    "created_at": message.created_at.isoformat(),
                    "batch_no": batch_no,
                },
            )
            for batch_no in range(batches)
        ],
        queue=SEND_QUEUE,
        lock=f"sms:{message.church_id}",
    )


async def defer_batch_of(
    job_app: App,
    session: AsyncSession,
    message_id: uuid.UUID,
    created_at: datetime,
    church_id: uuid.UUID,
    batch_no: int,
) -> None:
    """Queue a batch to run now, unless a run of it is queued already.

    Priority falls with the batch number: every church's first batch goes before any
    church's second, so a big broadcast cannot starve a small one. The lock keeps one
    church's batches on one worker slot at a time (they share one number's rate). Never
    future-dated: see `defer_start`.
    """
    if await batch_run_pending(session, message_id, batch_no):
        return
    await defer_in_transaction(
        job_app,
        session,
        BATCH_TASK,
        queue=SEND_QUEUE,
        priority=-batch_no,
        lock=f"sms:{church_id}",
        message_id=str(message_id),
        created_at=created_at.isoformat(),
        batch_no=batch_no,
    )


async def cancel(session: AsyncSession, church_id: uuid.UUID, message_id: uuid.UUID) -> Message:
    message = await get_owned(session, Message, message_id, church_id, what="message")
    await session.refresh(message, with_for_update=True)
    if message.status not in ("scheduled", "queued", "sending"):
        raise MessageNotCancellableError(f"The message is {message.status}")
    rows = await session.execute(
        text(
            "UPDATE message_recipients SET status = 'skipped', skip_reason = 'cancelled', "
            "updated_at = now() WHERE message_id = :id AND created_at = :created "
            "AND status = 'queued' RETURNING segments"
        ),
        {"id": message.id, "created": message.created_at},
    )
    freed = [int(s) for (s,) in rows]
    if freed:
        await apply_transitions(session, [(message.id, "queued", "skipped", len(freed))])
        await refund(session, message, sum(freed), "cancel")
    await session.execute(
        update(Message)
        .where(Message.id == message.id)
        .values(status="cancelled", cancelled_at=func.now(), starts_at=None, updated_at=func.now())
    )
    # Everything still pending for it goes: its start, its batches, their wake-ups.
    await session.execute(
        text(
            "SELECT procrastinate_cancel_job_v1(id, false, true) FROM procrastinate_jobs "
            "WHERE status = 'todo' AND task_name = ANY(:tasks) "
            "AND args->>'message_id' = :id"
        ),
        {"tasks": [START_TASK, BATCH_TASK, WAKE_TASK], "id": str(message.id)},
    )
    await session.refresh(message)
    return message


async def refund(session: AsyncSession, message: Message | Any, segments: int, why: str) -> None:
    """Give back reserved segments that will not be sent (skipped, refused, cancelled,
    or fewer parts than reserved), each refund with its own ledger reference."""
    if segments <= 0:
        return
    await ledger.refund(
        session,
        message.church_id,
        segments,
        debit_reference=f"message:{message.id}",
        credit_reference=f"message:{message.id}:{why}:{uuid.uuid4().hex[:12]}",
    )
    await session.execute(
        update(Message)
        .where(Message.id == message.id)
        .values(segments_refunded=Message.segments_refunded + segments)
    )
