"""Member data rights: export everything held on a member, or erase it.

**Export** (`GET /members/{id}/export`): the profile (phone and email decrypted), groups,
consent history, every broadcast addressed to them (the recipient row with the body
rendered for them beside the template) and their conversation — one JSON document.

**Erase** (`POST /members/{id}/erase`, owner only; cannot be undone) removes their personal
data everywhere, in one transaction:

- the member row becomes a tombstone: no names, no email, the phone sealed as an empty
  string (so code that reads a phone gets "" and sends nothing), `deleted_at` and
  `erased_at` set. The row and its id stay, so recipient rows, conversation texts and
  billing keep pointing somewhere and every aggregate (broadcast counters, segments, the
  ledger) stays as it was;
- a member who had **opted out** keeps the church's blind index of the phone
  (`phone_hash`: HMAC-SHA256 with `MEMBER_HMAC_KEY` over church, field and E.164 — a keyed
  hash, no plain text) with `opted_out`, its time and source, and gets an `erase` consent
  event: adding or importing that phone again finds the tombstone and brings it back
  **opted out**, and broadcasts skip it. The `suppressions` rows of the church's number
  (a keyed hash too) are left as they are. Anyone else gets a random blind index: nothing
  is left that links to the phone;
- conversation texts to and from them keep their row (status, segments: billing) with an
  empty body, no error detail and, once final, no provider id; the conversation is
  archived with no preview;
- broadcast recipient rows keep status and segments; error details go, and so do the
  provider ids of rows that are final. Rows still queued are skipped by the sender (the
  member is deleted), refunded as usual;
- Telnyx `webhook_events` that name them: the sealed ones (applied or dead-lettered) by
  the provider message ids and our webhook references of their texts, the ones still
  readable by their phone; with the dead letters of those events;
- group memberships.

Consent history and the audit log name the member by id only and are kept.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import delete, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.accounts.principal import Principal
from koinonia.accounts.tables import Church
from koinonia.audit import service as audit
from koinonia.cache import group_counts_tag, inbox_tag, invalidate_on_commit
from koinonia.conversations.tables import Conversation
from koinonia.errors import NotFoundError
from koinonia.groups.tables import Group, GroupMember
from koinonia.members import consent
from koinonia.members.crypto import ContactCipher, DecryptionError
from koinonia.members.schemas import (
    ConsentEventOut,
    ErasureOut,
    ExportBroadcastText,
    ExportConversation,
    ExportConversationText,
    ExportGroup,
    ExportMember,
    MemberExport,
)
from koinonia.members.service import to_out
from koinonia.members.tables import ConsentEvent, Member
from koinonia.messaging import refs
from koinonia.settings import Settings
from koinonia.templates.rendering import render

# A member's broadcasts, through the church's broadcasts (recipients have no index on
# member_id: it would slow every fan-out); a broadcast's recipients share its created_at,
# so each lookup prunes to one partition, and none predates the member.
RECIPIENTS_SQL = """
SELECT r.id, r.created_at, r.message_id, r.status, r.skip_reason, r.sent_at, r.segments,
       r.provider_message_id, m.body AS template
FROM messages m
JOIN message_recipients r ON r.message_id = m.id AND r.created_at = m.created_at
WHERE m.church_id = :church_id AND m.created_at >= :since AND r.member_id = :member_id
ORDER BY r.created_at, r.id
"""

CONVERSATION_TEXTS_SQL = """
SELECT id, created_at, direction, kind, status, body, segments, provider_message_id
FROM conversation_messages
WHERE conversation_id = :conversation_id AND church_id = :church_id AND created_at >= :since
ORDER BY created_at, id
"""

# Recipient rows keep status and segments (counters, billing); what could name the person
# goes: error details, and provider ids once no receipt needs them.
ERASE_RECIPIENTS_SQL = """
UPDATE message_recipients r SET
  error_detail = NULL,
  provider_message_id = CASE WHEN r.status IN ('delivered', 'failed', 'undelivered', 'skipped')
                             THEN NULL ELSE r.provider_message_id END
FROM messages m
WHERE r.message_id = m.id AND r.created_at = m.created_at
  AND m.church_id = :church_id AND m.created_at >= :since AND r.member_id = :member_id
  AND (r.error_detail IS NOT NULL OR r.provider_message_id IS NOT NULL)
"""

ERASE_TEXTS_SQL = """
UPDATE conversation_messages SET
  body = '',
  error_detail = NULL,
  provider_message_id = CASE WHEN status IN ('delivered', 'failed', 'undelivered', 'received')
                             THEN NULL ELSE provider_message_id END
WHERE conversation_id = :conversation_id AND church_id = :church_id AND created_at >= :since
"""

# Telnyx events naming the person: sealed ones by the ids and references of their texts
# (their phone is encrypted), readable ones (not applied yet) by the phone itself. The
# dead letters of those events go with them.
ERASE_EVENTS_SQL = """
WITH gone AS (
  DELETE FROM webhook_events
  WHERE provider = 'telnyx' AND (
    payload->'data'->'payload'->>'id' = ANY(CAST(:provider_ids AS text[]))
    OR payload->>'koinonia_ref' = ANY(CAST(:refs AS text[]))
    OR (CAST(:phone AS text) IS NOT NULL AND NOT payload ? 'sealed' AND (
      payload #>> '{data,payload,from,phone_number}' = :phone
      OR payload->'data'->'payload'->'to' @> CAST(:to AS jsonb)))
  )
  RETURNING id
), letters AS (
  DELETE FROM dead_letters
  WHERE kind = 'webhook.telnyx'
    AND payload->>'webhook_event_id' IN (SELECT CAST(id AS text) FROM gone)
)
SELECT count(*) FROM gone
"""


async def _find(
    session: AsyncSession, church_id: uuid.UUID, member_id: uuid.UUID, *, lock: bool = False
) -> Member:
    """The church's member, soft-deleted ones included (they still hold personal data);
    an erased one, or another church's, is a 404."""
    query = select(Member).where(
        Member.id == member_id, Member.church_id == church_id, Member.erased_at.is_(None)
    )
    member = await session.scalar(query.with_for_update() if lock else query)
    if member is None:
        raise NotFoundError("No such member")
    return member


async def consent_history(
    session: AsyncSession, member_id: uuid.UUID, *, newest_first: bool = False
) -> list[ConsentEventOut]:
    order = (
        (ConsentEvent.at.desc(), ConsentEvent.id.desc())
        if newest_first
        else (ConsentEvent.at, ConsentEvent.id)
    )
    rows = await session.scalars(
        select(ConsentEvent).where(ConsentEvent.member_id == member_id).order_by(*order)
    )
    return [ConsentEventOut.model_validate(row) for row in rows]


async def member_consent(
    session: AsyncSession, church_id: uuid.UUID, member_id: uuid.UUID
) -> list[ConsentEventOut]:
    """`GET /members/{id}/consent`: newest first (soft-deleted members included)."""
    await _find(session, church_id, member_id)
    return await consent_history(session, member_id, newest_first=True)


async def export_member(
    session: AsyncSession, cipher: ContactCipher, principal: Principal, member_id: uuid.UUID
) -> MemberExport:
    church_id = principal.church_id
    member = await _find(session, church_id, member_id)
    church = await session.get_one(Church, church_id)
    names = {
        "first_name": member.first_name,
        "last_name": member.last_name,
        "church_name": church.name,
    }
    groups = await session.execute(
        select(Group.id, Group.name, GroupMember.added_at)
        .join(GroupMember, GroupMember.group_id == Group.id)
        .where(GroupMember.member_id == member.id, Group.church_id == church_id)
        .order_by(GroupMember.added_at, Group.id)
    )
    recipients = await session.execute(
        text(RECIPIENTS_SQL),
        {"church_id": church_id, "member_id": member.id, "since": member.created_at},
    )
    broadcasts = [
        ExportBroadcastText(
            message_id=row.message_id,
            recipient_id=row.id,
            created_at=row.created_at,
            status=row.status,
            skip_reason=row.skip_reason,
            sent_at=row.sent_at,
            segments=row.segments,
            provider_message_id=row.provider_message_id,
            template=row.template,
            body=render(row.template, names),
        )
        for row in recipients
    ]
    conversation = await session.scalar(
        select(Conversation).where(
            Conversation.church_id == church_id, Conversation.member_id == member.id
        )
    )
    thread = None
    if conversation is not None:
        texts = await session.execute(
            text(CONVERSATION_TEXTS_SQL),
            {
                "conversation_id": conversation.id,
                "church_id": church_id,
                "since": conversation.created_at,
            },
        )
        thread = ExportConversation(
            id=conversation.id,
            status=conversation.status,
            created_at=conversation.created_at,
            texts=[ExportConversationText.model_validate(row) for row in texts],
        )
    exported = MemberExport(
        exported_at=datetime.now(UTC),
        church_id=church_id,
        member=ExportMember(
            **to_out(member, cipher).model_dump(),
            deleted_at=member.deleted_at,
            review_reason=member.review_reason,
        ),
        groups=[ExportGroup(id=g.id, name=g.name, added_at=g.added_at) for g in groups],
        consent_history=await consent_history(session, member.id),
        broadcasts=broadcasts,
        conversation=thread,
    )
    audit.record(
        session,
        action="member.exported",
        church_id=church_id,
        actor_id=principal.actor_id,
        actor_kind=principal.actor_kind,
        target_type="member",
        target_id=member.id,
        details={
            "broadcasts": len(broadcasts),
            "conversation_texts": len(thread.texts) if thread else 0,
        },
    )
    return exported


@dataclass
class _Texts:
    provider_ids: list[str]
    refs: list[str]


async def _texts_of(
    session: AsyncSession,
    settings: Settings,
    member: Member,
    conversation: Conversation | None,
) -> _Texts:
    """Provider ids and webhook references of every text to or from the member."""
    key = refs.ref_key(settings.member_hmac_key.get_secret_value())
    found = _Texts([], [])
    recipients = await session.execute(
        text(RECIPIENTS_SQL),
        {"church_id": member.church_id, "member_id": member.id, "since": member.created_at},
    )
    for row in recipients:
        found.refs.append(refs.encode(key, refs.RowRef("r", int(row.id), row.created_at)))
        if row.provider_message_id:
            found.provider_ids.append(row.provider_message_id)
    if conversation is not None:
        texts = await session.execute(
            text(CONVERSATION_TEXTS_SQL),
            {
                "conversation_id": conversation.id,
                "church_id": member.church_id,
                "since": conversation.created_at,
            },
        )
        for row in texts:
            found.refs.append(refs.encode(key, refs.RowRef("c", int(row.id), row.created_at)))
            if row.provider_message_id:
                found.provider_ids.append(row.provider_message_id)
    return found


async def erase_member(
    session: AsyncSession,
    cipher: ContactCipher,
    settings: Settings,
    principal: Principal,
    member_id: uuid.UUID,
) -> ErasureOut:
    church_id = principal.church_id
    member = await _find(session, church_id, member_id, lock=True)
    now = datetime.now(UTC)
    try:
        phone: str | None = cipher.decrypt(member.phone_ct, church_id) or None
    except DecryptionError:  # a retired key: sealed events are still found by their ids
        phone = None
    conversation = await session.scalar(
        select(Conversation)
        .where(Conversation.church_id == church_id, Conversation.member_id == member.id)
        .with_for_update()
    )
    texts = await _texts_of(session, settings, member, conversation)
    events = int(
        await session.scalar(
            text(ERASE_EVENTS_SQL),
            {
                "provider_ids": texts.provider_ids,
                "refs": texts.refs,
                "phone": phone,
                "to": json.dumps([{"phone_number": phone}] if phone else []),
            },
        )
        or 0
    )
    conversation_texts = 0
    if conversation is not None:
        erased_texts = await session.execute(
            text(ERASE_TEXTS_SQL),
            {
                "conversation_id": conversation.id,
                "church_id": church_id,
                "since": conversation.created_at,
            },
        )
        conversation_texts = int(getattr(erased_texts, "rowcount", 0) or 0)
        conversation.last_message_preview = None
        conversation.last_message_direction = None
        conversation.unread_count = 0
        conversation.status = "archived"
        conversation.updated_at = now
    await session.execute(
        text(ERASE_RECIPIENTS_SQL),
        {"church_id": church_id, "member_id": member.id, "since": member.created_at},
    )
    memberships = await session.execute(
        delete(GroupMember).where(GroupMember.member_id == member.id)
    )
    kept = member.opted_out
    member.first_name = member.last_name = ""
    member.phone_ct = cipher.encrypt("", church_id)
    if not kept:  # nothing may link the tombstone to the phone
        member.phone_hash = os.urandom(32)
    member.email_ct = member.email_hash = None
    member.review_reason = None
    member.duplicate_of = None
    member.is_unknown = False
    member.deleted_at = member.deleted_at or now
    member.erased_at = now
    member.updated_at = now
    if kept:
        consent.record(session, member, source="erase", at=now)
    await session.flush()
    # Cached answers naming the member (inbox) or counting them (groups) go too.
    invalidate_on_commit(session, inbox_tag(church_id), group_counts_tag(church_id))
    result = ErasureOut(
        member_id=member.id,
        erased_at=now,
        suppression_kept=kept,
        group_memberships=int(getattr(memberships, "rowcount", 0) or 0),
        conversation_texts=conversation_texts,
        broadcast_recipients=len([r for r in texts.refs if r.startswith("r.")]),
        provider_events=events,
    )
    audit.record(
        session,
        action="member.erased",
        church_id=church_id,
        actor_id=principal.actor_id,
        actor_kind=principal.actor_kind,
        target_type="member",
        target_id=member.id,
        details=result.model_dump(mode="json", exclude={"member_id", "erased_at"}),
    )
    return result
