"""The real read routes on a real streaming replica (port 5433, scripts/replica.sh).

Where a read went is observed through the metrics the router keeps
(`koinonia_db_reads_total{target}`, `koinonia_db_read_fallbacks_total{reason}`), read
before and after each request: no header tells a client which server answered.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fastapi import APIRouter, FastAPI
from prometheus_client import REGISTRY
from sqlalchemy import text, update

from koinonia.accounts.deps import CurrentPrincipal
from koinonia.accounts.tables import Church as ChurchRow
from koinonia.app import create_app
from koinonia.messaging.tables import Message
from koinonia.replicas import ReadSession, ReplicaRouter
from koinonia.settings import Settings
from tests.conftest import make_settings
from tests.support.api import Account, add_member, register
from tests.support.report import REPORTS

REPLICA_HOSTPORT = os.environ.get("TEST_REPLICA_HOSTPORT", "127.0.0.1:5433")
REPLICA_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "replica.sh"
TARGETS = ("primary", "replica")


def reads(target: str) -> float:
    return REGISTRY.get_sample_value("koinonia_db_reads_total", {"target": target}) or 0.0


def fallbacks(reason: str) -> float:
    value = REGISTRY.get_sample_value("koinonia_db_read_fallbacks_total", {"reason": reason})
    return value or 0.0


@dataclass
class Counted:
    response: httpx.Response
    primary: float
    replica: float
    started: float


async def counted_get(client: httpx.AsyncClient, url: str, account: Account) -> Counted:
    """GET `url` and how many routed reads it made on each side (one request at a time:
    the counters are process-wide)."""
    before = {t: reads(t) for t in TARGETS}
    started = time.monotonic()
    response = await client.get(url, headers=account.headers)
    return Counted(
        response,
        reads("primary") - before["primary"],
        reads("replica") - before["replica"],
        started,
    )


async def eventually(
    probe: Callable[[], Awaitable[Any]], *, within: float = 20.0, what: str = "condition"
) -> Any:
    """Poll `probe` until it returns something truthy; fail past the deadline."""
    deadline = time.monotonic() + within
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.05)


async def on_replica(client: httpx.AsyncClient, url: str, account: Account) -> Counted:
    """The first answer to `url` that is a 200 read from the replica alone (once the
    church's read-your-own-writes window is over and the rows have been replayed)."""

    async def probe() -> Counted | None:
        got = await counted_get(client, url, account)
        ok = got.response.status_code == 200 and got.replica >= 1 and got.primary == 0
        return got if ok else None

    result: Counted = await eventually(probe, what=f"{url} read from the replica")
    return result


@pytest.fixture
async def replica_app(settings: Settings, database_name: str) -> AsyncIterator[FastAPI]:
    app = create_app(
        make_settings(
            database_url=settings.database_url,
            database_replica_urls=f"postgresql://postgres@{REPLICA_HOSTPORT}/{database_name}",
            # Generous: the replica is shared with every other test (and the machine's
            # other work); a pause of replay must not make these tests flap.
            replica_max_lag_seconds=5.0,
            read_your_writes_seconds=1,
            # The stop test reads in a tight loop as one user.
            rate_limit_per_minute=100_000,
            rate_limit_burst=100_000,
        )
    )
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def replica_client(replica_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=replica_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        yield client


@dataclass
class Church:
    account: Account
    member_id: str
    group_id: str
    conversation_ids: list[str]
    message_id: str


async def church_with_data(client: httpx.AsyncClient, replica_app: FastAPI) -> Church:
    """A church with members, a group, two conversations and a broadcast, written through
    the API (the primary) — and the message row straight to the database (no job)."""
    account = await register(client)
    first = await add_member(client, account)
    second = await add_member(client, account)
    group = await client.post(
        "/api/v1/groups", json={"name": f"Choir {uuid.uuid4().hex[:6]}"}, headers=account.headers
    )
    assert group.status_code == 201, group.text
    conversations = []
    for member in (first, second):
        started = await client.post(
            "/api/v1/conversations", json={"member_id": member["id"]}, headers=account.headers
        )
        assert started.status_code == 201, started.text
        conversations.append(started.json()["id"])
    async with replica_app.state.database.unit_of_work() as session:
        message = Message(
            church_id=uuid.UUID(account.church_id),
            body="Choir practice moves to 7pm",
            encoding="GSM-7",
            segments=1,
            characters=27,
            status="completed",
        )
        session.add(message)
        await session.flush()
        message_id = str(message.id)
    return Church(account, first["id"], group.json()["id"], conversations, message_id)


READ_ROUTES = (
    "/api/v1/members",
    "/api/v1/members?q=Ada",
    "/api/v1/members/{member}",
    "/api/v1/groups",
    "/api/v1/groups/{group}",
    "/api/v1/messages",
    "/api/v1/messages/{message}",
    "/api/v1/messages/{message}/recipients",
    "/api/v1/conversations/{conversation}",
    "/api/v1/conversations/{conversation}/messages",
    "/api/v1/billing/subscription",
)


def route_urls(church: Church) -> list[str]:
    return [
        url.format(
            member=church.member_id,
            group=church.group_id,
            message=church.message_id,
            conversation=church.conversation_ids[0],
        )
        for url in READ_ROUTES
    ]


async def test_the_read_routes_read_from_the_replica(
    replica_client: httpx.AsyncClient, replica_app: FastAPI
) -> None:
    church = await church_with_data(replica_client, replica_app)
    for url in route_urls(church):
        await on_replica(replica_client, url, church.account)
    member = (await on_replica(replica_client, route_urls(church)[2], church.account)).response
    assert member.json()["id"] == church.member_id
    # The inbox's first page is served by its cache (loaded on the primary); a later page
    # reads from the replica.
    first_page = await replica_client.get(
        "/api/v1/conversations", params={"limit": 1}, headers=church.account.headers
    )
    assert first_page.status_code == 200, first_page.text
    cursor = first_page.json()["next_cursor"]
    assert cursor is not None
    later = await on_replica(
        replica_client, f"/api/v1/conversations?limit=1&cursor={cursor}", church.account
    )
    assert len(later.response.json()["data"]) == 1
    # Usage is a cached figure about money: loaded on the primary, never from a replica
    # (a replica behind an invalidation would pin an old figure for the cache's TTL).
    usage = await counted_get(replica_client, "/api/v1/billing/usage", church.account)
    assert usage.response.status_code == 200, usage.response.text
    assert usage.replica == 0


async def test_a_church_reads_its_own_writes_from_the_primary(
    replica_client: httpx.AsyncClient, replica_app: FastAPI
) -> None:
    writer = await church_with_data(replica_client, replica_app)
    other = await church_with_data(replica_client, replica_app)
    await on_replica(replica_client, "/api/v1/members", writer.account)
    await on_replica(replica_client, "/api/v1/members", other.account)

    ryw_before = fallbacks("read_your_writes")
    added = await add_member(replica_client, writer.account, first_name="Lydia")
    got = await counted_get(replica_client, "/api/v1/members", writer.account)
    assert got.response.status_code == 200
    assert (got.primary, got.replica) == (1, 0)
    assert added["id"] in [m["id"] for m in got.response.json()["data"]]
    detail = await counted_get(replica_client, f"/api/v1/members/{added['id']}", writer.account)
    assert detail.response.status_code == 200
    assert (detail.primary, detail.replica) == (1, 0)
    assert fallbacks("read_your_writes") - ryw_before == 2
    # Another church is not held to the writer's window.
    elsewhere = await counted_get(replica_client, "/api/v1/members", other.account)
    assert (elsewhere.primary, elsewhere.replica) == (0, 1)
    # Once the window is over the writer reads from the replica again, write included.
    again = await on_replica(replica_client, "/api/v1/members", writer.account)
    assert added["id"] in [m["id"] for m in again.response.json()["data"]]


async def test_a_write_on_the_primary_shows_on_replica_reads_once_replayed(
    replica_client: httpx.AsyncClient, replica_app: FastAPI, client: httpx.AsyncClient
) -> None:
    church = await church_with_data(replica_client, replica_app)
    await on_replica(replica_client, "/api/v1/members", church.account)
    # Written by another API process (the suite's primary-only app): no read-your-writes
    # window in this one, so every read below is routed to the replica.
    added = await add_member(client, church.account, first_name="Priscilla")

    async def replayed() -> bool:
        got = await counted_get(replica_client, f"/api/v1/members/{added['id']}", church.account)
        assert (got.primary, got.replica) == (0, 1)
        assert got.response.status_code in (200, 404), got.response.text
        return got.response.status_code == 200

    await eventually(replayed, within=10, what="the new member on the replica")
    listed = await counted_get(replica_client, "/api/v1/members?q=Priscilla", church.account)
    assert (listed.primary, listed.replica) == (0, 1)
    assert [m["id"] for m in listed.response.json()["data"]] == [added["id"]]


# A read that loses its replica between two statements: the second runs on the primary.
mid_read = APIRouter(prefix="/api/v1/_replica_mid_read")


@mid_read.get("")
async def read_twice(principal: CurrentPrincipal, session: ReadSession) -> dict[str, Any]:
    first = (await session.execute(text("SELECT pg_is_in_recovery(), pg_backend_pid()"))).one()
    if first[0]:
        replica = f"postgresql://postgres@{REPLICA_HOSTPORT}/postgres"
        async with await psycopg.AsyncConnection.connect(replica, autocommit=True) as admin:
            await admin.execute("SELECT pg_terminate_backend(%s)", (first[1],))
    second = (await session.execute(text("SELECT pg_is_in_recovery()"))).scalar_one()
    return {"first_on_replica": bool(first[0]), "second_on_replica": bool(second)}


async def test_a_replica_lost_mid_read_hands_the_read_to_the_primary(
    replica_client: httpx.AsyncClient, replica_app: FastAPI
) -> None:
    replica_app.include_router(mid_read)
    account = await register(replica_client)
    router: ReplicaRouter = replica_app.state.replicas

    async def usable() -> bool:
        return router.usable() == [0]

    await eventually(usable, what="the replica to be usable")
    down_before = fallbacks("replica_down")
    got = await counted_get(replica_client, "/api/v1/_replica_mid_read", account)
    assert got.response.status_code == 200, got.response.text
    assert got.response.json() == {"first_on_replica": True, "second_on_replica": False}
    assert (got.primary, got.replica) == (1, 1)
    assert fallbacks("replica_down") - down_before == 1
    # Marked down at once; the probe finds it healthy again within its interval.
    await eventually(usable, within=2, what="the replica to be used again")


async def test_a_read_session_cannot_write(settings: Settings, client: httpx.AsyncClient) -> None:
    """Refused on the primary too (its read engine is autocommit: nothing else would stop
    the write there): a route writing on a ReadSession fails in every test, not only in
    production when a replica serves it."""
    writes = APIRouter(prefix="/api/v1/_read_session_write")

    @writes.get("/{kind}")
    async def write(
        kind: str, principal: CurrentPrincipal, session: ReadSession
    ) -> dict[str, bool]:
        await session.execute(text("SELECT 1"))  # reading is fine
        church_id = principal.church_id
        if kind == "text":
            await session.execute(
                text("UPDATE churches SET name = 'x' WHERE id = :id"), {"id": church_id}
            )
        elif kind == "core":
            await session.execute(
                update(ChurchRow).where(ChurchRow.id == church_id).values(name="x")
            )
        elif kind == "lock":
            await session.get(ChurchRow, church_id, with_for_update=True)
        else:
            (await session.get_one(ChurchRow, church_id)).name = "x"
            await session.flush()
        return {"wrote": True}

    app = create_app(settings)
    app.include_router(writes)
    account = await register(client)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as own:
            for kind in ("text", "core", "lock", "orm"):
                no_replica_before = fallbacks("no_replica")
                got = await counted_get(own, f"/api/v1/_read_session_write/{kind}", account)
                assert got.response.status_code == 500, kind
                assert got.response.json()["code"] == "database_error"
                assert (got.primary, got.replica) == (1, 0)
                assert fallbacks("no_replica") - no_replica_before == 1
        async with app.state.database.sessions() as session:
            church = await session.get_one(ChurchRow, uuid.UUID(account.church_id))
            assert church.name != "x"


def replica_ctl(action: str) -> None:
    subprocess.run([str(REPLICA_SCRIPT), action], check=True, timeout=180, capture_output=True)


@pytest.mark.nopgbouncer
async def test_stopping_the_replica_moves_reads_to_the_primary_at_once(
    replica_client: httpx.AsyncClient, replica_app: FastAPI
) -> None:
    church = await church_with_data(replica_client, replica_app)
    urls = route_urls(church)
    for url in urls:
        await on_replica(replica_client, url, church.account)
    down_before = fallbacks("replica_down")
    answers: list[Counted] = []
    stop = asyncio.Event()

    async def keep_reading() -> None:
        turn = 0
        while not stop.is_set():
            answers.append(
                await counted_get(replica_client, urls[turn % len(urls)], church.account)
            )
            turn += 1

    restarted = False
    reader = asyncio.create_task(keep_reading())
    try:
        async def replica_reads_seen() -> bool:
            return sum(a.replica >= 1 for a in answers) >= 3

        await eventually(replica_reads_seen, what="reads on the replica before the stop")
        stopping = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            str(REPLICA_SCRIPT),
            "stop",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert await asyncio.wait_for(process.wait(), timeout=120) == 0
        stopped = time.monotonic()

        async def reads_a_second_after_the_stop() -> bool:
            return sum(a.started >= stopped + 1.0 for a in answers) >= 3

        await eventually(reads_a_second_after_the_stop, what="reads after the replica went down")
        stop.set()
        await reader

        assert [a.response.status_code for a in answers] == [200] * len(answers), [
            (a.response.status_code, a.response.text) for a in answers if a.response.is_error
        ]
        before_stop = [a for a in answers if a.started < stopping]
        assert before_stop and all(a.replica >= 1 for a in before_stop)
        # Within a second of the replica being gone every read is the primary's.
        late = [a for a in answers if a.started >= stopped + 1.0]
        assert late, "no reads in the second after the stop"
        assert all((a.replica, a.primary) == (0, 1) for a in late)
        assert fallbacks("replica_down") > down_before
        last_on_replica = max(
            (a.started for a in answers if a.replica >= 1 and a.primary == 0), default=stopping
        )
        REPORTS.append(
            f"replica stopped under reads: {len(answers)} answers, all 200; last replica-only "
            f"read started {max(0.0, last_on_replica - stopping) * 1000:.0f} ms after the stop "
            f"began (stop took {(stopped - stopping) * 1000:.0f} ms); "
            f"{sum(a.replica >= 1 and a.primary >= 1 for a in answers)} handed over mid-read"
        )

        started = await asyncio.create_subprocess_exec(
            str(REPLICA_SCRIPT),
            "start",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert await asyncio.wait_for(started.wait(), timeout=180) == 0
        restarted = True
        # Back on the replica once it has caught up (the probe runs every half second).
        for url in urls:
            await on_replica(replica_client, url, church.account)
    finally:
        stop.set()
        if not reader.done():
            reader.cancel()
        if not restarted:
            replica_ctl("start")  # other tests use the replica
