"""Fixtures for sending: a church with a sending number and segments, a worker running
in-process (procrastinate + the event and reconcile loops), and the sandbox's log."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import time
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text, update

from koinonia.accounts.tables import Church
from koinonia.billing import ledger
from koinonia.jobs import build_job_app, open_resources
from koinonia.members.crypto import ContactCipher
from koinonia.settings import Settings
from koinonia.telnyx.loops import running_loops
from tests.support.api import Account, register
from tests.support.servers import LiveServer

_numbers = iter(range(1000, 10_000))


@dataclass
class SendingChurch:
    account: Account
    number: str

    @property
    def headers(self) -> dict[str, str]:
        return self.account.headers


async def give_number(app: FastAPI, settings: Settings, church_id: str, segments: int) -> str:
    """An assigned sending number (as provisioning leaves it), a segment grant, and a
    sending window open all day (tests run at any hour; the window has its own tests)."""
    number = f"+1202555{next(_numbers):04d}"
    async with app.state.database.unit_of_work() as session:
        await session.execute(
            update(Church)
            .where(Church.id == uuid.UUID(church_id))
            .values(
                phone_number=number,
                number_status="assigned",
                send_window_start=time(0, 0),
                send_window_end=time(0, 0),
            )
        )
        subscription = await ledger.ensure_subscription(session, settings, uuid.UUID(church_id))
        await ledger.grant(
            session, uuid.UUID(church_id), subscription.period_start, segments, "test-grant"
        )
    return number


@pytest.fixture
async def sending_church(
    client: httpx.AsyncClient, app: FastAPI, settings: Settings, sandbox: LiveServer
) -> SendingChurch:
    account = await register(client)
    return SendingChurch(account, await give_number(app, settings, account.church_id, 50_000))


@pytest.fixture
async def sandbox_http(sandbox: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sandbox.url, timeout=30) as http:
        await http.delete("/sandbox/faults")
        yield http
        await http.delete("/sandbox/faults")


@asynccontextmanager
async def running_worker(settings: Settings, concurrency: int = 4) -> AsyncIterator[Any]:
    job_app = build_job_app(settings, pool_max=concurrency + 2)
    async with (
        job_app.open_async(),
        open_resources(settings, job_app) as job,
        running_loops(job),
    ):
        task = asyncio.create_task(
            job_app.run_worker_async(
                concurrency=concurrency,
                queues=["sms", "maintenance"],
                fetch_job_polling_interval=settings.worker_poll_seconds,
                install_signal_handlers=False,
            )
        )
        try:
            yield job
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


WorkerFactory = Callable[..., Any]


@pytest.fixture
def worker(settings: Settings) -> WorkerFactory:
    return lambda **overrides: running_worker(
        settings.model_copy(update=overrides) if overrides else settings
    )


async def eventually(
    check: Callable[[], Awaitable[Any]], *, within: float = 30, every: float = 0.1
) -> Any:
    """Poll until `check()` answers something truthy; fail with its last answer."""
    deadline = asyncio.get_running_loop().time() + within
    last: Any = None
    while asyncio.get_running_loop().time() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(every)
    raise AssertionError(f"condition not met in {within}s; last answer: {last!r}")


async def bulk_members(
    app: FastAPI, settings: Settings, church_id: str, count: int, area: str
) -> str:
    """`count` members in a new group, written straight to the database (the API's
    import is tested elsewhere); phones in their own area code."""
    cipher = ContactCipher.from_settings(settings)
    church = uuid.UUID(church_id)
    group_id = uuid.uuid4()
    rows = []
    for i in range(count):
        phone = f"+1{area}{200 + i // 9000}{1000 + i % 9000:04d}"
        rows.append(
            {
                "id": uuid.uuid4(),
                "church_id": church,
                "first": f"M{i}",
                "ct": cipher.encrypt(phone, church),
                "hash": cipher.phone_hash(phone, church),
            }
        )
    async with app.state.database.unit_of_work() as session:
        await session.execute(
            text("INSERT INTO groups (id, church_id, name) VALUES (:id, :church, :name)"),
            {"id": group_id, "church": church, "name": f"big-{group_id.hex[:6]}"},
        )
        await session.execute(
            text(
                "INSERT INTO members (id, church_id, first_name, phone_ct, phone_hash) "
                "VALUES (:id, :church_id, :first, :ct, :hash)"
            ),
            rows,
        )
        await session.execute(
            text(
                "INSERT INTO group_members (group_id, member_id) "
                "SELECT :g, id FROM members WHERE church_id = :c"
            ),
            {"g": group_id, "c": church},
        )
    return str(group_id)
