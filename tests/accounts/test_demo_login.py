"""The demo login printed by `koinonia seed-demo` (and so by `koinonia dev`) works."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys

import httpx

from koinonia.settings import Settings


def _seed_demo(settings: Settings) -> str:
    env = {
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "KOINONIA_ENV": "test",
        "PATH": "/usr/bin:/bin",
    }
    result = subprocess.run(
        [sys.executable, "-m", "koinonia", "seed-demo"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


async def test_the_printed_demo_credentials_log_in(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    for _ in range(2):  # created, then "already present": the same credentials
        printed = await asyncio.to_thread(_seed_demo, settings)
        match = re.search(r"log in as (\S+) / (\S+)", printed)
        assert match is not None, printed
        email, password = match.groups()
        login = await client.post("/api/v1/auth/login", json={"email": email, "password": password})
        assert login.status_code == 200, login.text
        me = await client.get(
            "/api/v1/auth/me", headers={"Authorization": f"Bearer {login.json()['access_token']}"}
        )
        assert me.status_code == 200, me.text
        assert me.json()["user"]["email"] == email


async def test_registration_still_refuses_special_use_domains(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/v1/auth/register",
        json={
            "church_name": "Local",
            "name": "Ruth",
            "email": "someone@koinonia.local",
            "password": "correct horse battery",
        },
    )
    assert response.status_code == 422, response.text
    malformed = await client.post(
        "/api/v1/auth/login", json={"email": "not an email", "password": "whatever-pass"}
    )
    assert malformed.status_code == 422, malformed.text
