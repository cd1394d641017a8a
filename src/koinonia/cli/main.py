"""Top-level commands: api, worker, migrate, check-env, dev, sandbox."""

from __future__ import annotations

import asyncio
import sys

import typer
import uvicorn

from koinonia.cli import backup, database, dev, members, partitions, pgbouncer, seed
from koinonia.cli.common import settings_or_exit
from koinonia.settings import Settings, SettingsError, load_settings

app = typer.Typer(
    help="Koinonia: church texting service backend.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.command()(database.migrate)
app.command()(database.downgrade)
app.command()(dev.dev)
app.command("seed-demo")(seed.seed_demo)
app.add_typer(members.app, name="members")
app.add_typer(partitions.app, name="partitions")
app.add_typer(backup.app, name="backup")
app.command()(backup.restore)
app.command("pgbouncer-config")(pgbouncer.config)
app.command("pgbouncer-secret")(pgbouncer.secret)


@app.command("check-env")
def check_env() -> None:
    """Validate the configuration; list every problem and exit non-zero if any."""
    try:
        settings = load_settings()
    except SettingsError as error:
        print(str(error), file=sys.stderr)
        raise typer.Exit(code=1) from None
    typer.echo(f"configuration ok (environment: {settings.env})")
    for name, value in _describe(settings):
        typer.echo(f"  {name} = {value}")


def _describe(settings: Settings) -> list[tuple[str, str]]:
    from pydantic import SecretStr

    from koinonia.logging import mask_text

    described = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            shown = "(set)" if value.get_secret_value() else "(empty)"
        else:
            shown = mask_text(str(value))
            if "url" in name and "@" in shown:
                # user:password@host → user:***@host
                scheme, _, rest = shown.partition("://")
                credentials, _, host = rest.rpartition("@")
                user = credentials.split(":", 1)[0]
                shown = f"{scheme}://{user}:***@{host}" if ":" in credentials else shown
        alias = type(settings).model_fields[name].alias
        described.append((alias or name.upper(), shown))
    return described


@app.command()
def api(
    host: str | None = typer.Option(None, help="Bind address (default API_HOST)"),
    port: int | None = typer.Option(None, help="Port (default API_PORT)"),
    workers: int = typer.Option(1, min=1, help="Worker processes"),
    reload: bool = typer.Option(False, help="Reload on code changes (development)"),
) -> None:
    """Serve the HTTP API."""
    settings = settings_or_exit()
    bind = host or settings.api_host
    problem = settings.loopback_problem(bind)
    if problem:  # `--host` is held to the rule API_HOST is (settings.py)
        print(f"Refusing to serve: --host {problem}", file=sys.stderr)
        raise typer.Exit(code=2)
    uvicorn.run(
        "koinonia.app:app_factory",
        factory=True,
        host=bind,
        port=port or settings.api_port,
        workers=workers,
        reload=reload,
        loop="uvloop",
        http="httptools",
        log_config=None,
        proxy_headers=True,
        forwarded_allow_ips=",".join(settings.trusted_proxies) or "127.0.0.1",
        server_header=False,
        # SIGTERM: stop accepting, let in-flight requests finish this long, then the
        # lifespan's shutdown closes the pools (docs/operations.md#shutdown).
        timeout_graceful_shutdown=max(1, round(settings.api_shutdown_seconds)),
    )


@app.command()
def worker(
    concurrency: int = typer.Option(8, min=1, help="Jobs run at once in this process"),
    queues: list[str] = typer.Option([], "--queue", help="Only these queues (default all)"),
) -> None:
    """Run background jobs: sends, webhook events, imports and periodic work."""
    settings = settings_or_exit()
    from koinonia.worker import run_worker

    asyncio.run(run_worker(settings, concurrency=concurrency, queues=queues or None))


@app.command()
def sandbox(
    host: str = typer.Option("127.0.0.1", help="Bind address"),
    port: int = typer.Option(8010, help="Port"),
) -> None:
    """Serve the local Telnyx + Stripe simulator (configured by SANDBOX_* variables)."""
    from koinonia.sandbox.server import run
    from koinonia.sandbox.state import SandboxConfig

    run(host, port, SandboxConfig.from_env())
