"""`koinonia dev`: the whole local system in one command.

Migrates the database, seeds a demo church, and runs the sandbox (Telnyx + Stripe), a
worker and the API as child processes until interrupted: Ctrl-C (SIGINT) or SIGTERM (a
process manager, `timeout`) stops every child before it exits. A fresh Ed25519 key pair links
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


def _wait_http(
    url: str, timeout: float = 120.0, process: subprocess.Popen[bytes] | None = None
) -> bool:
    """Until `url` answers, `process` (if given) exits, or `timeout`: generous, since a
    first start on a busy machine (imports, migrations checks) can take a while, and a
    process that died is noticed at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return False
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


def _on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM arrived: stop the children as Ctrl-C does."""
    raise KeyboardInterrupt


def _stop_children(processes: list[subprocess.Popen[bytes]], within: float) -> None:
    """SIGTERM every child still running, wait for all of them until `within` seconds
    have passed, then SIGKILL the ones left."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut this short
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + within
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


RESTART_FIRST_SECONDS = 1.0
RESTART_MAX_SECONDS = 30.0
RESTART_STABLE_SECONDS = 60.0  # a worker that ran this long restarts after the first delay


class WorkerSlot:
    """One `koinonia worker` child, started again when it exits (a worker exits non-zero
    when its database stays unreachable past WORKER_DB_GRACE_SECONDS), after a backoff
    that doubles while it keeps exiting soon after starting."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.command = command
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.delay = RESTART_FIRST_SECONDS
        self.started_at = 0.0
        self.restart_at: float | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, env=self.env)  # noqa: S603
        self.started_at = time.monotonic()
        self.restart_at = None

    def tick(self) -> None:
        """Notice an exit and schedule the restart, or restart when it is due."""
        if self.process is None:
            return
        now = time.monotonic()
        if self.restart_at is None:
            code = self.process.poll()
            if code is None:
                return
            if now - self.started_at >= RESTART_STABLE_SECONDS:
                self.delay = RESTART_FIRST_SECONDS
            typer.echo(
                f"worker (pid {self.process.pid}) exited with status {code}; "
                f"restarting it in {self.delay:.0f} s",
                err=True,
            )
            self.restart_at = now + self.delay
            self.delay = min(RESTART_MAX_SECONDS, self.delay * 2)
        elif now >= self.restart_at:
            self.start()


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
    processes: list[subprocess.Popen[bytes]] = []
    worker_slots = [WorkerSlot([*koinonia, "worker"], env) for _ in range(workers)]
    api = f"http://{settings.api_host}:{settings.api_port}"
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if "sandbox" in available:
            processes.append(subprocess.Popen([*koinonia, "sandbox"], env=env))  # noqa: S603
        for slot in worker_slots:
            slot.start()
        api_process = subprocess.Popen([*koinonia, "api"], env=env)  # noqa: S603
        processes.append(api_process)
        if not _wait_http(f"{api}/livez", process=api_process):
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
        while all(p.poll() is None for p in processes):  # the API and the sandbox
            for slot in worker_slots:
                slot.tick()
            time.sleep(0.5)
        typer.echo("a process exited; stopping the others", err=True)
    except KeyboardInterrupt:
        pass
    finally:
        processes += [slot.process for slot in worker_slots if slot.process is not None]
        # Workers finish their running jobs within WORKER_SHUTDOWN_SECONDS.
        _stop_children(processes, settings.worker_shutdown_seconds + 10)
