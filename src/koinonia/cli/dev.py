"""`koinonia dev`: the whole local system in one command.

Migrates the database, seeds a demo church, and runs the sandbox (Telnyx + Stripe), a
worker and the API as child processes until interrupted. A fresh Ed25519 key pair links
the sandbox (which signs webhooks) to the API (which verifies them).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import typer

from koinonia.cli.common import settings_or_exit
from koinonia.cli.database import alembic_config, ensure_database

DEV_KEY_FILE = Path("var/dev-telnyx-key")


def _dev_keypair() -> tuple[str, str]:
    """(private seed b64, public key b64), kept in var/ so restarts keep working."""
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if DEV_KEY_FILE.exists():
        seed = base64.b64decode(DEV_KEY_FILE.read_text().strip())
        key = Ed25519PrivateKey.from_private_bytes(seed)
    else:
        key = Ed25519PrivateKey.generate()
        seed = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        DEV_KEY_FILE.parent.mkdir(parents=True, exist_ok=True)
        DEV_KEY_FILE.write_text(base64.b64encode(seed).decode())
        DEV_KEY_FILE.chmod(0o600)
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return base64.b64encode(seed).decode(), base64.b64encode(public).decode()


def _commands() -> set[str]:
    from typer.main import get_command

    from koinonia.cli.main import app

    return set(get_command(app).commands)  # type: ignore[attr-defined]


def _wait_http(url: str, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


def dev(
    workers: int = typer.Option(1, min=1, help="Worker processes"),
    seed: bool = typer.Option(True, help="Create the demo church if it is missing"),
) -> None:
    """Run API + worker + sandbox on the local PostgreSQL and Redis (Ctrl-C stops all)."""
    from alembic import command

    settings = settings_or_exit()
    if ensure_database(settings.database_url):
        typer.echo("created database")
    command.upgrade(alembic_config(settings.database_url), "heads")
    typer.echo("database migrated")

    private_key, public_key = _dev_keypair()
    env = dict(os.environ)
    env.setdefault("TELNYX_PUBLIC_KEY", public_key)
    env.setdefault("SANDBOX_TELNYX_PRIVATE_KEY", private_key)
    env.setdefault("SANDBOX_TELNYX_API_KEY", settings.telnyx_api_key.get_secret_value())
    env.setdefault("SANDBOX_STRIPE_API_KEY", settings.stripe_api_key.get_secret_value())
    env.setdefault(
        "SANDBOX_STRIPE_WEBHOOK_SECRET",
        settings.stripe_webhook_secrets.get_secret_value().split(",")[0],
    )
    base = str(settings.public_base_url).rstrip("/")
    env.setdefault("SANDBOX_TELNYX_WEBHOOK_URL", f"{base}/api/v1/webhooks/telnyx")
    env.setdefault("SANDBOX_STRIPE_WEBHOOK_URL", f"{base}/api/v1/webhooks/stripe")

    koinonia = [sys.executable, "-m", "koinonia"]
    available = _commands()
    processes = []
    if "sandbox" in available:
        processes.append(subprocess.Popen([*koinonia, "sandbox"], env=env))  # noqa: S603
    processes += [
        subprocess.Popen([*koinonia, "worker"], env=env)  # noqa: S603
        for _ in range(workers)
    ]
    processes.append(subprocess.Popen([*koinonia, "api"], env=env))  # noqa: S603
    api = f"http://{settings.api_host}:{settings.api_port}"
    try:
        if not _wait_http(f"{api}/livez"):
            typer.echo("the API did not start; see the log above", err=True)
            raise typer.Exit(1)
        if seed and "seed-demo" in available:
            subprocess.run([*koinonia, "seed-demo"], env=env, check=False)  # noqa: S603
        typer.echo(
            f"\nKoinonia is running:\n"
            f"  API docs     {api}/api/docs\n"
            f"  health       {api}/api/v1/health\n"
            f"  metrics      {api}/metrics\n"
            f"  sandbox      http://127.0.0.1:8010/sandbox/messages\n"
            "Press Ctrl-C to stop.\n"
        )
        while all(p.poll() is None for p in processes):
            time.sleep(0.5)
        typer.echo("a process exited; stopping the others", err=True)
    except KeyboardInterrupt:
        pass
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
