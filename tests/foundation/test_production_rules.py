"""Production refuses every development secret (listing each), empty and malformed
secrets are refused everywhere, development secrets listen on loopback only, and a token
signed with the development JWT secret is worthless against a production app."""

from __future__ import annotations

import base64
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from koinonia.accounts.tokens import issue_access_token
from koinonia.app import create_app
from koinonia.sandbox.signing import load_telnyx_key, telnyx_headers
from koinonia.settings import Settings, SettingsError, load_settings
from tests.conftest import TELNYX_TEST_SEED, make_settings, telnyx_test_public_key
from tests.support.servers import free_port

REAL = {
    "jwt_secret": "prod-jwt-secret-" + "a" * 40,
    "member_encryption_keys": "p1:" + base64.b64encode(b"p" * 32).decode(),
    "member_encryption_active_key": "p1",
    "member_hmac_key": "prod-hmac-key-" + "b" * 40,
    "stripe_api_key": "sk_live_0123456789",
    "stripe_webhook_secrets": "whsec_live_0123456789",
    "telnyx_api_key": "KEY0123456789",
}


def _production(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "KOINONIA_ENV": "production",
        **REAL,
        "telnyx_public_key": telnyx_test_public_key(),
    }
    values.update(overrides)
    return load_settings(**values)


def test_production_with_real_secrets_loads() -> None:
    assert _production().env == "production"


def test_production_lists_every_development_secret() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(KOINONIA_ENV="production")
    message = str(caught.value)
    assert "7 problem(s)" in message
    for name in (
        "JWT_SECRET",
        "MEMBER_ENCRYPTION_KEYS",
        "MEMBER_HMAC_KEY",
        "STRIPE_API_KEY",
        "STRIPE_WEBHOOK_SECRETS",
        "TELNYX_API_KEY",
        "TELNYX_PUBLIC_KEY",
    ):
        assert f"  - {name}: " in message, name


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("stripe_webhook_secrets", "whsec_sandbox"),
        ("stripe_webhook_secrets", "whsec_live_0123456789,whsec_sandbox"),  # while rolling
        ("stripe_api_key", "sk_test_sandbox"),
        ("telnyx_api_key", "KEY_sandbox"),
        ("jwt_secret", "dev-only-jwt-secret-change-me-0123456789"),
    ],
)
def test_production_refuses_each_sandbox_secret(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        _production(**{name: value})
    assert "1 problem(s)" in str(caught.value)
    assert name.upper() in str(caught.value)
    assert value not in str(caught.value).replace("whsec_sandbox is refused", "")


@pytest.mark.parametrize("env", ["development", "test", "production"])
@pytest.mark.parametrize("secrets", ["whsec_a,", ",whsec_a", "whsec_a,,whsec_b", "whsec_a, "])
def test_an_empty_webhook_secret_is_refused_everywhere(env: str, secrets: str) -> None:
    overrides: dict[str, Any] = {"stripe_webhook_secrets": secrets}
    with pytest.raises(SettingsError, match=r"STRIPE_WEBHOOK_SECRETS: entry .* is empty"):
        if env == "production":
            _production(**overrides)
        else:
            load_settings(KOINONIA_ENV=env, **overrides)


@pytest.mark.parametrize("env", ["development", "test", "production"])
@pytest.mark.parametrize(
    "key",
    [
        "not-base64!!",
        base64.b64encode(b"x" * 31).decode(),
        base64.b64encode(b"x" * 33).decode(),
        "{valid},",
        "{valid},garbage",
    ],
)
def test_a_malformed_telnyx_public_key_is_refused_everywhere(env: str, key: str) -> None:
    key = key.replace("{valid}", telnyx_test_public_key())
    with pytest.raises(SettingsError) as caught:
        if env == "production":
            _production(telnyx_public_key=key)
        else:
            load_settings(KOINONIA_ENV=env, telnyx_public_key=key)
    assert "TELNYX_PUBLIC_KEY: entry" in str(caught.value)
    assert "garbage" not in str(caught.value) and "not-base64" not in str(caught.value)


def test_two_public_keys_while_rotating_are_accepted() -> None:
    other = base64.b64encode(bytes(32)).decode()  # any 32 bytes is a valid encoding here
    assert load_settings(telnyx_public_key=f"{telnyx_test_public_key()}, {other}")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.org"])  # noqa: S104
def test_development_secrets_listen_on_loopback_only(host: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(api_host=host)
    assert "API_HOST must be a loopback address" in str(caught.value)
    assert "JWT_SECRET" in str(caught.value)
    # Real secrets may listen anywhere.
    assert _production(api_host=host).api_host == host


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_hosts_are_fine_with_development_secrets(host: str) -> None:
    assert load_settings(api_host=host).api_host == host


def _cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "koinonia", *args],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **env},
        timeout=timeout,
        check=False,
        cwd="/",
    )


def test_check_env_prints_the_same_list_as_start_up() -> None:
    env = {"KOINONIA_ENV": "production", "STRIPE_WEBHOOK_SECRETS": "whsec_sandbox,"}
    checked = _cli("check-env", env=env)
    started = _cli("api", env=env)
    assert checked.returncode == 1 and started.returncode == 2
    assert checked.stderr.strip() == started.stderr.strip()
    assert "STRIPE_WEBHOOK_SECRETS: entry 2 is empty" in checked.stderr
    for name in ("JWT_SECRET", "STRIPE_API_KEY", "TELNYX_API_KEY", "TELNYX_PUBLIC_KEY"):
        assert f"  - {name}: " in checked.stderr
    assert "whsec_sandbox," not in checked.stderr


def test_api_refuses_a_public_host_override_with_development_secrets() -> None:
    port = str(free_port())
    result = _cli("api", "--host", "0.0.0.0", env={"API_PORT": port}, timeout=30)  # noqa: S104
    assert result.returncode == 2
    assert "Refusing to serve: --host must be a loopback address" in result.stderr


@pytest.fixture
async def production_app(settings: Settings) -> Any:
    """The app in production mode (real secrets) on the test database and Redis."""
    production = _production(
        database_url=settings.database_url,
        redis_url=settings.redis_url,
        stripe_base_url=str(settings.stripe_base_url),
        telnyx_base_url=str(settings.telnyx_base_url),
        database_pool_size=2,
        database_max_overflow=2,
        health_check_timeout=0.2,
    )
    application = create_app(production)
    async with application.router.lifespan_context(application):
        yield application


async def test_a_development_signed_operator_token_is_refused_in_production(
    production_app: FastAPI, tenant_factory: Any
) -> None:
    operator = await tenant_factory(is_operator=True)
    claims = {"user_id": operator.user_id, "church_id": operator.church_id, "role": "owner"}
    forged = issue_access_token(make_settings(), is_operator=True, **claims)
    genuine = issue_access_token(production_app.state.settings, is_operator=True, **claims)
    transport = httpx.ASGITransport(app=production_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        refused = await http.get("/api/v1/admin/dlq", headers={"Authorization": f"Bearer {forged}"})
        accepted = await http.get(
            "/api/v1/admin/dlq", headers={"Authorization": f"Bearer {genuine}"}
        )
    assert refused.status_code == 401, refused.text
    assert accepted.status_code == 200, accepted.text


async def test_a_malformed_key_that_slipped_through_never_500s(
    settings: Settings, redis: Any
) -> None:
    # Settings refuse it; an app handed one anyway (model_copy skips validation) answers
    # 401 to every event instead of crashing, and so does a timestamp too big for a float.
    application = create_app(settings.model_copy(update={"telnyx_public_key": "abc"}))
    body = b'{"data": {"id": "e-bad-key", "event_type": "message.sent"}}'
    headers = telnyx_headers(load_telnyx_key(TELNYX_TEST_SEED), body, int(time.time()))
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            answer = await http.post("/api/v1/webhooks/telnyx", content=body, headers=headers)
            huge = await http.post(
                "/api/v1/webhooks/telnyx",
                content=body,
                headers=headers | {"telnyx-timestamp": "9" * 400},
            )
    assert answer.status_code == 401 and answer.json()["code"] == "invalid_signature"
    assert huge.status_code == 401
