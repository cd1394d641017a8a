"""One typed settings object, read from the environment and `.env`.

Every variable is documented in `.env.example`. A missing or malformed value stops the
process with one message listing every problem (`SettingsError`), and secrets are never
part of that message.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from functools import lru_cache
from typing import Annotated, Literal

from pydantic import (
    AnyHttpUrl,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Environment = Literal["development", "test", "production"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]

_DB_SCHEMES = ("postgresql", "postgresql+psycopg", "postgres")
# Development-only defaults: refused when KOINONIA_ENV=production.
_DEV_JWT_SECRET = "dev-only-jwt-secret-change-me-0123456789"  # noqa: S105
_DEV_MEMBER_KEYS = "k1:ZGV2LW9ubHktbWVtYmVyLWtleS0zMi1ieXRlcy0hISE="
_DEV_HMAC_KEY = "dev-only-member-hmac-key-change-me-0123"
_DEV_SECRETS = {_DEV_JWT_SECRET, _DEV_MEMBER_KEYS, _DEV_HMAC_KEY}
# The sandbox's credentials (the defaults): refused in production as well.
_SANDBOX_STRIPE_API_KEY = "sk_test_sandbox"
_SANDBOX_STRIPE_WEBHOOK_SECRET = "whsec_sandbox"  # noqa: S105
_SANDBOX_TELNYX_API_KEY = "KEY_sandbox"
_LOOPBACK_HOSTS = {"localhost", "::1"}


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: an address nothing off this machine can reach."""
    host = host.strip().strip("[]").lower()
    if host in _LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _secret_entries(value: str) -> list[str]:
    """The entries of a comma-separated list of secrets, as they will be used."""
    return [entry.strip() for entry in value.split(",")]


def _check_public_keys(value: str) -> None:
    """Each entry base64 of a 32-byte Ed25519 public key (raises ValueError, never echoing)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    for position, entry in enumerate(_secret_entries(value), start=1):
        if not entry:
            raise ValueError(f"entry {position} is empty (a stray comma?)")
        try:
            raw = base64.b64decode(entry, validate=True)
            if len(raw) != 32:
                raise ValueError
            Ed25519PublicKey.from_public_bytes(raw)
        except ValueError:
            raise ValueError(
                f"entry {position} is not the base64 of a 32-byte Ed25519 public key"
            ) from None


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _normalise_database_url(value: str, name: str) -> str:
    """Accept plain `postgresql://` URLs and pin the psycopg 3 async driver."""
    match = re.match(r"^(?P<scheme>[a-z0-9+]+)://(?P<rest>.+)$", value.strip())
    if match is None or match["scheme"] not in _DB_SCHEMES:
        raise ValueError(f"{name} must be a postgresql:// URL (got scheme other than postgresql)")
    rest = match["rest"]
    host_part = rest.split("@", 1)[-1]
    if not host_part or host_part.startswith("/") or "/" not in host_part:
        raise ValueError(f"{name} must name a host and a database: postgresql://user@host:port/db")
    host_port = host_part.split("/", 1)[0]
    if ":" in host_port:
        port = host_port.rsplit(":", 1)[1]
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{name} has an invalid port")
    return f"postgresql+psycopg://{rest}"


def parse_rate_overrides(value: str) -> dict[str, float]:
    rates: dict[str, float] = {}
    for entry in filter(None, (e.strip() for e in value.split(","))):
        number, sep, rate = entry.rpartition(":")
        if not sep or not re.fullmatch(r"\+[1-9][0-9]{7,14}", number):
            raise ValueError(f"expected +E164:rate entries, got {entry[:40]!r}")
        try:
            per_second = float(rate)
        except ValueError:
            raise ValueError(f"not a rate: {rate[:20]!r}") from None
        if not per_second > 0:
            raise ValueError("rates must be above 0")
        rates[number] = per_second
    return rates


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        validate_default=True,
        env_ignore_empty=True,
    )

    env: Environment = Field("development", alias="KOINONIA_ENV")

    # --- HTTP -----------------------------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=1, le=65535)
    public_base_url: AnyHttpUrl = AnyHttpUrl("http://127.0.0.1:8000")
    cors_allow_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["http://localhost:3000"]
    )
    cors_allow_credentials: bool = True
    cors_max_age: int = Field(600, ge=0, le=86400)
    max_json_body_bytes: int = Field(100_000, gt=0)
    max_import_bytes: int = Field(20 * 1024 * 1024, gt=0)
    import_inline_max_bytes: int = Field(256 * 1024, ge=0)
    max_url_length: int = Field(8192, ge=256)
    gzip_minimum_size: int = Field(1024, ge=0)
    gzip_level: int = Field(6, ge=1, le=9)
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # --- Database -------------------------------------------------------------------
    database_url: str = "postgresql://postgres@127.0.0.1:5432/koinonia"
    database_replica_urls: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # PostgreSQL itself, for what must not go through PgBouncer in transaction mode: the
    # worker's job queue (its pool and LISTEN, which is session state) and the Telnyx
    # webhook writer. Empty: DATABASE_URL (read it as `direct_database_url`).
    database_direct_url: str = ""
    # PgBouncer's admin console as a stats user (postgresql://pgbouncer_stats:…@host:6432/
    # pgbouncer): the API's /metrics then carries its pools and totals. Empty: not read.
    pgbouncer_admin_url: str = ""
    database_pool_size: int = Field(10, ge=1, le=200)
    database_max_overflow: int = Field(10, ge=0, le=200)
    database_pool_timeout: float = Field(5.0, gt=0)
    database_connect_timeout: float = Field(5.0, gt=0)
    database_use_null_pool: bool = False
    # A read engine's pooled connection idle this long is pinged before use
    # (koinonia.db._ping_after_idle; the write engine pings on every checkout).
    database_ping_after_idle_seconds: float = Field(2.0, ge=0)
    slow_query_ms: int = Field(100, ge=1)
    replica_max_lag_seconds: float = Field(5.0, gt=0)
    read_your_writes_seconds: float = Field(5.0, ge=0)

    # --- Redis ----------------------------------------------------------------------
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_timeout: float = Field(0.5, gt=0)

    # --- Logging and telemetry ------------------------------------------------------
    log_level: LogLevel = "INFO"
    log_file: str | None = None
    log_file_backup_count: int = Field(30, ge=1)
    otel_exporter_otlp_endpoint: AnyHttpUrl | None = None
    otel_service_name: str = "koinonia"
    # The worker's own /metrics (docs/operations.md#worker-metrics): an address and the
    # first port to try (the next 15 are tried when taken, for several workers on one
    # host); port 0 serves no metrics.
    worker_metrics_host: str = "127.0.0.1"
    worker_metrics_port: int = Field(9410, ge=0, le=65535)
    health_check_timeout: float = Field(1.0, gt=0)
    # Providers (Telnyx, Stripe) are checked in the background this often, per process;
    # health probes serve the last result and never call a provider themselves.
    provider_health_interval_seconds: float = Field(20.0, ge=1, le=300)

    # --- Auth -----------------------------------------------------------------------
    jwt_secret: SecretStr = SecretStr(_DEV_JWT_SECRET)
    access_token_ttl_seconds: int = Field(900, ge=60, le=86400)
    refresh_token_ttl_seconds: int = Field(30 * 86400, ge=3600)
    rate_limit_per_minute: int = Field(100, ge=1)
    rate_limit_burst: int = Field(200, ge=1)
    rate_limit_login_per_minute: int = Field(10, ge=1)
    rate_limit_refresh_per_minute: int = Field(30, ge=1)
    rate_limit_auth_failures_per_minute: int = Field(20, ge=1)
    rate_limit_allowlist: Annotated[list[str], NoDecode] = Field(default_factory=list)
    login_lockout_failures: int = Field(5, ge=1)
    login_lockout_seconds: int = Field(900, ge=1)

    # --- Member data encryption -----------------------------------------------------
    # "k1:<base64 32 bytes>,k2:<base64 32 bytes>"; the active id names the key new writes use.
    member_encryption_keys: SecretStr = SecretStr(_DEV_MEMBER_KEYS)
    member_encryption_active_key: str = "k1"
    member_hmac_key: SecretStr = SecretStr(_DEV_HMAC_KEY)

    # --- Telnyx ---------------------------------------------------------------------
    telnyx_base_url: AnyHttpUrl = AnyHttpUrl("http://127.0.0.1:8010")
    telnyx_api_key: SecretStr = SecretStr("KEY_sandbox")
    telnyx_public_key: str = ""
    telnyx_timeout: float = Field(10.0, gt=0)
    telnyx_messaging_profile_id: str | None = None
    sends_per_second_per_number: float = Field(50.0, gt=0)
    # Telnyx limits the whole account (50 SMS/s by default) across every church.
    telnyx_account_sends_per_second: float = Field(50.0, gt=0)
    # Per-number rates from the number's type or 10DLC campaign: "+12025550100:4,…".
    send_rate_overrides: str = ""
    # An in-doubt or `sent` row without a final receipt is looked up after this long; a
    # row still without a final state this long after sending settles as `unconfirmed`.
    send_settle_after_seconds: float = Field(3600.0, gt=0)
    send_unconfirmed_after_seconds: float = Field(86400.0, gt=0)
    # A broadcast with work left and no progress for this long is counted and logged.
    broadcast_stall_seconds: float = Field(600.0, gt=0)
    send_concurrency: int = Field(64, ge=1, le=1024)
    telnyx_max_retries: int = Field(3, ge=0, le=10)
    # Recipients per dispatch job (DESIGN: at most 1,000).
    dispatch_batch_size: int = Field(1000, ge=1, le=1000)
    # A dispatch job gives its worker slot back after this long and continues later, so
    # one church's big broadcast cannot hold a slot that another church's needs.
    send_time_slice_seconds: float = Field(2.0, gt=0)
    # How often an idle worker slot looks for jobs besides NOTIFY wake-ups. A slice's
    # continuation is deferred while the slice still holds its church's lock, so the
    # NOTIFY finds it locked; it starts at the next poll (procrastinate's default is 5 s).
    worker_poll_seconds: float = Field(0.25, gt=0, le=30)
    # A worker whose database stays unreachable this long exits non-zero (its supervisor
    # restarts it) instead of idling; shorter outages are ridden out by reconnecting.
    worker_db_grace_seconds: float = Field(120.0, gt=0)
    # An ambiguous send (timeout or 5xx after the request left) is settled by its receipt;
    # with no receipt after this long it was not accepted and is sent again.
    send_reconcile_after_seconds: float = Field(300.0, gt=0)
    # A recipient claimed by a worker that stopped answering (killed) is ambiguous after this.
    send_lease_seconds: float = Field(120.0, gt=0)
    webhook_apply_batch_size: int = Field(500, ge=1, le=5000)

    # --- Stripe ---------------------------------------------------------------------
    stripe_base_url: AnyHttpUrl = AnyHttpUrl("http://127.0.0.1:8010")
    stripe_api_key: SecretStr = SecretStr("sk_test_sandbox")
    stripe_webhook_secrets: SecretStr = SecretStr("whsec_sandbox")
    stripe_timeout: float = Field(10.0, gt=0)
    stripe_webhook_tolerance_seconds: int = Field(300, ge=1)
    # "id:stripe price id:monthly cents:included segments", comma-separated.
    billing_plans: str = "starter:price_starter:2900:2000,growth:price_growth:7900:10000"
    trial_segments: int = Field(250, ge=0)
    trial_days: int = Field(14, ge=0)

    # --- Operations -----------------------------------------------------------------
    dlq_alert_threshold: int = Field(100, ge=1)
    dlq_retention_days: int = Field(30, ge=1)
    partition_months_ahead: int = Field(3, ge=3, le=24)

    # --- Retention, database timeouts, shutdown (docs/operations.md) ----------------
    job_retention_days: int = Field(14, ge=1)
    webhook_event_retention_days: int = Field(90, ge=1)
    partition_retention_months: int = Field(24, ge=2, le=240)
    retention_batch_size: int = Field(5000, ge=100, le=100_000)
    # 0 turns a timeout off. `koinonia migrate` makes them the database's defaults (ALTER
    # DATABASE … SET), which hold on every connection, PgBouncer's included, at no cost per
    # request; DATABASE_TIMEOUTS_PER_TRANSACTION=true also sets them per transaction (one
    # round trip each) where the database's defaults cannot be altered.
    database_statement_timeout_ms: int = Field(30_000, ge=0)
    database_lock_timeout_ms: int = Field(5_000, ge=0)
    database_idle_in_transaction_timeout_ms: int = Field(60_000, ge=0)
    database_timeouts_per_transaction: bool = False
    api_shutdown_seconds: float = Field(20.0, gt=0, le=600)
    worker_shutdown_seconds: float = Field(30.0, gt=0, le=3600)

    # --- Backups: pgBackRest to S3-compatible storage (docs/backups.md) -------------
    backup_stanza: str = Field("koinonia", pattern=r"^[A-Za-z0-9_-]+$")
    backup_config_path: str = "/etc/pgbackrest/pgbackrest.conf"
    backup_os_user: str = "postgres"
    backup_pg_bin: str = "/usr/lib/postgresql/15/bin"
    backup_pg_data: str = "/var/lib/postgresql/15/main"
    backup_pg_port: int = Field(5432, ge=1, le=65535)
    backup_pg_socket_dir: str = "/var/run/postgresql"
    backup_s3_endpoint: str = "s3.us-east-1.amazonaws.com"
    backup_s3_port: int = Field(443, ge=1, le=65535)
    backup_s3_region: str = "us-east-1"
    backup_s3_bucket: str = ""
    backup_s3_path: str = Field("/koinonia", pattern=r"^/")
    backup_s3_uri_style: Literal["host", "path"] = "host"
    backup_s3_ca_file: str = ""
    backup_s3_key: SecretStr = SecretStr("")
    backup_s3_key_secret: SecretStr = SecretStr("")
    backup_cipher_pass: SecretStr = SecretStr("")
    backup_retention_days: int = Field(30, ge=1, le=3650)
    backup_archive_timeout_seconds: int = Field(60, ge=1, le=3600)
    backup_info_refresh_seconds: float = Field(60.0, gt=0)

    @field_validator(
        "cors_allow_origins",
        "database_replica_urls",
        "rate_limit_allowlist",
        "trusted_proxies",
        mode="before",
    )
    @classmethod
    def _csv_lists(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        return _normalise_database_url(value, "DATABASE_URL")

    @field_validator("database_replica_urls")
    @classmethod
    def _replica_urls(cls, value: list[str]) -> list[str]:
        return [_normalise_database_url(url, "DATABASE_REPLICA_URLS") for url in value]

    @field_validator("database_direct_url")
    @classmethod
    def _database_direct_url(cls, value: str) -> str:
        if not value.strip():
            return ""
        return _normalise_database_url(value, "DATABASE_DIRECT_URL")

    @field_validator("pgbouncer_admin_url")
    @classmethod
    def _pgbouncer_admin_url(cls, value: str) -> str:
        if not value.strip():
            return ""
        rest = _normalise_database_url(value, "PGBOUNCER_ADMIN_URL").split("://", 1)[1]
        database = rest.rsplit("@", 1)[-1].split("/", 1)[1].split("?", 1)[0]
        if database != "pgbouncer":
            raise ValueError(
                "PGBOUNCER_ADMIN_URL must name PgBouncer's admin console: "
                "postgresql://user:password@host:port/pgbouncer"
            )
        return f"postgresql://{rest}"  # psycopg's conninfo: no SQLAlchemy driver

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if not re.match(r"^rediss?://[^/]+(/\d+)?$", value.strip()):
            raise ValueError("REDIS_URL must look like redis://host:port/db")
        return value.strip()

    @field_validator("cors_allow_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if origin != "*" and not re.match(r"^https?://[^/\s]+$", origin):
                raise ValueError(f"CORS origin {origin!r} must be scheme://host[:port]")
        return value

    @field_validator("cors_allow_credentials")
    @classmethod
    def _no_wildcard_with_credentials(cls, value: bool, info: ValidationInfo) -> bool:
        if value and "*" in (info.data.get("cors_allow_origins") or []):
            raise ValueError("CORS_ALLOW_ORIGINS may not contain '*' when credentials are allowed")
        return value

    @field_validator("jwt_secret", "member_encryption_keys", "member_hmac_key")
    @classmethod
    def _no_development_secret_in_production(
        cls, value: SecretStr, info: ValidationInfo
    ) -> SecretStr:
        if info.data.get("env") == "production" and value.get_secret_value() in _DEV_SECRETS:
            raise ValueError("must be set to a real secret in production")
        return value

    @field_validator("stripe_api_key", "telnyx_api_key")
    @classmethod
    def _no_sandbox_key_in_production(cls, value: SecretStr, info: ValidationInfo) -> SecretStr:
        sandbox = {_SANDBOX_STRIPE_API_KEY, _SANDBOX_TELNYX_API_KEY}
        if info.data.get("env") == "production" and value.get_secret_value().strip() in sandbox:
            raise ValueError("the sandbox key is refused in production; set the real API key")
        return value

    @field_validator("stripe_webhook_secrets")
    @classmethod
    def _webhook_secrets(cls, value: SecretStr, info: ValidationInfo) -> SecretStr:
        entries = _secret_entries(value.get_secret_value())
        empty = [str(i) for i, entry in enumerate(entries, start=1) if not entry]
        if empty:  # an empty entry would be an empty HMAC key, in any environment
            raise ValueError(f"entry {', '.join(empty)} is empty (a stray comma?)")
        if info.data.get("env") == "production" and _SANDBOX_STRIPE_WEBHOOK_SECRET in entries:
            raise ValueError("the sandbox secret whsec_sandbox is refused in production")
        return value

    @field_validator("telnyx_public_key")
    @classmethod
    def _telnyx_public_key(cls, value: str, info: ValidationInfo) -> str:
        if not value.strip():
            if info.data.get("env") == "production":
                raise ValueError("must be set in production (the key that signs Telnyx webhooks)")
            return ""
        _check_public_keys(value)  # malformed: refused wherever it is set
        return value.strip()

    @field_validator("jwt_secret", "member_hmac_key")
    @classmethod
    def _long_secret(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters")
        return value

    @field_validator("member_encryption_keys")
    @classmethod
    def _keyring(cls, value: SecretStr) -> SecretStr:
        for entry in value.get_secret_value().split(","):
            key_id, sep, encoded = entry.strip().partition(":")
            try:
                key = base64.b64decode(encoded, validate=True)
            except ValueError:
                key = b""
            if not sep or not key_id or len(key) != 32:
                raise ValueError("must be 'id:<base64 of 32 bytes>[,id:<base64>...]'")
        return value

    @field_validator("member_encryption_active_key")
    @classmethod
    def _active_key_known(cls, value: str, info: ValidationInfo) -> str:
        keys = info.data.get("member_encryption_keys")
        if keys is not None:
            ids = {e.split(":", 1)[0].strip() for e in keys.get_secret_value().split(",")}
            if value not in ids:
                raise ValueError("must name one of the ids in MEMBER_ENCRYPTION_KEYS")
        return value

    @field_validator("billing_plans")
    @classmethod
    def _plans(cls, value: str) -> str:
        for entry in value.split(","):
            parts = entry.strip().split(":")
            if len(parts) != 4 or not parts[0] or not parts[1]:
                raise ValueError("each plan must be 'id:price_id:monthly_cents:segments'")
            if not (parts[2].isdigit() and parts[3].isdigit()):
                raise ValueError("a plan's monthly cents and segments must be whole numbers")
        return value

    @field_validator("rate_limit_burst")
    @classmethod
    def _burst_at_least_rate(cls, value: int, info: ValidationInfo) -> int:
        rate = info.data.get("rate_limit_per_minute")
        if rate is not None and value < rate:
            raise ValueError("must be >= RATE_LIMIT_PER_MINUTE")
        return value

    @field_validator("send_rate_overrides")
    @classmethod
    def _rate_overrides(cls, value: str) -> str:
        parse_rate_overrides(value)
        return value

    @property
    def direct_database_url(self) -> str:
        """DATABASE_DIRECT_URL, or DATABASE_URL when it is not set (resolved on every read,
        so a copy with another DATABASE_URL follows it)."""
        return self.database_direct_url or self.database_url

    @property
    def rate_overrides(self) -> dict[str, float]:
        return parse_rate_overrides(self.send_rate_overrides)

    @model_validator(mode="after")
    def _lease_outlives_a_send(self) -> Settings:
        # A row is presumed abandoned only after its lease; a live worker's send can take
        # up to the Telnyx timeout, so a shorter lease would resend what is in flight.
        if self.send_lease_seconds <= self.telnyx_timeout:
            raise ValueError("SEND_LEASE_SECONDS must be longer than TELNYX_TIMEOUT")
        return self

    # Production rules are field validators above (every problem is listed, one line per
    # variable); what follows needs several fields at once.

    @property
    def stripe_webhook_secret_list(self) -> list[str]:
        return _secret_entries(self.stripe_webhook_secrets.get_secret_value())

    def development_secrets_in_use(self) -> list[str]:
        """Variables still holding a development default that lets anyone forge a token,
        read member data or a provider event (the variable names, never the values)."""
        names = [
            name.upper()
            for name in ("jwt_secret", "member_encryption_keys", "member_hmac_key")
            if getattr(self, name).get_secret_value() in _DEV_SECRETS
        ]
        if _SANDBOX_STRIPE_WEBHOOK_SECRET in self.stripe_webhook_secret_list:
            names.append("STRIPE_WEBHOOK_SECRETS")
        return names

    def loopback_problem(self, host: str) -> str | None:
        """Why serving on `host` is refused: development secrets are known to everyone, so a
        process using them listens on loopback only."""
        dev = self.development_secrets_in_use()
        if not dev or is_loopback(host):
            return None
        return (
            f"must be a loopback address (127.0.0.1, ::1, localhost) while development "
            f"secrets are in use ({', '.join(dev)}); set real secrets to listen on {host!r}"
        )

    @model_validator(mode="after")
    def _development_secrets_on_loopback_only(self) -> Settings:
        problem = self.loopback_problem(self.api_host)
        if problem:
            raise ValueError(f"API_HOST {problem}")
        return self


class SettingsError(Exception):
    """Configuration is missing or malformed; the message lists every problem."""


def _field_env_name(loc: tuple[int | str, ...]) -> str:
    if not loc:
        return "configuration"
    name = str(loc[0])
    field = Settings.model_fields.get(name)
    if field is not None and field.alias:
        return field.alias
    return name.upper()


def format_validation_error(error: ValidationError) -> str:
    # include_input=False: a malformed secret must never be echoed back.
    lines = []
    for item in error.errors(include_input=False, include_url=False):
        message = str(item["msg"]).removeprefix("Value error, ")
        lines.append(f"  - {_field_env_name(tuple(item['loc']))}: {message}")
    return "Invalid configuration ({} problem(s)):\n{}".format(len(lines), "\n".join(lines))


def load_settings(**overrides: object) -> Settings:
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        raise SettingsError(format_validation_error(error)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
