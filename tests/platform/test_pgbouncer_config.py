"""PgBouncer's pool-size formula (`koinonia.pgbouncer`), its template, its SCRAM secrets,
`koinonia pgbouncer-config` / `pgbouncer-secret`, and the two settings it brings
(DATABASE_DIRECT_URL, PGBOUNCER_ADMIN_URL)."""

from __future__ import annotations

import base64
import inspect
import re
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from typer.testing import CliRunner

from koinonia import pgbouncer
from koinonia.cli import app as cli
from koinonia.pgbouncer import PoolPlanError, Topology, plan_pools
from koinonia.settings import SettingsError, load_settings
from tests.conftest import ADMIN_URL

pytestmark = pytest.mark.nopgbouncer  # no application database: one pass is enough

TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "pgbouncer" / "pgbouncer.ini"


def _topology(**overrides: object) -> Topology:
    values: dict[str, object] = {
        "api_processes": 4,
        "api_pool_size": 10,
        "api_max_overflow": 5,
        "workers": 4,
        "worker_concurrency": 8,
        "worker_pool_size": 8,
        "worker_max_overflow": 2,
        "max_connections": 200,
    }
    values.update(overrides)
    return Topology(**values)  # type: ignore[arg-type]


def test_the_documented_example() -> None:
    """docs/scaling.md's worked example, number by number."""
    plan = plan_pools(_topology(primary_cpus=8))
    assert plan.pooled_clients == 4 * (10 + 5) + 4 * (8 + 2 + 2) == 108
    assert plan.direct == 4 * 2 + 4 * (8 + 2 + 1) == 52
    assert plan.server_budget == 200 - 3 - 10 - 52 == 135
    assert plan.server_connections == min(108, 135, 4 * 8) == 32
    assert (plan.default_pool_size, plan.reserve_pool_size) == (26, 6)
    assert plan.max_client_conn == 2 * (108 + 4) + 10 == 234
    assert plan.max_connections_without_waiting == 3 + 10 + 52 + 108 == 173
    assert plan.ini_values() == {
        "DEFAULT_POOL_SIZE": "26",
        "RESERVE_POOL_SIZE": "6",
        "MAX_DB_CONNECTIONS": "32",
        "MAX_CLIENT_CONN": "234",
    }


def test_server_connections_never_exceed_clients_budget_or_cpus() -> None:
    # Plenty of max_connections, no CPU cap: as many as the clients can use.
    roomy = plan_pools(_topology(max_connections=1000))
    assert roomy.server_connections == roomy.pooled_clients == 108
    # A tight max_connections: what is left after the reserved and direct connections.
    tight = plan_pools(_topology(max_connections=100))
    assert tight.server_connections == tight.server_budget == 100 - 13 - 52 == 35
    # The reserve is a fifth, inside max_db_connections.
    for plan in (roomy, tight):
        assert plan.default_pool_size + plan.reserve_pool_size == plan.server_connections
        assert plan.reserve_pool_size == plan.server_connections // 5
        assert plan.server_connections <= plan.server_budget


def test_workers_direct_move_their_sqlalchemy_pools_out_of_pgbouncer() -> None:
    through = plan_pools(_topology(max_connections=1000))
    direct = plan_pools(_topology(max_connections=1000, workers_through_pgbouncer=False))
    worker_side = 4 * (8 + 2 + 2)
    assert direct.pooled_clients == through.pooled_clients - worker_side == 60
    assert direct.direct == through.direct + worker_side == 100
    # No workers: the job queue's connections vanish, the webhook writers stay.
    alone = plan_pools(_topology(workers=0))
    assert alone.direct == 4 * pgbouncer.WEBHOOK_WRITER_CONNECTIONS


def test_too_few_max_connections_says_how_many_are_needed() -> None:
    with pytest.raises(PoolPlanError, match=r"raise it to at least 173"):
        plan_pools(_topology(max_connections=65))
    with pytest.raises(PoolPlanError, match="api_processes"):
        _topology(api_processes=0)


def test_the_formula_counts_what_the_code_opens() -> None:
    from koinonia import worker
    from koinonia.telnyx.event_writer import EventWriter

    flushers = inspect.signature(EventWriter.__init__).parameters["flushers"].default
    assert flushers == pgbouncer.WEBHOOK_WRITER_CONNECTIONS  # the writer's max_size
    run_worker = inspect.getsource(worker.run_worker)
    assert f"pool_max=concurrency + {pgbouncer.JOB_POOL_EXTRA}" in run_worker


def test_explain_shows_the_arithmetic() -> None:
    section = plan_pools(_topology(primary_cpus=8)).ini_section()
    assert "; server connections = min(clients 108, budget 135, 4 × 8 vCPUs) = 32" in section
    assert section.endswith("max_client_conn = 234\n")


# --- the template -----------------------------------------------------------------------


def test_template_placeholders_are_the_documented_ones() -> None:
    template = TEMPLATE.read_text()
    assert pgbouncer.placeholders(template) == {
        *pgbouncer.TEMPLATE_DEFAULTS,
        "PG_HOST",
        "PG_PORT",
        "PG_DATABASE",
        *plan_pools(_topology()).ini_values(),
    }
    for setting in (
        "pool_mode = transaction",
        "auth_type = scram-sha-256",
        "server_reset_query =\n",
        "ignore_startup_parameters = extra_float_digits,options",
        "stats_users = pgbouncer_stats",
        "admin_users = pgbouncer_admin",
        "query_wait_timeout = ",
        "server_idle_timeout = ",
    ):
        assert setting in template, setting


def test_render_refuses_a_missing_value() -> None:
    with pytest.raises(KeyError, match="LISTEN_PORT, PG_HOST"):
        pgbouncer.render("a=${PG_HOST} b=${LISTEN_PORT} c=$1", {})
    assert pgbouncer.render("a=${PG_HOST} c=$1", {"PG_HOST": "db"}) == "a=db c=$1"


def test_server_values_come_from_the_direct_url() -> None:
    assert pgbouncer.server_values("postgresql+psycopg://u:p@10.0.1.10:5433/koinonia") == {
        "PG_HOST": "10.0.1.10",
        "PG_PORT": "5433",
        "PG_DATABASE": "koinonia",
    }


# --- SCRAM secrets ------------------------------------------------------------------------


def test_scram_secret_is_the_one_postgresql_computes() -> None:
    """Same password, salt and iterations as a role PostgreSQL hashed: the same secret."""
    role = f"koinonia_scram_{uuid.uuid4().hex[:8]}"
    password = "correct horse battery staple 42"
    with psycopg.connect(ADMIN_URL, autocommit=True) as connection:
        connection.execute("SET password_encryption = 'scram-sha-256'")
        connection.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
        try:
            row = connection.execute(
                "SELECT rolpassword FROM pg_authid WHERE rolname = %s", [role]
            ).fetchone()
        finally:
            connection.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    assert row is not None
    stored: str = row[0]
    match = re.fullmatch(r"SCRAM-SHA-256\$(\d+):([^$]+)\$.+", stored)
    assert match is not None, stored
    iterations, salt = int(match[1]), base64.b64decode(match[2])
    assert pgbouncer.scram_sha256_secret(password, salt=salt, iterations=iterations) == stored


def test_scram_secret_salts_and_refuses_what_postgresql_would_change() -> None:
    first, second = (pgbouncer.scram_sha256_secret("pw-1234") for _ in range(2))
    assert first != second and first.startswith("SCRAM-SHA-256$4096:")
    for bad in ("", "naïve", "tab\there"):
        with pytest.raises(ValueError, match="printable ASCII"):
            pgbouncer.scram_sha256_secret(bad)
    assert pgbouncer.userlist_line('we"ird', "s") == '"we""ird" "s"'


# --- the commands -----------------------------------------------------------------------


def test_pgbouncer_config_prints_the_section_and_renders_the_template() -> None:
    runner = CliRunner()
    arguments = [
        "pgbouncer-config",
        "--api-processes=4",
        "--workers=4",
        "--worker-concurrency=8",
        "--api-pool-size=10",
        "--api-max-overflow=5",
        "--worker-pool-size=8",
        "--worker-max-overflow=2",
        "--max-connections=200",
        "--primary-cpus=8",
    ]
    env = {"KOINONIA_ENV": "test", "DATABASE_DIRECT_URL": "postgresql://k@10.0.1.10:5432/koinonia"}
    section = runner.invoke(cli, arguments, env=env)
    assert section.exit_code == 0, section.output
    assert section.output == plan_pools(_topology(primary_cpus=8)).ini_section()

    rendered = runner.invoke(
        cli, [*arguments, f"--template={TEMPLATE}", "--set", "LISTEN_ADDR=10.0.1.20"], env=env
    )
    assert rendered.exit_code == 0, rendered.output
    assert "${" not in rendered.output
    for line in (
        "koinonia = host=10.0.1.10 port=5432 dbname=koinonia",
        "listen_addr = 10.0.1.20",
        "listen_port = 6432",
        "auth_file = /etc/pgbouncer/userlist.txt",
        "default_pool_size = 26",
        "reserve_pool_size = 6",
        "max_db_connections = 32",
        "max_client_conn = 234",
    ):
        assert f"\n{line}\n" in rendered.output, line

    refused = runner.invoke(cli, [*arguments[:-2], "--max-connections=60"], env=env)
    assert refused.exit_code == 2
    assert "raise it to at least" in refused.output


def test_pgbouncer_secret_reads_the_password_from_stdin() -> None:
    result = CliRunner().invoke(cli, ["pgbouncer-secret", "pgbouncer_stats"], input="s3cret\n")
    assert result.exit_code == 0, result.output
    assert re.fullmatch(
        r'"pgbouncer_stats" "SCRAM-SHA-256\$4096:[^$]+\$[^:]+:[^"]+"\n', result.output
    )


# --- settings ----------------------------------------------------------------------------


def test_database_direct_url_defaults_to_database_url_and_is_normalised() -> None:
    plain = load_settings(database_url="postgresql://u@bouncer:6432/app")
    assert plain.database_direct_url == ""
    assert plain.direct_database_url == "postgresql+psycopg://u@bouncer:6432/app"
    # A copy with another DATABASE_URL follows it.
    moved = plain.model_copy(update={"database_url": "postgresql+psycopg://u@other:5432/app"})
    assert moved.direct_database_url == "postgresql+psycopg://u@other:5432/app"

    split = load_settings(
        database_url="postgresql://u@bouncer:6432/app",
        database_direct_url="postgres://u@primary:5432/app",
    )
    assert split.direct_database_url == "postgresql+psycopg://u@primary:5432/app"
    with pytest.raises(SettingsError, match="DATABASE_DIRECT_URL"):
        load_settings(database_direct_url="mysql://u@primary/app")
    with pytest.raises(SettingsError, match="DATABASE_DIRECT_URL must name a host"):
        load_settings(database_direct_url="postgresql://u@primary")


def test_pgbouncer_admin_url_must_name_the_console() -> None:
    assert load_settings().pgbouncer_admin_url == ""
    configured = load_settings(
        pgbouncer_admin_url="postgresql+psycopg://stats:p%2Fw@10.0.1.20:6432/pgbouncer"
    )
    assert configured.pgbouncer_admin_url == "postgresql://stats:p%2Fw@10.0.1.20:6432/pgbouncer"
    with pytest.raises(SettingsError, match="PGBOUNCER_ADMIN_URL must name PgBouncer's admin"):
        load_settings(pgbouncer_admin_url="postgresql://stats@10.0.1.20:6432/koinonia")
    with pytest.raises(SettingsError, match="PGBOUNCER_ADMIN_URL has an invalid port"):
        load_settings(pgbouncer_admin_url="postgresql://stats@10.0.1.20:0/pgbouncer")
