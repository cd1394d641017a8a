"""Provisioning a church's sending number against the Telnyx sandbox, its jobs, and the
operators' circuit-breaker report."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis
from sqlalchemy import select, text, update

from koinonia.accounts.tables import Church
from koinonia.jobs import build_job_app, open_resources
from koinonia.numbers import jobs as number_jobs
from koinonia.numbers.service import (
    OrderPendingError,
    ProvisioningError,
    provision,
    provision_step,
    webhook_url,
)
from koinonia.settings import Settings
from koinonia.telnyx.client import TelnyxClient, TelnyxError
from tests.support.api import register
from tests.support.servers import LiveServer


@pytest.fixture
async def telnyx(settings: Settings, sandbox: LiveServer) -> AsyncIterator[TelnyxClient]:
    client = TelnyxClient(settings)
    async with httpx.AsyncClient(base_url=sandbox.url) as http:
        await http.delete("/sandbox/faults")
    yield client
    await client.aclose()


async def _church(app: FastAPI, church_id: str) -> Church:
    async with app.state.database.sessions() as session:
        row: Church | None = await session.get(Church, uuid.UUID(church_id))
        assert row is not None
        return row


async def _jobs(app: FastAPI, church_id: str) -> list[tuple[str, str, str]]:
    async with app.state.database.sessions() as session:
        rows = await session.execute(
            text(
                "SELECT task_name, queue_name, status FROM procrastinate_jobs "
                "WHERE queueing_lock = :lock ORDER BY id"
            ),
            {"lock": f"number:{church_id}"},
        )
        return [(r[0], r[1], r[2]) for r in rows]


async def test_registration_defers_provisioning_and_provision_assigns_a_number(
    client: httpx.AsyncClient, app: FastAPI, settings: Settings, telnyx: TelnyxClient
) -> None:
    account = await register(client)
    me = (await client.get("/api/v1/auth/me", headers=account.headers)).json()
    assert me["church"]["phone_number"] is None
    assert me["church"]["number_status"] == "pending"
    # Registration only queued the work (in its own transaction); it never called Telnyx.
    assert await _jobs(app, account.church_id) == [("numbers:provision_number", "numbers", "todo")]

    church_id = uuid.UUID(account.church_id)
    status = await provision(app.state.database, settings, telnyx, church_id)
    assert status == "assigned"

    me = (await client.get("/api/v1/auth/me", headers=account.headers)).json()
    number = me["church"]["phone_number"]
    assert number.startswith("+1") and len(number) == 12
    assert me["church"]["number_status"] == "assigned"

    church = await _church(app, account.church_id)
    assert church.number_order_id and church.messaging_profile_id
    order = (await telnyx.request("GET", f"/v2/number_orders/{church.number_order_id}", "t"))[
        "data"
    ]
    assert order["customer_reference"] == account.church_id
    assert order["messaging_profile_id"] == church.messaging_profile_id
    messaging = (await telnyx.request("GET", f"/v2/phone_numbers/{number}/messaging", "t"))["data"]
    assert messaging["messaging_profile_id"] == church.messaging_profile_id
    profile = (
        await telnyx.request("GET", f"/v2/messaging_profiles/{church.messaging_profile_id}", "t")
    )["data"]
    assert profile["name"] == f"koinonia-{church_id}"
    assert profile["webhook_url"] == webhook_url(settings)
    assert profile["webhook_url"].endswith("/api/v1/webhooks/telnyx")

    # Idempotent: an assigned church is left alone (no Telnyx call, no write).
    assert await provision(app.state.database, settings, telnyx, church_id) == "assigned"
    assert await provision_step(app.state.database, settings, telnyx, church_id) == "assigned"
    again = await _church(app, account.church_id)
    assert (
        again.phone_number,
        again.number_order_id,
        again.messaging_profile_id,
        again.updated_at,
    ) == (
        church.phone_number,
        church.number_order_id,
        church.messaging_profile_id,
        church.updated_at,
    )


async def test_a_configured_profile_is_shared(
    client: httpx.AsyncClient, app: FastAPI, settings: Settings, telnyx: TelnyxClient
) -> None:
    shared = (
        await telnyx.request(
            "POST",
            "/v2/messaging_profiles",
            "t",
            json={"name": "koinonia-shared", "webhook_url": webhook_url(settings)},
        )
    )["data"]["id"]
    configured = settings.model_copy(update={"telnyx_messaging_profile_id": shared})
    account = await register(client)
    church_id = uuid.UUID(account.church_id)
    # No profile to create: the first step orders straight away.
    assert await provision_step(app.state.database, configured, telnyx, church_id) == "ordered"
    assert await provision(app.state.database, configured, telnyx, church_id) == "assigned"
    church = await _church(app, account.church_id)
    assert church.messaging_profile_id == shared
    messaging = (
        await telnyx.request("GET", f"/v2/phone_numbers/{church.phone_number}/messaging", "t")
    )["data"]
    assert messaging["messaging_profile_id"] == shared


async def test_a_failed_step_keeps_its_state_and_succeeds_later(
    client: httpx.AsyncClient,
    app: FastAPI,
    settings: Settings,
    telnyx: TelnyxClient,
    sandbox: LiveServer,
) -> None:
    account = await register(client)
    church_id = uuid.UUID(account.church_id)
    database = app.state.database
    async with httpx.AsyncClient(base_url=sandbox.url) as http:
        try:
            await http.post("/sandbox/faults", json={"error_rate": 1.0, "status": 500})
            with pytest.raises(TelnyxError) as failed:
                await provision_step(database, settings, telnyx, church_id)
            assert failed.value.status == 500
            church = await _church(app, account.church_id)
            assert (church.number_status, church.messaging_profile_id) == ("pending", None)

            await http.delete("/sandbox/faults")
            assert await provision_step(database, settings, telnyx, church_id) == "pending"
            assert await provision_step(database, settings, telnyx, church_id) == "ordered"
            ordered = await _church(app, account.church_id)

            await http.post("/sandbox/faults", json={"error_rate": 1.0, "status": 500})
            with pytest.raises(TelnyxError):
                await provision(database, settings, telnyx, church_id)
            church = await _church(app, account.church_id)
            assert (church.number_status, church.phone_number, church.number_order_id) == (
                "ordered",
                ordered.phone_number,
                ordered.number_order_id,
            )
        finally:
            await http.delete("/sandbox/faults")
    assert await provision(database, settings, telnyx, church_id) == "assigned"
    church = await _church(app, account.church_id)
    assert church.phone_number == ordered.phone_number


class OrderStub:
    """Telnyx answering one number order with a fixed status (the sandbox always succeeds)."""

    def __init__(self, order_status: str, available: list[str] | None = None) -> None:
        self.order_status = order_status
        self.available = available or []
        self.calls: list[tuple[str, str]] = []

    async def request(self, method: str, path: str, operation: str, **_: Any) -> dict[str, Any]:
        self.calls.append((method, path))
        if path == "/v2/available_phone_numbers":
            return {"data": [{"phone_number": n} for n in self.available]}
        return {"data": {"id": path.rsplit("/", 1)[-1], "status": self.order_status}}


async def _ordered_church(app: FastAPI, client: httpx.AsyncClient) -> tuple[str, str]:
    account = await register(client)
    number = f"+1303555{uuid.uuid4().int % 10_000:04d}"
    async with app.state.database.unit_of_work() as session:
        await session.execute(
            update(Church)
            .where(Church.id == uuid.UUID(account.church_id))
            .values(
                number_status="ordered",
                phone_number=number,
                number_order_id="order-1",
                messaging_profile_id="profile-1",
            )
        )
    return account.church_id, number


async def test_a_pending_order_waits_and_a_failed_order_starts_again(
    client: httpx.AsyncClient, app: FastAPI, settings: Settings
) -> None:
    church_id, number = await _ordered_church(app, client)
    pending = cast(TelnyxClient, OrderStub("pending"))
    with pytest.raises(OrderPendingError):
        await provision_step(app.state.database, settings, pending, uuid.UUID(church_id))
    church = await _church(app, church_id)
    assert (church.number_status, church.phone_number) == ("ordered", number)

    failed = cast(TelnyxClient, OrderStub("failure"))
    status = await provision_step(app.state.database, settings, failed, uuid.UUID(church_id))
    assert status == "pending"
    church = await _church(app, church_id)
    assert (church.number_status, church.phone_number, church.number_order_id) == (
        "pending",
        None,
        None,
    )
    assert church.messaging_profile_id == "profile-1"  # kept for the next order


async def test_numbers_held_by_another_church_are_not_ordered(
    client: httpx.AsyncClient, app: FastAPI, settings: Settings
) -> None:
    _, held = await _ordered_church(app, client)
    account = await register(client)
    async with app.state.database.unit_of_work() as session:
        await session.execute(
            update(Church)
            .where(Church.id == uuid.UUID(account.church_id))
            .values(messaging_profile_id="profile-1")
        )
    stub = OrderStub("success", available=[held])
    with pytest.raises(ProvisioningError):
        await provision_step(
            app.state.database, settings, cast(TelnyxClient, stub), uuid.UUID(account.church_id)
        )
    assert ("POST", "/v2/number_orders") not in stub.calls
    assert (await _church(app, account.church_id)).number_status == "pending"


async def test_provision_job_and_stuck_sweep(
    client: httpx.AsyncClient, app: FastAPI, settings: Settings, telnyx: TelnyxClient
) -> None:
    account = await register(client)
    job_app = build_job_app(settings)
    async with job_app.open_async(), open_resources(settings, job_app):
        await number_jobs.provision_number(church_id=account.church_id)
        assert (await _church(app, account.church_id)).number_status == "assigned"

        stuck = await register(client)
        async with app.state.database.unit_of_work() as session:
            await session.execute(
                update(Church)
                .where(Church.id == uuid.UUID(stuck.church_id))
                .values(created_at=text("now() - interval '1 year'"))
            )
        # Registration's job is still waiting: the sweep's AlreadyEnqueued is ignored.
        await number_jobs.retry_stuck_numbers(timestamp=0)
        assert await _jobs(app, stuck.church_id) == [
            ("numbers:provision_number", "numbers", "todo")
        ]
        # Once that job is gone (failed, say), the sweep queues another one.
        async with app.state.database.unit_of_work() as session:
            await session.execute(
                text("UPDATE procrastinate_jobs SET status = 'failed' WHERE queueing_lock = :l"),
                {"l": f"number:{stuck.church_id}"},
            )
        await number_jobs.retry_stuck_numbers(timestamp=0)
        assert await _jobs(app, stuck.church_id) == [
            ("numbers:provision_number", "numbers", "failed"),
            ("numbers:provision_number", "numbers", "todo"),
        ]
        # Assigned churches are never swept.
        assert await _jobs(app, account.church_id) == [
            ("numbers:provision_number", "numbers", "todo")
        ]
    async with app.state.database.sessions() as session:
        assigned = await session.scalar(
            select(Church.number_status).where(Church.id == uuid.UUID(account.church_id))
        )
    assert assigned == "assigned"


async def test_circuit_breakers_report_is_for_operators(
    client: httpx.AsyncClient, redis: Redis, tenant_factory: Any
) -> None:
    operator = await tenant_factory(is_operator=True)
    owner = await tenant_factory(role="owner")
    assert (
        await client.get("/api/v1/admin/circuit-breakers", headers=owner.headers)
    ).status_code == 403
    assert (await client.get("/api/v1/admin/circuit-breakers")).status_code == 401

    try:
        await redis.hset(
            "cb:stripe", mapping={"state": "open", "open_until": 10**13, "backoff": 1000}
        )
        report = await client.get("/api/v1/admin/circuit-breakers", headers=operator.headers)
        assert report.status_code == 200, report.text
        data = {row["provider"]: row for row in report.json()["data"]}
        assert set(data) == {"telnyx", "stripe"}
        assert data["stripe"]["state"] == "open" and data["stripe"]["retry_after"] > 0
        assert data["telnyx"]["state"] in ("closed", "open", "half_open")
        assert set(data["telnyx"]) == {"provider", "state", "retry_after"}
    finally:
        await redis.delete("cb:stripe")  # closed again, as the other tests expect
