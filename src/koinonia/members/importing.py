"""CSV import, set-based: stream-parse, validate and encrypt each row in Python, `COPY` the
good rows into a temporary staging table as they are read (PostgreSQL ingests on its own
core while Python parses), then one `INSERT … SELECT … ON CONFLICT` merges them.

The whole merge is one transaction: an import either lands completely or not at all,
while bad rows are reported (row, field, reason) and never stop the good ones.
"""

from __future__ import annotations

import codecs
import csv
import re
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.cache import group_counts_tag, inbox_tag, invalidate_on_commit
from koinonia.jobs import raw_connection
from koinonia.members.crypto import ContactCipher
from koinonia.members.phones import InvalidPhoneError, to_e164
from koinonia.text import unsafe_character

FIELDS = ("first_name", "last_name", "phone", "email", "name")
HEADER_ALIASES: dict[str, tuple[str, ...]] = {
    "first_name": ("first_name", "first name", "firstname", "first", "given name"),
    "last_name": ("last_name", "last name", "lastname", "last", "surname", "family name"),
    "phone": (
        "phone",
        "phone number",
        "phone_number",
        "mobile",
        "mobile phone",
        "cell",
        "cell phone",
        "telephone",
    ),
    "email": ("email", "e-mail", "email address", "email_address"),
    "name": ("name", "full name", "full_name"),
}
MAX_REPORTED_ERRORS = 1000
MAX_NAME = 100
PROGRESS_EVERY = 10_000
_EMAIL = re.compile(r"^[^@\s,;<>]+@[^@\s,;<>]+\.[^@\s,;<>]+$")

Progress = Callable[[int], Awaitable[None]]


class ImportFailedError(Exception):
    """The file as a whole cannot be imported (not CSV, no phone column …)."""


@dataclass
class ImportResult:
    processed: int = 0
    created: int = 0
    updated: int = 0
    skipped: int = 0
    error_count: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)

    def error(self, row: int, field_name: str, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append({"row": row, "field": field_name, "message": message})


@dataclass(frozen=True)
class ImportOptions:
    church_id: uuid.UUID
    region: str
    on_duplicate: str = "update"  # or "skip"
    group_id: uuid.UUID | None = None
    column_map: dict[str, str] = field(default_factory=dict)


def map_columns(header: list[str], overrides: dict[str, str]) -> dict[str, int]:
    """Our field → column index, from explicit overrides, else from known header names."""
    normalised = [h.strip().lower() for h in header]
    mapping: dict[str, int] = {}
    for field_name, column in overrides.items():
        if field_name not in FIELDS:
            raise ImportFailedError(f"column_map: unknown field {field_name!r}")
        if column.strip().lower() not in normalised:
            raise ImportFailedError(f"column_map: the file has no column {column!r}")
        mapping[field_name] = normalised.index(column.strip().lower())
    for field_name, aliases in HEADER_ALIASES.items():
        if field_name in mapping:
            continue
        for index, name in enumerate(normalised):
            if name in aliases and index not in mapping.values():
                mapping[field_name] = index
                break
    if "phone" not in mapping:
        raise ImportFailedError(
            "The file has no phone column (expected a header such as 'phone' or 'mobile', "
            "or a column_map)"
        )
    return mapping


def _lines(stream: IO[bytes]) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    pending = ""
    try:
        while chunk := stream.read(1 << 16):
            pending += decoder.decode(chunk)
            *complete, pending = pending.split("\n")
            for line in complete:
                yield line + "\n"
        pending += decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ImportFailedError("The file is not UTF-8 text") from None
    if pending:
        yield pending


class RowTransformer:
    """One CSV row → the staging tuple (encrypted, hashed) or errors on `result`."""

    def __init__(
        self,
        options: ImportOptions,
        cipher: ContactCipher,
        mapping: dict[str, int],
        result: ImportResult,
    ) -> None:
        self.options = options
        self.cipher = cipher
        self.mapping = mapping
        self.result = result
        self.seen: dict[bytes, int] = {}

    def _cell(self, row: list[str], field_name: str) -> str:
        index = self.mapping.get(field_name)
        return row[index].strip() if index is not None and index < len(row) else ""

    def _unsafe(self, row_number: int, row: list[str]) -> bool:
        """Report each used cell PostgreSQL or SMS cannot carry (NUL, C0 controls)."""
        bad = False
        for field_name, index in self.mapping.items():
            reason = unsafe_character(row[index]) if index < len(row) else None
            if reason is not None:
                self.result.error(row_number, field_name, reason)
                bad = True
        return bad

    def __call__(self, row_number: int, row: list[str]) -> tuple[Any, ...] | None:
        church_id = self.options.church_id
        if self._unsafe(row_number, row):
            self.result.skipped += 1
            return None
        first, last = self._cell(row, "first_name"), self._cell(row, "last_name")
        if not first and not last and "name" in self.mapping:
            first, _, last = self._cell(row, "name").partition(" ")
        bad = False
        for field_name, value in (("first_name", first), ("last_name", last)):
            if len(value) > MAX_NAME:
                self.result.error(row_number, field_name, f"is longer than {MAX_NAME} characters")
                bad = True
        try:
            phone = to_e164(self._cell(row, "phone"), self.options.region)
        except InvalidPhoneError as error:
            self.result.error(row_number, "phone", str(error))
            bad = True
        email = self._cell(row, "email").lower()
        if email and (len(email) > 254 or not _EMAIL.match(email)):
            self.result.error(row_number, "email", "is not an email address")
            bad = True
        if bad:
            self.result.skipped += 1
            return None
        phone_hash = self.cipher.phone_hash(phone, church_id)
        first_row = self.seen.get(phone_hash)
        if first_row is not None:
            self.result.error(row_number, "phone", f"duplicate of row {first_row}; skipped")
            self.result.skipped += 1
            return None
        self.seen[phone_hash] = row_number
        return (
            first,
            last,
            self.cipher.encrypt(phone, church_id),
            phone_hash,
            self.cipher.encrypt(email, church_id) if email else None,
            self.cipher.email_hash(email, church_id) if email else None,
        )


_STAGING = """
CREATE TEMPORARY TABLE import_staging (
    first_name text, last_name text, phone_ct bytea, phone_hash bytea,
    email_ct bytea, email_hash bytea
) ON COMMIT DROP
"""
_COPY = (
    "COPY import_staging (first_name, last_name, phone_ct, phone_hash, email_ct, email_hash) "
    "FROM STDIN"
)
_INSERT = """
INSERT INTO members AS m (church_id, first_name, last_name, phone_ct, phone_hash,
                          email_ct, email_hash)
SELECT :church_id, first_name, last_name, phone_ct, phone_hash, email_ct, email_hash
FROM import_staging
"""
_MERGE_UPDATE = f"""
WITH merged AS (
    {_INSERT}
    ON CONFLICT (church_id, phone_hash) DO UPDATE SET
        first_name = EXCLUDED.first_name,
        last_name = EXCLUDED.last_name,
        phone_ct = EXCLUDED.phone_ct,
        email_ct = COALESCE(EXCLUDED.email_ct, m.email_ct),
        email_hash = COALESCE(EXCLUDED.email_hash, m.email_hash),
        deleted_at = NULL,
        erased_at = NULL,
        updated_at = now()
    RETURNING m.id, (m.xmax = 0) AS inserted
){{group_cte}}
SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM merged
"""  # noqa: S608 - built from constant fragments only
_MERGE_SKIP = f"""
WITH merged AS (
    {_INSERT}
    ON CONFLICT (church_id, phone_hash) DO NOTHING
    RETURNING m.id, true AS inserted
){{group_cte}}
SELECT count(*), 0 FROM merged
"""  # noqa: S608 - built from constant fragments only
_GROUP_CTE = """, grouped AS (
    INSERT INTO group_members (group_id, member_id)
    SELECT :group_id, id FROM merged
    ON CONFLICT DO NOTHING
)"""
# In skip mode the members already there join the group too.
_GROUP_EXISTING = """
INSERT INTO group_members (group_id, member_id)
SELECT :group_id, m.id FROM import_staging s
JOIN members m ON m.church_id = :church_id AND m.phone_hash = s.phone_hash
WHERE m.deleted_at IS NULL
ON CONFLICT DO NOTHING
"""


async def run_import(
    session: AsyncSession,
    stream: IO[bytes],
    options: ImportOptions,
    cipher: ContactCipher,
    progress: Progress | None = None,
) -> ImportResult:
    """Import inside the session's transaction (the caller commits)."""
    result = ImportResult()
    reader = csv.reader(_lines(stream))
    try:
        header = next(reader)
    except StopIteration:
        raise ImportFailedError("The file is empty") from None
    except csv.Error as error:
        raise ImportFailedError(f"The file is not valid CSV: {error}") from None
    transform = RowTransformer(options, cipher, map_columns(header, options.column_map), result)
    await session.execute(text(_STAGING))
    connection = await raw_connection(session)
    row_number = 1
    async with connection.cursor() as cursor, cursor.copy(_COPY) as copy:
        try:
            for row in reader:
                row_number += 1
                if not any(cell.strip() for cell in row):
                    continue
                result.processed += 1
                staged = transform(row_number, row)
                if staged is not None:
                    await copy.write_row(staged)
                if progress is not None and result.processed % PROGRESS_EVERY == 0:
                    await progress(result.processed)
        except csv.Error as error:
            raise ImportFailedError(f"Row {row_number}: not valid CSV ({error})") from None
    await _merge(session, options, result)
    return result


async def _merge(session: AsyncSession, options: ImportOptions, result: ImportResult) -> None:
    staged = result.processed - result.skipped
    params: dict[str, Any] = {"church_id": options.church_id}
    group_cte = ""
    if options.group_id is not None:
        params["group_id"] = options.group_id
        group_cte = _GROUP_CTE
    template = _MERGE_UPDATE if options.on_duplicate == "update" else _MERGE_SKIP
    created, updated = (
        await session.execute(text(template.format(group_cte=group_cte)), params)
    ).one()
    if options.on_duplicate == "skip" and options.group_id is not None:
        await session.execute(text(_GROUP_EXISTING), params)
    # Whoever commits (request, worker job, CLI) invalidates after the commit.
    tags = [inbox_tag(options.church_id)]  # names and phones shown in the inbox
    if options.group_id is not None:
        tags.append(group_counts_tag(options.church_id))
    invalidate_on_commit(session, *tags)
    result.created = int(created)
    result.updated = int(updated)
    result.skipped += staged - result.created - result.updated
