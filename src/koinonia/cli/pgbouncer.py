"""`koinonia pgbouncer-config` and `koinonia pgbouncer-secret`: PgBouncer for production
(the formula is `koinonia.pgbouncer`; docs/scaling.md, "PgBouncer in production")."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from koinonia import pgbouncer
from koinonia.cli.common import settings_or_exit


def config(
    api_processes: int = typer.Option(2, min=1, help="API processes (one per port)"),
    workers: int = typer.Option(2, min=0, help="Worker processes"),
    worker_concurrency: int = typer.Option(8, min=1, help="Each worker's --concurrency"),
    api_pool_size: int | None = typer.Option(
        None, min=1, help="The API's DATABASE_POOL_SIZE (default: this environment's)"
    ),
    api_max_overflow: int | None = typer.Option(
        None, min=0, help="The API's DATABASE_MAX_OVERFLOW (default: this environment's)"
    ),
    worker_pool_size: int | None = typer.Option(
        None, min=0, help="The workers' DATABASE_POOL_SIZE (default: this environment's)"
    ),
    worker_max_overflow: int | None = typer.Option(
        None, min=0, help="The workers' DATABASE_MAX_OVERFLOW (default: this environment's)"
    ),
    workers_direct: bool = typer.Option(
        False, help="The workers' DATABASE_URL names PostgreSQL, not PgBouncer"
    ),
    max_connections: int = typer.Option(100, min=1, help="PostgreSQL's max_connections"),
    superuser_reserved: int = typer.Option(
        3, min=0, help="PostgreSQL's superuser_reserved_connections"
    ),
    admin_reserved: int = typer.Option(
        10, min=0, help="Direct sessions kept free: migrate, psql, pgBackRest, monitoring"
    ),
    primary_cpus: int = typer.Option(
        0, min=0, help="The primary's vCPUs: at most 4 server connections each (0: no cap)"
    ),
    template: Path | None = typer.Option(
        None,
        exists=True,
        dir_okay=False,
        help="Render this template (deploy/pgbouncer/pgbouncer.ini) instead of the section",
    ),
    values: list[str] = typer.Option(
        [], "--set", help="NAME=VALUE for a template placeholder (LISTEN_ADDR=10.0.1.20)"
    ),
) -> None:
    """Print PgBouncer's pool sizes for these process counts (with their arithmetic), or
    the whole configuration rendered from a template."""
    settings = settings_or_exit()
    try:
        plan = pgbouncer.plan_pools(
            pgbouncer.Topology(
                api_processes=api_processes,
                api_pool_size=api_pool_size or settings.database_pool_size,
                api_max_overflow=(
                    settings.database_max_overflow if api_max_overflow is None else api_max_overflow
                ),
                workers=workers,
                worker_concurrency=worker_concurrency,
                worker_pool_size=(
                    settings.database_pool_size if worker_pool_size is None else worker_pool_size
                ),
                worker_max_overflow=(
                    settings.database_max_overflow
                    if worker_max_overflow is None
                    else worker_max_overflow
                ),
                workers_through_pgbouncer=not workers_direct,
                max_connections=max_connections,
                superuser_reserved=superuser_reserved,
                admin_reserved=admin_reserved,
                primary_cpus=primary_cpus,
            )
        )
    except pgbouncer.PoolPlanError as error:
        print(f"pgbouncer-config: {error}", file=sys.stderr)
        raise typer.Exit(code=2) from None
    if template is None:
        typer.echo(plan.ini_section(), nl=False)
        return
    filled = {
        **pgbouncer.TEMPLATE_DEFAULTS,
        **pgbouncer.server_values(settings.direct_database_url),
        **plan.ini_values(),
    }
    for value in values:
        name, sep, text = value.partition("=")
        if not sep or not name:
            print(f"pgbouncer-config: --set {value!r} is not NAME=VALUE", file=sys.stderr)
            raise typer.Exit(code=2)
        filled[name] = text
    try:
        rendered = pgbouncer.render(template.read_text(), filled)
    except KeyError as error:
        print(f"pgbouncer-config: {error.args[0]}", file=sys.stderr)
        raise typer.Exit(code=2) from None
    typer.echo("; pool sizes by koinonia pgbouncer-config:")
    typer.echo("; " + "\n; ".join(plan.explain()))
    typer.echo(rendered, nl=False)


def secret(
    user: str = typer.Argument(..., help="The user name PgBouncer's auth_file lists"),
) -> None:
    """Print an auth_file line with a SCRAM-SHA-256 secret for USER (PgBouncer's console
    users). The password is read from standard input, or prompted for on a terminal."""
    if sys.stdin.isatty():
        password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    try:
        line = pgbouncer.userlist_line(user, pgbouncer.scram_sha256_secret(password))
    except ValueError as error:
        print(f"pgbouncer-secret: {error}", file=sys.stderr)
        raise typer.Exit(code=2) from None
    typer.echo(line)
