"""`scripts/contract-test`: schemathesis against the running API.

Starts `koinonia sandbox` and `koinonia api` on free loopback ports against a scratch
database migrated by `koinonia migrate` (loopback in `RATE_LIMIT_ALLOWLIST`), registers a
dedicated owner (made a platform operator, with an assigned sending number, so the admin
and sending routes can answer 2xx) and a staff user for the MFA code operations, seeds a
dead letter and a sending pause for the operator routes, then runs every phase
(examples, coverage, fuzzing, stateful) with a fixed seed and bounded examples. It fails
on any 5xx, any answer outside the schema, any operation that never answered a 2xx
(except `EXEMPT_FROM_2XX`, with the reason), or a run longer than `BUDGET_SECONDS`.
Everything it started is stopped and the database dropped, whatever the outcome.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"
ADMIN_URL = os.environ.get(
    "TEST_DATABASE_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("CONTRACT_REDIS_URL", "redis://127.0.0.1:6379/11")
SEED = int(os.environ.get("CONTRACT_SEED", "20260601"))
BUDGET_SECONDS = 120  # the whole run, start-up and teardown included
PASSWORD = "contract-fuzzing-password"
CHECKS = ",".join(
    (
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
    )
)
# Signed provider webhooks: a fuzzer cannot sign, every case would be a 401; their
# signatures, replays and malformed events have their own tests (tests/billing,
# tests/messaging/test_webhooks.py).
EXCLUDED_TAGS = ("webhooks",)
# Operations that cannot answer 2xx to a fuzzer, and why (they are still fuzzed).
EXEMPT_FROM_2XX = {
    "POST /api/v1/auth/mfa/confirm": "needs a TOTP code from the secret just enrolled",
    "POST /api/v1/auth/mfa/verify": "needs an MFA login challenge and a TOTP code",
    "POST /api/v1/auth/mfa/disable": "MFA is never on (turning it on needs a TOTP code)",
    "POST /api/v1/auth/mfa/recovery-codes": "needs MFA on and a TOTP code",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log(message: str) -> None:
    print(f"contract-test: {message}", flush=True)  # noqa: T201


@contextlib.contextmanager
def scratch_database() -> Iterator[str]:
    name = f"koinonia_contract_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@contextlib.contextmanager
def process(
    args: list[str], env: dict[str, str], logfile: Path
) -> Iterator[subprocess.Popen[bytes]]:
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_ready(url: str, proc: subprocess.Popen[bytes], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {seconds} s")


def environment(database: str, api_port: int, sandbox_port: int) -> dict[str, str]:
    from koinonia.sandbox.signing import load_telnyx_key, public_key_b64

    telnyx_seed = base64.b64encode(bytes(range(32))).decode()
    api = f"http://127.0.0.1:{api_port}"
    sandbox = f"http://127.0.0.1:{sandbox_port}"
    return os.environ | {
        "KOINONIA_ENV": "test",
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:5432/{database}",
        "REDIS_URL": REDIS_URL,
        "API_HOST": "127.0.0.1",
        "PUBLIC_BASE_URL": api,
        "TELNYX_BASE_URL": sandbox,
        "STRIPE_BASE_URL": sandbox,
        "TELNYX_PUBLIC_KEY": public_key_b64(load_telnyx_key(telnyx_seed)),
        "RATE_LIMIT_ALLOWLIST": "127.0.0.1/32,::1/128",
        "LOG_LEVEL": "WARNING",
        "SANDBOX_TELNYX_PRIVATE_KEY": telnyx_seed,
        "SANDBOX_TELNYX_WEBHOOK_URL": f"{api}/api/v1/webhooks/telnyx",
        "SANDBOX_STRIPE_WEBHOOK_URL": f"{api}/api/v1/webhooks/stripe",
        "SANDBOX_PUBLIC_BASE_URL": sandbox,
        "SANDBOX_SEED": str(SEED),
    }


def prepare(api: str, database: str) -> dict[str, str]:
    """The dedicated owner (an operator with a sending number), the MFA user, seed rows."""
    with httpx.Client(base_url=api, timeout=30) as client:
        email = f"contract-owner-{uuid.uuid4().hex[:8]}@example.org"
        registered = client.post(
            "/api/v1/auth/register",
            json={
                "church_name": "Contract Church",
                "name": "Contract Owner",
                "email": email,
                "password": PASSWORD,
            },
        )
        registered.raise_for_status()
        owner = registered.json()
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{database}") as db:
            db.execute("UPDATE users SET is_operator = true WHERE id = %s", (owner["user"]["id"],))
            db.execute(
                "UPDATE churches SET phone_number = '+12025550142', number_status = 'assigned'"
                " WHERE id = %s",
                (owner["church"]["id"],),
            )
            # Replayable dead letters: Telnyx events that "failed to apply".
            for n in range(3):
                event = db.execute(
                    "INSERT INTO webhook_events (provider, event_id, event_type, payload,"
                    " processed_at) VALUES ('telnyx', %s, 'message.finalized', '{}'::jsonb,"
                    " now()) RETURNING id",
                    (f"contract-seed-{n}",),
                ).fetchone()
                assert event is not None
                db.execute(
                    "INSERT INTO dead_letters (kind, church_id, payload, last_error, attempts)"
                    " VALUES ('webhook.telnyx', %s, %s, 'contract seed', 1)",
                    (owner["church"]["id"], Jsonb({"webhook_event_id": event[0]})),
                )
            db.execute(
                "INSERT INTO sender_pauses (scope, key, reason, next_probe_at)"
                " VALUES ('account', 'telnyx', 'contract seed', now() + interval '1 day')"
            )
        login = client.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD})
        login.raise_for_status()  # a token that carries the operator flag
        headers = {"Authorization": f"Bearer {login.json()['access_token']}"}
        # A member and a scheduled broadcast to them: real ids for the bodies that need
        # existing members (hooks.py) and a message that can still be cancelled.
        member = client.post(
            "/api/v1/members",
            json={"first_name": "Contract", "phone": "+14155550199"},
            headers=headers,
        )
        member.raise_for_status()
        client.post(
            "/api/v1/messages",
            json={
                "body": "Choir at 7",
                "member_ids": [member.json()["id"]],
                "scheduled_at": (datetime.now(UTC) + timedelta(days=1)).isoformat(),
            },
            headers=headers,
        ).raise_for_status()
        mfa_email = f"contract-mfa-{uuid.uuid4().hex[:8]}@example.org"
        client.post(
            "/api/v1/users",
            json={"email": mfa_email, "name": "MFA Fuzz", "role": "staff", "password": PASSWORD},
            headers=headers,
        ).raise_for_status()
        mfa_login = client.post(
            "/api/v1/auth/login", json={"email": mfa_email, "password": PASSWORD}
        )
        mfa_login.raise_for_status()
    return {
        "CONTRACT_API_URL": api,
        "CONTRACT_OWNER_ID": owner["user"]["id"],
        "CONTRACT_MEMBER_ID": member.json()["id"],
        "CONTRACT_OWNER_EMAIL": email,
        "CONTRACT_OWNER_PASSWORD": PASSWORD,
        "CONTRACT_OWNER_REFRESH_TOKEN": login.json()["refresh_token"],
        "CONTRACT_MFA_USER_EMAIL": mfa_email,
        "CONTRACT_MFA_USER_PASSWORD": PASSWORD,
        "CONTRACT_MFA_USER_REFRESH_TOKEN": mfa_login.json()["refresh_token"],
    }


def operations(spec: dict[str, Any]) -> list[str]:
    found = []
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            if not set(operation.get("tags", ())) & set(EXCLUDED_TAGS):
                found.append(f"{method.upper()} {path}")
    return found


def without_2xx(spec: dict[str, Any], calls: Path) -> tuple[list[str], int]:
    statuses: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    auth_fetches = 0
    for line in calls.read_text().splitlines():
        parts = line.split()
        if parts[0] == "AUTH":
            auth_fetches += 1
            continue
        statuses[f"{parts[0]} {parts[1]}"][int(parts[2])] += 1
    missing = [
        f"{op} (answers: {dict(statuses[op]) or 'none'})"
        for op in operations(spec)
        if op not in EXEMPT_FROM_2XX and not any(200 <= s < 300 for s in statuses[op])
    ]
    return missing, auth_fetches


def main() -> int:
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="koinonia-contract-"))
    api_port, sandbox_port = free_port(), free_port()
    api = f"http://127.0.0.1:{api_port}"
    with scratch_database() as database:
        env = environment(database, api_port, sandbox_port)
        koinonia = str(VENV_BIN / "koinonia")
        subprocess.run(
            [koinonia, "migrate"], env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL
        )
        import redis

        redis.Redis.from_url(REDIS_URL).flushdb()
        with (
            process(
                [koinonia, "sandbox", "--port", str(sandbox_port)], env, workdir / "sandbox.log"
            ),
            process([koinonia, "api", "--port", str(api_port)], env, workdir / "api.log") as server,
        ):
            wait_ready(f"{api}/readyz", server)
            accounts = prepare(api, database)
            spec = httpx.get(f"{api}/api/openapi.json", timeout=10).json()
            calls = workdir / "calls.log"
            calls.touch()
            command = [
                str(VENV_BIN / "schemathesis"),
                "--config-file",
                str(Path(__file__).with_name("schemathesis.toml")),
                "run",
                f"{api}/api/openapi.json",
                "--url",
                api,
                "--phases",
                "examples,coverage,fuzzing,stateful",
                "--checks",
                CHECKS,
                "--seed",
                str(SEED),
                "--workers",
                "1",
                "--request-timeout",
                "10",
                "--generation-database",
                "none",
                *(arg for tag in EXCLUDED_TAGS for arg in ("--exclude-tag", tag)),
                "--no-color",
            ]
            remaining = BUDGET_SECONDS - (time.monotonic() - started) - 5
            log(
                f"schemathesis (seed {SEED}, examples bounded in schemathesis.toml, "
                f"{remaining:.0f} s left of {BUDGET_SECONDS} s)"
            )
            try:
                result = subprocess.run(
                    command,
                    env=env
                    | accounts
                    | {
                        "SCHEMATHESIS_HOOKS": "tests.contract.hooks",
                        "CONTRACT_CALLS": str(calls),
                        "PYTHONPATH": str(ROOT),
                    },
                    cwd=ROOT,
                    timeout=remaining,
                    check=False,
                )
                code = result.returncode
            except subprocess.TimeoutExpired:
                log(f"FAILED: over the {BUDGET_SECONDS} s budget")
                code = 1
            missing, auth_fetches = without_2xx(spec, calls)
    elapsed = time.monotonic() - started
    log(f"{auth_fetches} token fetches (owner and MFA user); api log: {workdir / 'api.log'}")
    for op, reason in EXEMPT_FROM_2XX.items():
        log(f"not required to answer 2xx: {op} — {reason}")
    if missing:
        log("FAILED: operations that never answered 2xx:\n  " + "\n  ".join(missing))
        code = code or 1
    if code == 0:
        log(f"passed in {elapsed:.0f} s")
    else:
        log(f"failed in {elapsed:.0f} s (schemathesis exit {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
