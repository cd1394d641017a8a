"""Re-normalise the phones already stored (`koinonia members renormalize-phones`).

Before phones were made ASCII first, a number written with other digits (`+1 212 5٥٥
٠١٢٣`) was stored as is: not E.164, under a blind index of its own, so the same phone could
be two members. For every member of every church (deleted ones too: consent outlives
deletion) this decrypts the phone, normalises it with `to_e164` and, when it changes,
re-encrypts and re-hashes it, in batches, each its own transaction with its rows locked.

When the normalised phone already belongs to another member of the church (the *keeper*,
which holds the blind index), the non-canonical row (the *twin*) cannot take the index:

- any opt-out is copied to both rows (the earliest opt-out wins, with its time and source),
  so the twin that had not opted out stops being texted at once;
- the twin's phone is re-encrypted as the E.164 number (its blind index stays its own), so
  every send checks the real number against the suppression list and a later STOP from
  that phone silences both rows;
- the twin is flagged `review_reason = 'duplicate_phone'`, `duplicate_of = keeper`, and
  listed, for a person to merge or delete.

A phone that cannot be normalised at all is flagged `invalid_phone` and listed. Running
the command again changes nothing more (it is idempotent).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.accounts.tables import Church
from koinonia.cache import inbox_tag, invalidate_on_commit
from koinonia.db import Database
from koinonia.members import consent
from koinonia.members.crypto import ContactCipher
from koinonia.members.phones import InvalidPhoneError, to_e164
from koinonia.members.tables import Member

DUPLICATE = "duplicate_phone"
INVALID = "invalid_phone"


@dataclass(frozen=True)
class Flagged:
    church_id: uuid.UUID
    member_id: uuid.UUID
    reason: str
    duplicate_of: uuid.UUID | None


@dataclass
class Renormalized:
    checked: int = 0
    rewritten: int = 0
    opt_outs_copied: int = 0
    flagged: list[Flagged] = field(default_factory=list)


def _copy_opt_out(source: Member, target: Member) -> bool:
    """`target` takes `source`'s opt-out if it has none or a later one."""
    if not source.opted_out:
        return False
    if target.opted_out and (
        target.opted_out_at is None
        or source.opted_out_at is None
        or target.opted_out_at <= source.opted_out_at
    ):
        return False
    target.opted_out = True
    target.opted_out_at = source.opted_out_at
    target.opted_out_source = source.opted_out_source
    return True


async def _fix(
    session: AsyncSession, cipher: ContactCipher, member: Member, region: str, now: datetime
) -> tuple[bool, int, Flagged | None]:
    """(rewritten, opt-outs copied, flag) for one locked member."""
    church_id = member.church_id
    stored = cipher.decrypt(member.phone_ct, church_id)
    try:
        canonical = to_e164(stored, region)
    except InvalidPhoneError:
        if member.review_reason != INVALID:
            member.review_reason, member.duplicate_of = INVALID, None
            member.updated_at = now
        return False, 0, Flagged(church_id, member.id, INVALID, None)
    canonical_hash = cipher.phone_hash(canonical, church_id)
    if stored == canonical and member.phone_hash == canonical_hash:
        return False, 0, None
    keeper = await session.scalar(
        select(Member)
        .where(
            Member.church_id == church_id,
            Member.phone_hash == canonical_hash,
            Member.id != member.id,
        )
        .with_for_update()
    )
    rewritten = stored != canonical
    if rewritten:
        member.phone_ct = cipher.encrypt(canonical, church_id)
        member.updated_at = now
        invalidate_on_commit(session, inbox_tag(church_id))  # the inbox shows the phone
    if keeper is None:
        member.phone_hash = canonical_hash
        if member.review_reason is not None:
            member.review_reason, member.duplicate_of = None, None
        return True, 0, None
    copied = 0
    for source, target in ((keeper, member), (member, keeper)):
        if _copy_opt_out(source, target):
            copied += 1
            consent.record(session, target, source="renormalize", at=now)
    if copied:
        member.updated_at = keeper.updated_at = now
    member.review_reason, member.duplicate_of = DUPLICATE, keeper.id
    return rewritten, copied, Flagged(church_id, member.id, DUPLICATE, keeper.id)


async def renormalize_phones(
    database: Database, cipher: ContactCipher, batch: int = 1000
) -> Renormalized:
    result = Renormalized()
    after = uuid.UUID(int=0)
    while True:
        async with database.unit_of_work() as session:
            now = datetime.now(UTC)
            rows = (
                await session.execute(
                    select(Member, Church.default_region)
                    .join(Church, Church.id == Member.church_id)
                    .where(Member.id > after, Member.erased_at.is_(None))  # no phone left
                    .order_by(Member.id)
                    .limit(batch)
                    .with_for_update(of=Member)
                )
            ).all()
            for member, region in rows:
                rewritten, copied, flag = await _fix(session, cipher, member, region, now)
                result.checked += 1
                result.rewritten += int(rewritten)
                result.opt_outs_copied += copied
                if flag is not None:
                    result.flagged.append(flag)
                await session.flush()
        if len(rows) < batch:
            return result
        after = rows[-1][0].id


async def flagged_members(database: Database) -> list[Flagged]:
    """Every member waiting for review (from this run or earlier ones), oldest first."""
    async with database.unit_of_work() as session:
        rows = await session.execute(
            select(Member.church_id, Member.id, Member.review_reason, Member.duplicate_of)
            .where(Member.review_reason.is_not(None))
            .order_by(Member.church_id, Member.created_at, Member.id)
        )
        return [Flagged(c, m, str(r), d) for c, m, r, d in rows]
