"""CSV import of 100,000 members against raw COPY and a row-by-row insert, in one run.

    uv run python -m bench.import_members [--rows 100000]

Generates a CSV (fixed seed; valid US numbers in several formats, ~1 % bad rows,
~1 % duplicates), imports it through the real job path (`import_in_job`: parse,
validate, encrypt, COPY to staging, one merge, commit), then in the same run COPYs the
same file into a bare table and times 2,000 single-row INSERTs.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import random
import time

import phonenumbers
import psycopg

from bench.common import plain_url, scratch_database, settings_for, timer

FORMATS = ("({a}) {b}-{c}", "{a}-{b}-{c}", "+1 {a} {b} {c}", "{a}{b}{c}", "1{a}{b}{c}")


def valid_us_number(rng: random.Random) -> tuple[str, str, str]:
    while True:
        a, b, c = rng.randint(201, 989), rng.randint(200, 999), rng.randint(0, 9999)
        number = phonenumbers.parse(f"+1{a}{b}{c:04d}")
        if phonenumbers.is_valid_number(number):
            return str(a), str(b), f"{c:04d}"


def generate_csv(rows: int, seed: int = 20261125) -> tuple[bytes, int, int]:
    rng = random.Random(seed)
    out = io.StringIO()
    out.write("first_name,last_name,phone,email\n")
    written: list[str] = []
    bad = duplicates = 0
    for i in range(rows):
        roll = rng.random()
        if roll < 0.01:
            line = f"Bad{i},Row,{rng.randint(1, 99999)},\n"
            bad += 1
        elif roll < 0.02 and written:
            line = rng.choice(written)
            duplicates += 1
        else:
            a, b, c = valid_us_number(rng)
            phone = rng.choice(FORMATS).format(a=a, b=b, c=c)
            email = f"person{i}@example.org" if rng.random() < 0.6 else ""
            line = f"First{i},Last{i},{phone},{email}\n"
            written.append(line)
        out.write(line)
    return out.getvalue().encode(), bad, duplicates


async def run_import_job(url: str, content: bytes) -> tuple[dict[str, int], float]:
    """Stores the upload as the API does, then times the import job itself."""
    from koinonia.accounts.tables import Church
    from koinonia.db import Database
    from koinonia.members.crypto import ContactCipher
    from koinonia.members.imports import import_in_job
    from koinonia.members.tables import MemberImport, MemberImportFile

    settings = settings_for(url)
    database = Database(settings)
    async with database.unit_of_work() as session:
        church = Church(name="Bench Church")
        session.add(church)
        await session.flush()
        record = MemberImport(church_id=church.id, filename="bench.csv", size_bytes=len(content))
        session.add(record)
        await session.flush()
        session.add(MemberImportFile(import_id=record.id, content=content))
        import_id = record.id
    start = time.perf_counter()
    await import_in_job(database, ContactCipher.from_settings(settings), import_id, "US")
    elapsed = time.perf_counter() - start
    async with database.sessions() as session:
        done = await session.get(MemberImport, import_id)
        assert done is not None and done.status == "completed", done and done.failure
        counts = {
            k: getattr(done, k)
            for k in ("processed", "created", "updated", "skipped", "error_count")
        }
    await database.dispose()
    return counts, elapsed


def raw_copy(url: str, content: bytes) -> None:
    with psycopg.connect(plain_url(url)) as connection:
        connection.execute(
            "CREATE TABLE bare_members (first_name text, last_name text, phone text, email text)"
        )
        with (
            connection.cursor() as cursor,
            cursor.copy("COPY bare_members FROM STDIN WITH (FORMAT csv, HEADER true)") as copy,
        ):
            copy.write(content)


def row_by_row(url: str, content: bytes, rows: int) -> None:
    lines = content.decode().splitlines()[1 : rows + 1]
    with psycopg.connect(plain_url(url)) as connection:
        connection.execute(
            "CREATE TABLE bare_rows (first_name text, last_name text, phone text, email text)"
        )
        for line in lines:
            first, last, phone, email = [*line.split(","), "", "", "", ""][:4]
            connection.execute(
                "INSERT INTO bare_rows VALUES (%s, %s, %s, %s)", (first, last, phone, email)
            )
        connection.commit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--row-by-row", type=int, default=2_000)
    args = parser.parse_args()
    content, bad, duplicates = generate_csv(args.rows)
    print(
        f"CSV: {args.rows:,} rows, {len(content) / 1e6:.1f} MB, {bad} bad, {duplicates} duplicates"
    )
    times: dict[str, float] = {}
    with scratch_database() as url:
        with timer(times, "copy"):
            raw_copy(url, content)
        counts, times["import"] = asyncio.run(run_import_job(url, content))
        with timer(times, "row_by_row"):
            row_by_row(url, content, args.row_by_row)
    per_row = times["row_by_row"] / args.row_by_row
    projected = per_row * args.rows
    print(f"import result: {counts}")
    for label, key in (("raw COPY of the file", "copy"), ("koinonia import (job)", "import")):
        rate = args.rows / times[key]
        print(f"{label:<30} {times[key]:8.3f} s  ({rate:,.0f} rows/s)")
    print(
        f"row-by-row INSERT, {args.row_by_row:,} rows   {times['row_by_row']:8.3f} s  "
        f"({1 / per_row:,.0f} rows/s; {projected:.1f} s projected for {args.rows:,})"
    )
    print(
        f"import / raw COPY              {times['import'] / times['copy']:8.2f} x   (target <= 3)"
    )
    print(f"row-by-row / import            {projected / times['import']:8.2f} x   (target >= 25)")


if __name__ == "__main__":
    main()
