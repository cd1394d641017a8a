"""A PgBouncer started from the PRODUCTION template (deploy/pgbouncer/pgbouncer.ini,
rendered by `koinonia pgbouncer-config`): SCRAM authentication, transaction pooling, the
stats user and its metrics on the API's /metrics, and the connections that must bypass it
(DATABASE_DIRECT_URL: the worker's job queue and the webhook writer).

The bouncer runs in a temporary directory on a free port as the `postgres` OS user
(PgBouncer refuses to run as root), in front of the shared PostgreSQL (trust on loopback:
what is checked here is PgBouncer's own authentication of its clients).
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from psycopg import sql
from typer.testing import CliRunner

from koinonia import pgbouncer
from koinonia.app import create_app
from koinonia.cli import app as cli
from koinonia.jobs import build_job_app
from koinonia.settings import Settings
from tests.conftest import (
    ADMIN_URL,
    create_scratch_database,
    direct_database_url,
    drop_database,
    make_settings,
)
from tests.support.servers import free_port, wait_for_port

# Its own bouncer, whatever TEST_DATABASE_APP_HOSTPORT says: one pass is enough.
pytestmark = pytest.mark.nopgbouncer

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "deploy" / "pgbouncer" / "pgbouncer.ini"
OS_USER = "postgres"


@dataclass
class Bouncer:
    port: int
    directory: Path
    database: str
    role: str  # a login role with a SCRAM password, its secret copied from PostgreSQL
    role_password: str
    app_password: str  # `postgres` through the bouncer (the application's connections)
    stats_password: str  # pgbouncer_stats, a console-only user

    def url(self, user: str, password: str, database: str | None = None) -> str:
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{database or self.database}"

    @property
    def app_url(self) -> str:
        return self.url("postgres", self.app_password).replace("postgresql://", "postgresql+psycopg://")

    @property
    def stats_url(self) -> str:
        return self.url("pgbouncer_stats", self.stats_password, "pgbouncer")

    def log(self) -> str:
        try:
            return (self.directory / "pgbouncer.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""


def _as_postgres(command: list[str]) -> list[str]:
    return ["runuser", "-u", OS_USER, "--", *command] if os.geteuid() == 0 else command


def _admin_execute(statement: sql.Composable, params: list[Any] | None = None) -> Any:
    with psycopg.connect(ADMIN_URL, autocommit=True) as connection:
        cursor = connection.execute(statement, params)
        return cursor.fetchone() if cursor.description else None


@pytest.fixture(scope="module")
def bouncer(database_name: str) -> Iterator[Bouncer]:
    if shutil.which("pgbouncer") is None:
        pytest.fail("pgbouncer is missing: apt-get install pgbouncer (scripts/pgbouncer.sh does)")
    directory = Path(tempfile.mkdtemp(prefix="koinonia-pgbouncer-prod-"))
    role = f"koinonia_pgb_{uuid.uuid4().hex[:8]}"
    found = Bouncer(
        port=free_port(),
        directory=directory,
        database=database_name,
        role=role,
        role_password=f"role-{uuid.uuid4().hex}",
        app_password=f"app-{uuid.uuid4().hex}",
        stats_password=f"stats-{uuid.uuid4().hex}",
    )
    _admin_execute(
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(role), sql.Literal(found.role_password)
        )
    )
    pidfile = directory / "pgbouncer.pid"
    try:
        # The documented procedure: the application role's secret copied from pg_authid,
        # the console users' made by `koinonia pgbouncer-secret`.
        (copied,) = _admin_execute(
            sql.SQL(
                "SELECT format('\"%s\" \"%s\"', rolname, rolpassword) FROM pg_authid "
                "WHERE rolname = {}"
            ).format(sql.Literal(role))
        )
        runner = CliRunner()
        lines = [copied]
        for user, password in (
            ("pgbouncer_stats", found.stats_password),
            ("postgres", found.app_password),
        ):
            made = runner.invoke(cli, ["pgbouncer-secret", user], input=password + "\n")
            assert made.exit_code == 0, made.output
            lines.append(made.output.strip())
        (directory / "userlist.txt").write_text("\n".join(lines) + "\n")

        rendered = runner.invoke(
            cli,
            [
                "pgbouncer-config",
                "--api-processes=2",
                "--workers=1",
                "--worker-concurrency=4",
                "--api-pool-size=10",
                "--api-max-overflow=10",
                "--worker-pool-size=10",
                "--worker-max-overflow=10",
                "--max-connections=100",
                f"--template={TEMPLATE}",
                *("--set", f"LISTEN_PORT={found.port}"),
                *("--set", f"CONF_DIR={directory}"),
                *("--set", f"RUN_DIR={directory}"),
                *("--set", f"LOG_DIR={directory}"),
            ],
            env={"KOINONIA_ENV": "test", "DATABASE_DIRECT_URL": direct_database_url(database_name)},
        )
        assert rendered.exit_code == 0, rendered.output
        (directory / "pgbouncer.ini").write_text(rendered.output)
        if os.geteuid() == 0:
            owner = pwd.getpwnam(OS_USER)
            for path in (directory, *directory.iterdir()):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        (directory / "userlist.txt").chmod(0o600)
        _start(found)
        yield found
    finally:
        _stop(pidfile)
        shutil.rmtree(directory, ignore_errors=True)
        _admin_execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def _start(bouncer: Bouncer) -> None:
    started = subprocess.run(
        _as_postgres(["pgbouncer", "-d", str(bouncer.directory / "pgbouncer.ini")]),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=bouncer.directory,
        check=False,
    )
    assert started.returncode == 0, started.stdout + started.stderr + bouncer.log()
    try:
        wait_for_port(bouncer.port, timeout=10)
    except TimeoutError:
        pytest.fail(f"pgbouncer did not listen:\n{bouncer.log()}")


def _stop(pidfile: Path) -> None:
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


def _console(bouncer: Bouncer, statement: str) -> list[dict[str, Any]]:
    with psycopg.connect(
        bouncer.stats_url, autocommit=True, cursor_factory=psycopg.ClientCursor
    ) as connection:
        cursor = connection.execute(statement)
        names = [column.name for column in cursor.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


# --- authentication and pooling -----------------------------------------------------------


def test_a_wrong_password_is_refused(bouncer: Bouncer) -> None:
    for user, password in (
        (bouncer.role, "not-the-password"),
        ("postgres", "not-the-password"),
        ("pgbouncer_stats", bouncer.role_password),
        ("nobody_at_all", "whatever"),
    ):
        with pytest.raises(psycopg.OperationalError, match="authentication failed"):
            psycopg.connect(bouncer.url(user, password), connect_timeout=5).close()


def test_the_right_password_works_in_transaction_mode(bouncer: Bouncer) -> None:
    with psycopg.connect(
        bouncer.url(bouncer.role, bouncer.role_password), prepare_threshold=None
    ) as connection:
        row = connection.execute("SELECT current_user, current_database()").fetchone()
        assert row == (bouncer.role, bouncer.database)
    pools = {(p["database"], p["user"]): p for p in _console(bouncer, "SHOW POOLS")}
    assert pools[(bouncer.database, bouncer.role)]["pool_mode"] == "transaction"
    config = {row["key"]: row["value"] for row in _console(bouncer, "SHOW CONFIG")}
    assert config["auth_type"] == "scram-sha-256"
    assert config["pool_mode"] == "transaction"
    assert config["server_reset_query"] == ""
    assert config["ignore_startup_parameters"] == "extra_float_digits,options"
    # The pool sizes the formula gave for this topology.
    expected = pgbouncer.plan_pools(
        pgbouncer.Topology(
            api_processes=2,
            api_pool_size=10,
            api_max_overflow=10,
            workers=1,
            worker_concurrency=4,
            worker_pool_size=10,
            worker_max_overflow=10,
            max_connections=100,
        )
    )
    assert config["default_pool_size"] == str(expected.default_pool_size)
    assert config["max_db_connections"] == str(expected.server_connections)
    assert config["max_client_conn"] == str(expected.max_client_conn)
    # The stats user reads, it cannot act.
    with (
        psycopg.connect(bouncer.stats_url, autocommit=True) as console,
        pytest.raises(psycopg.Error, match="admin access needed"),
    ):
        console.execute("PAUSE")


def test_the_admin_console_refuses_the_extended_protocol(bouncer: Bouncer) -> None:
    """Why pgbouncer_metrics reads through a client-side-binding cursor."""
    with (
        psycopg.connect(bouncer.stats_url, autocommit=True) as console,
        pytest.raises(psycopg.Error, match="extended query protocol not supported"),
    ):
        console.cursor(binary=True).execute("SHOW POOLS")


# --- metrics ------------------------------------------------------------------------------


@asynccontextmanager
async def _running(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield application, client


def _bouncer_settings(bouncer: Bouncer, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": bouncer.app_url,
        "database_direct_url": direct_database_url(bouncer.database),
        "pgbouncer_admin_url": bouncer.stats_url,
    }
    values.update(overrides)
    return make_settings(**values)


def _sample(metrics: str, name: str, **labels: str) -> float | None:
    selector = ",".join(f'{key}="{value}"' for key, value in labels.items())
    series = f"{name}{{{selector}}}" if labels else name
    for line in metrics.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_metrics_show_pgbouncer_pools_and_totals(bouncer: Bouncer) -> None:
    async with _running(_bouncer_settings(bouncer)) as (application, client):
        async with await psycopg.AsyncConnection.connect(
            bouncer.url(bouncer.role, bouncer.role_password), prepare_threshold=None
        ) as busy:
            await busy.execute("SELECT 1")  # a transaction left open: one server held
            scraped = await client.get("/metrics")
            assert scraped.status_code == 200
            metrics = scraped.text
            pool = {"database": bouncer.database, "user": bouncer.role}
            assert _sample(metrics, "koinonia_pgbouncer_up") == 1.0
            assert _sample(metrics, "koinonia_pgbouncer_cl_active", **pool) == 1.0
            assert _sample(metrics, "koinonia_pgbouncer_sv_active", **pool) == 1.0
            assert _sample(metrics, "koinonia_pgbouncer_cl_waiting", **pool) == 0.0
            assert _sample(metrics, "koinonia_pgbouncer_maxwait_seconds", **pool) == 0.0
            assert _sample(metrics, "koinonia_pgbouncer_sv_idle", **pool) is not None
            assert _sample(metrics, "koinonia_pgbouncer_sv_used", **pool) is not None
            for counter in (
                "koinonia_pgbouncer_xacts_total",
                "koinonia_pgbouncer_queries_total",
                "koinonia_pgbouncer_wait_seconds_total",
            ):
                assert _sample(metrics, counter, database=bouncer.database) is not None, counter
            assert "# TYPE koinonia_pgbouncer_xacts_total counter" in metrics
            # The console's own pseudo-database is left out.
            assert 'database="pgbouncer"' not in metrics

            await busy.commit()  # the server goes back to the pool
            application.state.pgbouncer_monitor.refresh_seconds = 0
            metrics = (await client.get("/metrics")).text
            assert _sample(metrics, "koinonia_pgbouncer_sv_active", **pool) == 0.0
            assert _sample(metrics, "koinonia_pgbouncer_cl_active", **pool) == 1.0
        metrics = (await client.get("/metrics")).text
        assert _sample(metrics, "koinonia_pgbouncer_cl_active", **pool) == 0.0
    # Without an application that reads it, no series at all.
    async with _running(_bouncer_settings(bouncer, pgbouncer_admin_url="")) as (_, client):
        metrics = (await client.get("/metrics")).text
        assert "# HELP koinonia_pgbouncer_up" in metrics
        assert _sample(metrics, "koinonia_pgbouncer_up") is None


async def test_a_dead_pgbouncer_is_up_0_and_never_fails_the_scrape(bouncer: Bouncer) -> None:
    dead = f"postgresql://pgbouncer_stats:x@127.0.0.1:{free_port()}/pgbouncer"
    async with _running(_bouncer_settings(bouncer, pgbouncer_admin_url=dead)) as (_, client):
        scraped = await client.get("/metrics")
        assert scraped.status_code == 200
        assert _sample(scraped.text, "koinonia_pgbouncer_up") == 0.0
        assert "koinonia_pgbouncer_cl_active{" not in scraped.text
        assert "koinonia_http_requests_total" in scraped.text  # the rest is all there


async def test_a_silent_pgbouncer_times_out_quickly(bouncer: Bouncer) -> None:
    """Accepts the TCP connection, never answers: the scrape waits the timeout, no more."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        url = f"postgresql://pgbouncer_stats:x@127.0.0.1:{port}/pgbouncer"
        async with _running(_bouncer_settings(bouncer, pgbouncer_admin_url=url)) as (_, client):
            started = time.monotonic()
            scraped = await client.get("/metrics")
            elapsed = time.monotonic() - started
        assert scraped.status_code == 200
        assert _sample(scraped.text, "koinonia_pgbouncer_up") == 0.0
        assert elapsed < 4.0, elapsed


async def test_the_monitor_reconnects_after_pgbouncer_restarts(bouncer: Bouncer) -> None:
    async with _running(_bouncer_settings(bouncer)) as (application, client):
        application.state.pgbouncer_monitor.refresh_seconds = 0
        assert _sample((await client.get("/metrics")).text, "koinonia_pgbouncer_up") == 1.0
        # The console connection held between scrapes dies with the process.
        _stop(bouncer.directory / "pgbouncer.pid")
        assert _sample((await client.get("/metrics")).text, "koinonia_pgbouncer_up") == 0.0
        _start(bouncer)
        assert _sample((await client.get("/metrics")).text, "koinonia_pgbouncer_up") == 1.0
        # And a connection broken under a live PgBouncer is replaced within the same scrape.
        _stop(bouncer.directory / "pgbouncer.pid")
        _start(bouncer)
        assert _sample((await client.get("/metrics")).text, "koinonia_pgbouncer_up") == 1.0


# --- what bypasses PgBouncer ------------------------------------------------------------------


async def test_the_workers_job_queue_and_the_webhook_writer_use_the_direct_url(
    bouncer: Bouncer,
) -> None:
    settings = _bouncer_settings(bouncer, pgbouncer_admin_url="")
    assert settings.direct_database_url.endswith(f"@127.0.0.1:5432/{bouncer.database}")

    # The worker's job App (worker.run_attempt): pool and LISTEN on PostgreSQL itself.
    worker_app = build_job_app(settings, pool_max=3, direct=True)
    async with worker_app.open_async():
        connector: Any = worker_app.connector
        async with connector.pool.connection() as connection:
            assert connection.info.port == 5432
        channel = f"koinonia_direct_{uuid.uuid4().hex[:8]}"
        heard: asyncio.Queue[str] = asyncio.Queue()

        async def on_notification(*, channel: str, payload: str) -> None:
            await heard.put(payload)

        listener = asyncio.create_task(connector.listen_notify(on_notification, [channel]))
        try:
            async with await psycopg.AsyncConnection.connect(
                direct_database_url(bouncer.database).replace("+psycopg", ""), autocommit=True
            ) as notifier:
                deadline = time.monotonic() + 10
                while heard.empty() and time.monotonic() < deadline:
                    await notifier.execute(
                        sql.SQL("NOTIFY {}, 'ping'").format(sql.Identifier(channel))
                    )
                    await asyncio.sleep(0.1)
            assert await asyncio.wait_for(heard.get(), 1) == "ping"
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)

    # The API's job App (deferring inside request transactions) stays on DATABASE_URL.
    api_app = build_job_app(settings)
    async with api_app.open_async():
        api_connector: Any = api_app.connector
        async with api_connector.pool.connection() as connection:
            assert connection.info.port == bouncer.port

    # The API process: the engine through PgBouncer, the webhook writer direct.
    async with _running(settings) as (application, _):
        async with application.state.database.engine.connect() as connection:
            raw = await connection.get_raw_connection()
            assert raw.driver_connection.info.port == bouncer.port
        writer_pool = application.state.telnyx_events._pool
        async with writer_pool.connection() as connection:
            assert connection.info.port == 5432
            row = await (await connection.execute("SELECT current_database()")).fetchone()
            assert row == (bouncer.database,)


def test_pgbouncer_runs_as_the_postgres_user(bouncer: Bouncer) -> None:
    pid = int((bouncer.directory / "pgbouncer.pid").read_text().strip())
    status = Path(f"/proc/{pid}/status").read_text()
    uid = int(re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE)[1])  # type: ignore[index]
    assert uid == (pwd.getpwnam(OS_USER).pw_uid if os.geteuid() == 0 else os.geteuid())


# --- auth_query through deploy/pgbouncer/auth_query.sql ---------------------------------------


@pytest.fixture(scope="module")
def auth_query_bouncer() -> Iterator[Bouncer]:
    """The template's alternative: no application secret in auth_file, PgBouncer asks the
    database through auth_query.sql's function as its auth_user (a role of its own)."""
    database = create_scratch_database("koinonia_pgb_authq")
    directory = Path(tempfile.mkdtemp(prefix="koinonia-pgbouncer-authq-"))
    suffix = uuid.uuid4().hex[:8]
    auth_user, role = f"pgbouncer_auth_{suffix}", f"koinonia_authq_{suffix}"
    found = Bouncer(
        port=free_port(),
        directory=directory,
        database=database,
        role=role,
        role_password=f"role-{uuid.uuid4().hex}",
        app_password="",
        stats_password=f"stats-{uuid.uuid4().hex}",
    )
    try:
        script = (ROOT / "deploy" / "pgbouncer" / "auth_query.sql").read_text()
        with psycopg.connect(
            ADMIN_URL.rsplit("/", 1)[0] + f"/{database}", autocommit=True
        ) as connection:
            connection.execute(script.replace("pgbouncer_auth", auth_user))
            connection.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(auth_user), sql.Literal(f"auth-{uuid.uuid4().hex}")
                )
            )
            connection.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(found.role_password)
                )
            )
            (auth_line,) = connection.execute(
                sql.SQL(
                    "SELECT format('\"%s\" \"%s\"', rolname, rolpassword) FROM pg_authid "
                    "WHERE rolname = {}"
                ).format(sql.Literal(auth_user))
            ).fetchone() or ("",)
        made = CliRunner().invoke(
            cli, ["pgbouncer-secret", "pgbouncer_stats"], input=found.stats_password + "\n"
        )
        assert made.exit_code == 0, made.output
        # Only the auth_user and the console user: the application role is looked up.
        (directory / "userlist.txt").write_text(f"{auth_line}\n{made.output.strip()}\n")
        rendered = CliRunner().invoke(
            cli,
            [
                "pgbouncer-config",
                f"--template={TEMPLATE}",
                *("--set", f"LISTEN_PORT={found.port}"),
                *("--set", f"CONF_DIR={directory}"),
                *("--set", f"RUN_DIR={directory}"),
                *("--set", f"LOG_DIR={directory}"),
            ],
            env={"KOINONIA_ENV": "test", "DATABASE_DIRECT_URL": direct_database_url(database)},
        )
        assert rendered.exit_code == 0, rendered.output
        # The two edits the template's comments describe.
        entry = f"{database} = host=127.0.0.1 port=5432 dbname={database}"
        ini = rendered.output
        assert ini.count(f"\n{entry}\n") == 1 and ini.count("\n;auth_query = ") == 1
        ini = ini.replace(entry, f"{entry} auth_user={auth_user}")
        ini = ini.replace("\n;auth_query = ", "\nauth_query = ")
        (directory / "pgbouncer.ini").write_text(ini)
        if os.geteuid() == 0:
            owner = pwd.getpwnam(OS_USER)
            for path in (directory, *directory.iterdir()):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        (directory / "userlist.txt").chmod(0o600)
        _start(found)
        yield found
    finally:
        _stop(directory / "pgbouncer.pid")
        shutil.rmtree(directory, ignore_errors=True)
        drop_database(database)
        for name in (role, auth_user):
            _admin_execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def test_auth_query_looks_the_role_up_through_the_function(
    auth_query_bouncer: Bouncer,
) -> None:
    bouncer = auth_query_bouncer
    with psycopg.connect(
        bouncer.url(bouncer.role, bouncer.role_password), prepare_threshold=None
    ) as connection:
        assert connection.execute("SELECT current_user").fetchone() == (bouncer.role,)
    with pytest.raises(psycopg.OperationalError, match="authentication failed"):
        psycopg.connect(bouncer.url(bouncer.role, "not-the-password"), connect_timeout=5)
    # The function never hands out a superuser's secret: to PgBouncer `postgres` is unknown.
    with pytest.raises(psycopg.OperationalError, match="no such user"):
        psycopg.connect(bouncer.url("postgres", "anything"), connect_timeout=5)
