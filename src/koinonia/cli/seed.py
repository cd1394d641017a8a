"""`koinonia seed-demo`: a demo church to try the product with (idempotent)."""

from __future__ import annotations

import asyncio

import typer
from sqlalchemy import func, select

from koinonia.accounts import passwords
from koinonia.accounts.tables import Church, User
from koinonia.cli.common import settings_or_exit
from koinonia.db import Database
from koinonia.groups.tables import Group, GroupMember
from koinonia.members.crypto import ContactCipher
from koinonia.members.tables import Member
from koinonia.settings import Settings
from koinonia.templates.tables import Template

DEMO_EMAIL = "demo@koinonia.local"
DEMO_PASSWORD = "demo-password-123"  # noqa: S105 - a documented local demo login
DEMO_PEOPLE = [
    ("Ada", "Lovelace", "+14155550101"),
    ("Grace", "Hopper", "+14155550102"),
    ("Katherine", "Johnson", "+14155550103"),
    ("Alan", "Turing", "+14155550104"),
    ("Edsger", "Dijkstra", "+14155550105"),
]


async def _seed(settings: Settings) -> bool:
    database = Database(settings)
    cipher = ContactCipher.from_settings(settings)
    try:
        async with database.unit_of_work() as session:
            exists = await session.scalar(
                select(func.count()).select_from(User).where(User.email == DEMO_EMAIL)
            )
            if exists:
                return False
            church = Church(
                name="Demo Community Church", help_text="Demo Church: reply STOP to opt out."
            )
            session.add(church)
            await session.flush()
            session.add(
                User(
                    church_id=church.id,
                    email=DEMO_EMAIL,
                    name="Demo Owner",
                    role="owner",
                    password_hash=await passwords.hash_password(DEMO_PASSWORD),
                )
            )
            group = Group(church_id=church.id, name="Everyone")
            session.add(group)
            session.add(
                Template(
                    church_id=church.id,
                    name="Welcome",
                    body="Hi {{first_name}}, welcome to {{church_name}}!",
                )
            )
            await session.flush()
            for first, last, phone in DEMO_PEOPLE:
                member = Member(
                    church_id=church.id,
                    first_name=first,
                    last_name=last,
                    phone_ct=cipher.encrypt(phone, church.id),
                    phone_hash=cipher.phone_hash(phone, church.id),
                )
                session.add(member)
                await session.flush()
                session.add(GroupMember(group_id=group.id, member_id=member.id))
        return True
    finally:
        await database.dispose()


def seed_demo() -> None:
    """Create the demo church, its owner, a group, members and a template."""
    created = asyncio.run(_seed(settings_or_exit()))
    state = "created" if created else "already present"
    typer.echo(f"demo church {state}: log in as {DEMO_EMAIL} / {DEMO_PASSWORD}")
