from __future__ import annotations

import subprocess
import sys

import pytest

from koinonia.settings import SettingsError, load_settings


def test_defaults_load_and_pin_the_psycopg_driver() -> None:
    settings = load_settings(database_url="postgresql://u@db.example:5432/app")
    assert settings.database_url == "postgresql+psycopg://u@db.example:5432/app"


def test_every_problem_is_listed_in_one_message() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(database_url="mysql://x", redis_url="nope", jwt_secret="short", api_port=0)
    message = str(caught.value)
    assert "4 problem(s)" in message
    for name in ("DATABASE_URL", "REDIS_URL", "JWT_SECRET", "API_PORT"):
        assert name in message


def test_secrets_are_never_echoed() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(jwt_secret="tiny-secret-value", member_encryption_keys="k1:not-base64!!")
    assert "tiny-secret-value" not in str(caught.value)
    assert "not-base64" not in str(caught.value)


def test_production_refuses_development_secrets() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(KOINONIA_ENV="production")
    assert "JWT_SECRET: must be set to a real secret in production" in str(caught.value)


def test_wildcard_origin_with_credentials_is_refused() -> None:
    with pytest.raises(SettingsError, match="CORS_ALLOW_ORIGINS"):
        load_settings(cors_allow_origins="*", cors_allow_credentials=True)


def test_encryption_key_must_be_in_the_keyring() -> None:
    with pytest.raises(SettingsError, match="MEMBER_ENCRYPTION_ACTIVE_KEY"):
        load_settings(member_encryption_active_key="k9")


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "koinonia", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
        cwd="/",
    )


def test_check_env_exits_non_zero_naming_the_bad_database_url() -> None:
    env = {"PATH": "/usr/bin:/bin", "DATABASE_URL": "mysql://root:pw@x/db", "JWT_SECRET": "x"}
    result = _cli("check-env", env=env)
    assert result.returncode == 1
    assert "DATABASE_URL" in result.stderr
    assert "JWT_SECRET" in result.stderr
    assert "pw" not in result.stderr


def test_api_refuses_to_start_with_a_bad_database_url() -> None:
    result = _cli("api", env={"PATH": "/usr/bin:/bin", "DATABASE_URL": "not-a-url"})
    assert result.returncode == 2
    assert "DATABASE_URL" in result.stderr


def test_check_env_passes_and_hides_secrets() -> None:
    result = _cli(
        "check-env",
        env={"PATH": "/usr/bin:/bin", "JWT_SECRET": "a-very-long-secret-value-0123456789abcdef"},
    )
    assert result.returncode == 0, result.stderr
    assert "a-very-long-secret" not in result.stdout
    assert "JWT_SECRET = (set)" in result.stdout
