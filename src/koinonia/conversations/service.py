"""The inbox: inbound texts with their compliance keywords, replies, and their receipts."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from procrastinate import App
from sqlalchemy import select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.accounts.tables import Church
from koinonia.billing import ledger
from koinonia.cache import inbox_tag, invalidate_on_commit
from koinonia.conversations.tables import Conversation, ConversationMessage
from koinonia.errors import ConflictError, FieldError, ValidationError
from koinonia.jobs import defer_in_transaction
from koinonia.members import consent
from koinonia.members.crypto import ContactCipher
from koinonia.members.tables import Member
from koinonia.messaging import segments as sms
from koinonia.messaging.keywords import classify
from koinonia.messaging.receipts import RANK, Receipt
from koinonia.settings import Settings

log = structlog.get_logger(__name__)

REPLY_TASK = "conversations:send_reply"
REPLY_QUEUE = "sms"
REPLY_PRIORITY = 100  # inbox replies go ahead of every broadcast batch (priority ≤ 0)


class MemberOptedOutError(ConflictError):
    code = "member_opted_out"
    title = "This member has opted out of texts"


def opt_out_confirmation(church: Church) -> str:
    return f"You are unsubscribed from {church.name}. Reply START to resubscribe."


def opt_in_confirmation(church: Church) -> str:
    return f"You are resubscribed to {church.name}. Reply STOP to unsubscribe, HELP for help."


def help_text(church: Church) -> str:
    return church.help_text or (
        f"{church.name}: texts from your church. Reply STOP to unsubscribe. "
        "Msg & data rates may apply."
    )


async def touch_conversation(
    session: AsyncSession,
    church_id: uuid.UUID,
    member_id: uuid.UUID,
    *,
    body: str,
    direction: str,
    unread: int,
) -> Conversation:
    """The member's conversation (created on first contact), with its last message."""
    now = datetime.now(UTC)
    values: dict[str, Any] = {
        "last_message_at": now,
        "last_message_preview": body[:160],
        "last_message_direction": direction,
        "updated_at": now,
    }
    reopen = {"status": "open"} if direction == "inbound" else {}
    statement = (
        insert(Conversation)
        .values(church_id=church_id, member_id=member_id, unread_count=unread, **values)
        .on_conflict_do_update(
            index_elements=["church_id", "member_id"],
            set_={
                **values,
                **reopen,
                "unread_count": Conversation.unread_count + unread,
            },
        )
        .returning(Conversation)
    )
    conversation: Conversation = (
        await session.scalars(statement, execution_options={"populate_existing": True})
    ).one()
    invalidate_on_commit(session, inbox_tag(church_id))
    return conversation


async def queue_outbound(
    session: AsyncSession,
    job_app: App,
    church: Church,
    member: Member,
    body: str,
    *,
    kind: str = "reply",
    author_id: uuid.UUID | None = None,
    settings: Settings | None = None,
) -> ConversationMessage:
    """Record an outbound text and defer its send in the same transaction.

    A staff reply is billed like a broadcast text (its segments reserved now, `402` when
    the allowance or the subscription does not allow it); compliance confirmations
    (`auto`: STOP/START/HELP answers) always go and are never billed.
    """
    if kind == "reply" and member.opted_out:
        raise MemberOptedOutError("The member texted STOP; they can opt back in with START")
    if kind == "reply" and not body.strip():
        raise ValidationError("The text is blank", errors=[FieldError("body", "is blank")])
    conversation = await touch_conversation(
        session, church.id, member.id, body=body, direction="outbound", unread=0
    )
    message = ConversationMessage(
        church_id=church.id,
        conversation_id=conversation.id,
        direction="outbound",
        body=body,
        status="queued",
        kind=kind,
        author_id=author_id,
        segments=max(1, sms.count(body).segments),
    )
    session.add(message)
    await session.flush()
    await session.refresh(message)
    if kind == "reply":
        if settings is None:
            raise RuntimeError("a billed reply needs the settings")
        await ledger.debit_in(session, settings, church.id, message.segments, reply_debit(message))
    await defer_in_transaction(
        job_app,
        session,
        REPLY_TASK,
        queue=REPLY_QUEUE,
        priority=REPLY_PRIORITY,
        message_id=message.id,
        created_at=message.created_at.isoformat(),
    )
    return message


def reply_debit(message: ConversationMessage) -> str:
    return reply_debit_reference(message.id, message.created_at)


def reply_debit_reference(message_id: int, created_at: datetime) -> str:
    """The ledger reference of a reply's reservation (refunds and replays hang off it)."""
    return f"reply:{message_id}:{created_at.isoformat()}"


@dataclass(frozen=True)
class Inbound:
    provider_id: str
    sender: str
    to: str
    text: str


def parse_inbound(event: dict[str, Any]) -> Inbound | None:
    payload = event.get("data", {}).get("payload") or {}
    try:
        return Inbound(
            provider_id=str(payload["id"]),
            sender=str(payload["from"]["phone_number"]),
            to=str((payload.get("to") or [{}])[0]["phone_number"]),
            text=str(payload.get("text") or ""),
        )
    except (KeyError, TypeError, IndexError):
        return None


async def handle_inbound(
    session: AsyncSession, job_app: App, cipher: ContactCipher, inbound: Inbound
) -> str:
    """Route by the number texted, find (or create) the member, honour keywords, append
    to the conversation. Answers what happened, for logs and tests."""
    church = await session.scalar(select(Church).where(Church.phone_number == inbound.to))
    if church is None:
        log.warning("inbound_for_unknown_number", to_last4=inbound.to[-4:])
        return "unknown_number"
    # A new (unknown) sender, an erased one texting again, keywords, the text itself: all
    # shown in the inbox, invalidated once the worker's transaction commits.
    invalidate_on_commit(session, inbox_tag(church.id))
    phone_hash = cipher.phone_hash(inbound.sender, church.id)
    member = await session.scalar(
        select(Member)
        .where(Member.church_id == church.id, Member.phone_hash == phone_hash)
        .with_for_update()
    )
    if member is None:
        await session.execute(
            insert(Member)
            .values(
                church_id=church.id,
                phone_ct=cipher.encrypt(inbound.sender, church.id),
                phone_hash=phone_hash,
                is_unknown=True,
            )
            .on_conflict_do_nothing(index_elements=["church_id", "phone_hash"])
        )
        member = await session.scalar(
            select(Member)
            .where(Member.church_id == church.id, Member.phone_hash == phone_hash)
            .with_for_update()
        )
        assert member is not None
    if member.erased_at is not None:  # an erased member texted again: answers reach them
        member.phone_ct, member.erased_at = cipher.encrypt(inbound.sender, church.id), None
    duplicate = await session.scalar(
        select(ConversationMessage.id).where(
            ConversationMessage.provider_message_id == inbound.provider_id,
            ConversationMessage.church_id == church.id,
        )
    )
    if duplicate is not None:
        return "duplicate"
    conversation = await touch_conversation(
        session, church.id, member.id, body=inbound.text, direction="inbound", unread=1
    )
    session.add(
        ConversationMessage(
            church_id=church.id,
            conversation_id=conversation.id,
            direction="inbound",
            body=inbound.text,
            status="received",
            kind="inbound",
            provider_message_id=inbound.provider_id,
            segments=max(1, sms.count(inbound.text).segments),
        )
    )
    await session.flush()
    keyword = classify(inbound.text)
    now = datetime.now(UTC)
    if keyword == "opt_out":
        if member.opted_out:
            return "opt_out_repeated"  # confirmed once already: send nothing more
        member.opted_out, member.opted_out_at, member.opted_out_source = True, now, "keyword"
        member.updated_at = now
        consent.record(session, member, source="keyword")
        await queue_outbound(
            session, job_app, church, member, opt_out_confirmation(church), kind="auto"
        )
        return "opted_out"
    if keyword == "opt_in":
        if not member.opted_out:
            return "message"
        member.opted_out, member.opted_out_at, member.opted_out_source = False, None, None
        member.updated_at = now
        consent.record(session, member, source="keyword", at=now)
        await queue_outbound(
            session, job_app, church, member, opt_in_confirmation(church), kind="auto"
        )
        return "opted_in"
    if keyword == "help":
        await queue_outbound(session, job_app, church, member, help_text(church), kind="auto")
        return "help"
    return "message"


CM_RANK_SQL = "CASE status WHEN 'queued' THEN 0 WHEN 'sending' THEN 1 WHEN 'sent' THEN 2 ELSE 3 END"


async def apply_reply_receipts(session: AsyncSession, receipts: list[Receipt]) -> int:
    """Receipts of inbox texts: by reference, else by Telnyx id; only ever forward."""
    changed = 0
    for receipt in receipts:
        if receipt.ref is not None:
            where = "id = :id AND created_at = :created"
            params: dict[str, Any] = {"id": receipt.ref.id, "created": receipt.ref.created_at}
        else:
            where = "provider_message_id = :provider_id"
            params = {}
        result = await session.execute(
            text(
                f"UPDATE conversation_messages SET "  # noqa: S608 - constant fragments
                f"status = CASE WHEN :rank > {CM_RANK_SQL} THEN :status ELSE status END, "
                "provider_message_id = coalesce(provider_message_id, :provider_id), "
                "error_code = coalesce(:code, error_code), in_doubt_since = NULL, "
                "updated_at = now() "
                f"WHERE {where} AND direction = 'outbound' "
                f"AND (:rank > {CM_RANK_SQL} OR provider_message_id IS NULL)"
            ),
            {
                **params,
                "rank": RANK[receipt.status],
                "status": receipt.status,
                "provider_id": receipt.provider_id,
                "code": receipt.error_code,
            },
        )
        changed += int(getattr(result, "rowcount", 0) or 0)
    return changed


async def mark_read(session: AsyncSession, conversation: Conversation) -> None:
    await session.execute(
        update(Conversation)
        .where(Conversation.id == conversation.id)
        .values(unread_count=0, updated_at=datetime.now(UTC))
    )
    invalidate_on_commit(session, inbox_tag(conversation.church_id))
