"""Shared fixtures: a fresh PostgreSQL database per run (built by the Alembic migrations),
the real Redis, the app served in-process and over real loopback HTTP.

Services are never faked: if PostgreSQL or Redis does not answer, the fixtures fail.
"""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from psycopg import sql
from redis.asyncio import Redis

from koinonia.app import create_app
from koinonia.cli.database import alembic_config
from koinonia.settings import Settings, load_settings
from tests.support.servers import LiveServer

ADMIN_URL = os.environ.get(
    "TEST_DATABASE_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
# Where the application connects: PostgreSQL directly, or PgBouncer (CI runs both).
APP_DB_HOSTPORT = os.environ.get("TEST_DATABASE_APP_HOSTPORT", "127.0.0.1:5432")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def _admin() -> psycopg.Connection[Any]:
    return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)


def create_scratch_database(prefix: str = "koinonia_test") -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with _admin() as connection:
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name


def drop_database(name: str) -> None:
    with _admin() as connection:
        connection.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def app_database_url(name: str, hostport: str = APP_DB_HOSTPORT) -> str:
    return f"postgresql+psycopg://postgres@{hostport}/{name}"


def direct_database_url(name: str) -> str:
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "KOINONIA_ENV": "test",
        "redis_url": REDIS_URL,
        "log_level": "INFO",
        "database_pool_size": 5,
        "database_max_overflow": 5,
        # Tests register many churches from one address; the per-IP limit has its own tests.
        "rate_limit_login_per_minute": 100_000,
        "rate_limit_refresh_per_minute": 100_000,
        "rate_limit_auth_failures_per_minute": 100_000,
    }
    values.update(overrides)
    return load_settings(**values)


@pytest.fixture(scope="session")
def database_name() -> Iterator[str]:
    from alembic import command

    from koinonia.cli.database import apply_database_timeouts

    name = create_scratch_database()
    command.upgrade(alembic_config(direct_database_url(name)), "heads")
    # What `koinonia migrate` does after the migrations: the timeouts become the database's.
    apply_database_timeouts(make_settings(), direct_database_url(name))
    yield name
    drop_database(name)


@pytest.fixture(scope="session")
def sandbox_port() -> int:
    from tests.support.servers import free_port

    return free_port()


@pytest.fixture(scope="session")
def api_port() -> int:
    from tests.support.servers import free_port

    return free_port()


# The sandbox signs Telnyx webhooks with this key; the app trusts its public half.
TELNYX_TEST_SEED = base64.b64encode(bytes(range(32))).decode()


def telnyx_test_public_key() -> str:
    from koinonia.sandbox.signing import load_telnyx_key, public_key_b64

    return public_key_b64(load_telnyx_key(TELNYX_TEST_SEED))


@pytest.fixture(scope="session")
def settings(database_name: str, sandbox_port: int, api_port: int) -> Settings:
    sandbox_url = f"http://127.0.0.1:{sandbox_port}"
    return make_settings(
        database_url=app_database_url(database_name),
        stripe_base_url=sandbox_url,
        telnyx_base_url=sandbox_url,
        telnyx_public_key=telnyx_test_public_key(),
        public_base_url=f"http://127.0.0.1:{api_port}",
        sends_per_second_per_number=2000,
        telnyx_account_sends_per_second=2000,
    )


@pytest.fixture(scope="session")
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client = Redis.from_url(settings.redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
async def app(settings: Settings, redis: Redis, sandbox: LiveServer) -> AsyncIterator[FastAPI]:
    # The providers (the sandbox) are up before the app starts: its provider health is
    # checked in the background from start-up on.
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture(scope="session")
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


@pytest.fixture(scope="session")
def live_server(settings: Settings, api_port: int) -> Iterator[LiveServer]:
    """The API over real HTTP on a loopback port (its own app instance and lifespan);
    `settings.public_base_url` points here, so Telnyx receipts reach it."""
    with LiveServer(lambda: create_app(settings), port=api_port) as server:
        yield server


@pytest.fixture(scope="session")
def sandbox(live_server: LiveServer, sandbox_port: int) -> Iterator[LiveServer]:
    """The Telnyx + Stripe sandbox on loopback, delivering webhooks to `live_server`."""
    from koinonia.sandbox.server import create_sandbox_app
    from koinonia.sandbox.state import SandboxConfig

    config = SandboxConfig(
        stripe_webhook_url=f"{live_server.url}/api/v1/webhooks/stripe",
        telnyx_webhook_url=f"{live_server.url}/api/v1/webhooks/telnyx",
        telnyx_private_key=TELNYX_TEST_SEED,
        public_base_url=f"http://127.0.0.1:{sandbox_port}",
    )
    with LiveServer(lambda: create_sandbox_app(config), port=sandbox_port) as server:
        yield server


@pytest.fixture
async def tenant_factory(app: FastAPI, settings: Settings) -> Any:
    """`await tenant_factory(role="owner")` → a committed church + user + access token."""
    from tests.support.factories import Tenant, create_tenant

    async def make(**kwargs: Any) -> Tenant:
        async with app.state.database.unit_of_work() as session:
            return await create_tenant(session, settings, **kwargs)

    return make


@pytest.fixture
async def owner(client: httpx.AsyncClient) -> Any:
    """A church registered through the API, with its owner's tokens."""
    from tests.support.api import register

    return await register(client)


@pytest.fixture
async def other_church(client: httpx.AsyncClient) -> Any:
    from tests.support.api import register

    return await register(client)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    from tests.support.report import REPORTS

    if REPORTS:
        terminalreporter.section("figures")
        for line in REPORTS:
            terminalreporter.write_line(line)
