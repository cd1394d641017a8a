"""Member rules: normalised, encrypted, de-duplicated contacts, scoped to one church."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, delete, exists, literal_column, select
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.accounts.tables import Church
from koinonia.cache import group_counts_tag, inbox_tag, invalidate_on_commit
from koinonia.errors import ConflictError, FieldError, NotFoundError, ValidationError
from koinonia.groups.tables import Group, GroupMember
from koinonia.members import consent
from koinonia.members.crypto import ContactCipher
from koinonia.members.phones import InvalidPhoneError, to_e164
from koinonia.members.schemas import MemberCreate, MemberOut, MemberUpdate
from koinonia.members.tables import Member
from koinonia.tenancy import get_owned


async def church_region(session: AsyncSession, church_id: uuid.UUID) -> str:
    region = await session.scalar(select(Church.default_region).where(Church.id == church_id))
    return region or "US"


def normalise_phone(raw: str, region: str) -> str:
    try:
        return to_e164(raw, region)
    except InvalidPhoneError as error:
        raise ValidationError(
            "The phone number is not valid", errors=[FieldError("phone", str(error))]
        ) from None


def to_out(member: Member, cipher: ContactCipher) -> MemberOut:
    return MemberOut(
        id=member.id,
        first_name=member.first_name,
        last_name=member.last_name,
        phone=cipher.decrypt(member.phone_ct, member.church_id),
        email=cipher.decrypt(member.email_ct, member.church_id) if member.email_ct else None,
        opted_out=member.opted_out,
        opted_out_at=member.opted_out_at,
        opted_out_source=member.opted_out_source,
        is_unknown=member.is_unknown,
        created_at=member.created_at,
        updated_at=member.updated_at,
    )


def live(statement: Select[Any], church_id: uuid.UUID) -> Select[Any]:
    return statement.where(Member.church_id == church_id, Member.deleted_at.is_(None))


async def get_member(session: AsyncSession, church_id: uuid.UUID, member_id: uuid.UUID) -> Member:
    member = await get_owned(session, Member, member_id, church_id, what="member")
    if member.deleted_at is not None:
        raise NotFoundError("No such member")
    return member


def _set_opt_out(member: Member, opted_out: bool, source: str) -> bool:
    """Answers whether the state changed (the caller records it in the consent history)."""
    if opted_out == member.opted_out:
        return False
    member.opted_out = opted_out
    member.opted_out_at = datetime.now(UTC) if opted_out else None
    member.opted_out_source = source if opted_out else None
    return True


async def _check_groups(
    session: AsyncSession, church_id: uuid.UUID, group_ids: list[uuid.UUID]
) -> None:
    if not group_ids:
        return
    found = set(
        await session.scalars(
            select(Group.id).where(Group.church_id == church_id, Group.id.in_(group_ids))
        )
    )
    missing = [str(g) for g in group_ids if g not in found]
    if missing:
        raise ValidationError(
            "Some groups do not exist",
            errors=[FieldError("group_ids", f"no such group: {g}") for g in missing],
        )


async def create_member(
    session: AsyncSession,
    cipher: ContactCipher,
    church_id: uuid.UUID,
    body: MemberCreate,
    actor_id: uuid.UUID | None = None,
) -> Member:
    phone = normalise_phone(body.phone, await church_region(session, church_id))
    await _check_groups(session, church_id, body.group_ids)
    phone_hash = cipher.phone_hash(phone, church_id)
    member = (
        await session.execute(
            select(Member).where(Member.church_id == church_id, Member.phone_hash == phone_hash)
        )
    ).scalar_one_or_none()
    if member is not None and member.deleted_at is None:
        raise ConflictError("A member with this phone number already exists")
    if member is None:
        member = Member(church_id=church_id, phone_hash=phone_hash)
        session.add(member)
    else:  # a deleted member comes back, keeping their opt-out (consent outlives deletion;
        # an erased one that had opted out is found by its blind index, still opted out)
        member.deleted_at = member.erased_at = None
        member.is_unknown = False
    member.first_name = body.first_name
    member.last_name = body.last_name
    member.phone_ct = cipher.encrypt(phone, church_id)
    member.email_ct = cipher.encrypt(str(body.email).lower(), church_id) if body.email else None
    member.email_hash = cipher.email_hash(str(body.email), church_id) if body.email else None
    member.updated_at = datetime.now(UTC)
    changed = body.opted_out and _set_opt_out(member, True, "api")
    await session.flush()
    if changed:
        consent.record(session, member, source="api", actor_id=actor_id)
    for group_id in dict.fromkeys(body.group_ids):
        session.add(GroupMember(group_id=group_id, member_id=member.id))
    await session.flush()
    await session.refresh(member)
    # A member coming back shows their new name in the inbox; groups count them.
    invalidate_on_commit(session, inbox_tag(church_id), group_counts_tag(church_id))
    return member


async def update_member(
    session: AsyncSession,
    cipher: ContactCipher,
    church_id: uuid.UUID,
    member_id: uuid.UUID,
    body: MemberUpdate,
    actor_id: uuid.UUID | None = None,
) -> Member:
    member = await get_member(session, church_id, member_id)
    changes = body.model_dump(exclude_unset=True)
    if changes.get("first_name") is not None:
        member.first_name = changes["first_name"]
    if changes.get("last_name") is not None:
        member.last_name = changes["last_name"]
    if body.phone is not None:
        phone = normalise_phone(body.phone, await church_region(session, church_id))
        member.phone_hash = cipher.phone_hash(phone, church_id)
        member.phone_ct = cipher.encrypt(phone, church_id)
        member.is_unknown = False
    if "email" in changes:
        member.email_ct = cipher.encrypt(str(body.email).lower(), church_id) if body.email else None
        member.email_hash = cipher.email_hash(str(body.email), church_id) if body.email else None
    if body.opted_out is not None and _set_opt_out(member, body.opted_out, "api"):
        consent.record(session, member, source="api", actor_id=actor_id)
    member.updated_at = datetime.now(UTC)
    await session.flush()
    await session.refresh(member)
    invalidate_on_commit(session, inbox_tag(church_id))  # name, phone, opt-out shown there
    return member


async def delete_member(session: AsyncSession, church_id: uuid.UUID, member_id: uuid.UUID) -> None:
    """Soft delete: the row stays (opt-out history, message history), hidden everywhere."""
    member = await get_member(session, church_id, member_id)
    member.deleted_at = datetime.now(UTC)
    await session.execute(delete(GroupMember).where(GroupMember.member_id == member.id))
    invalidate_on_commit(session, group_counts_tag(church_id), inbox_tag(church_id))


def search_filter(cipher: ContactCipher, church_id: uuid.UUID, region: str, q: str) -> Any:
    """`q` as a phone (exact, by blind index), an email (exact) or a name fragment."""
    if "@" in q:
        return Member.email_hash == cipher.email_hash(q, church_id)
    digits = sum(c.isdigit() for c in q)
    if digits >= 7:
        try:
            return Member.phone_hash == cipher.phone_hash(to_e164(q, region), church_id)
        except InvalidPhoneError:
            pass
    pattern = "%" + q.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    return literal_column("lower(members.first_name || ' ' || members.last_name)").like(pattern)


def in_group(group_id: uuid.UUID) -> Any:
    return exists().where(GroupMember.group_id == group_id, GroupMember.member_id == Member.id)
