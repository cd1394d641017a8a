"""The pgBackRest configuration and the primary's archiving settings, rendered from one
description (`BackupConfig`) so that production (`koinonia backup config --write`) and the
restore drill run exactly the same options.

What every rendered repository has:

- S3-compatible storage over HTTPS (pgBackRest 2.45 speaks nothing else to S3), with an
  optional CA file for a private endpoint;
- encryption at rest: `repo1-cipher-type=aes-256-cbc` with a passphrase (required);
- retention by time: `repo1-retention-full-type=time`, `repo1-retention-full=<days>` — every
  point in the last <days> days stays restorable (pgBackRest keeps the newest full backup
  older than that window too, with the WAL that follows it);
- bundled small files (`repo1-bundle`), fewer S3 requests per backup;
- asynchronous `archive-push` from a local spool when `archive_async` (production), so a
  slow S3 request never holds the primary's WAL archiver for long.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from koinonia.settings import Settings

MIN_CIPHER_PASS_LENGTH = 32
_SAFE_VALUE = re.compile(r"[^\n\r]*")
_SECRET_LINE = re.compile(r"^(repo1-s3-key|repo1-s3-key-secret|repo1-cipher-pass)=.*$", re.M)


class BackupConfigError(ValueError):
    """The backup settings cannot make a working, encrypted repository."""


@dataclass(frozen=True)
class BackupConfig:
    stanza: str
    config_path: Path
    pg_data: Path
    pg_port: int
    pg_socket_dir: Path
    s3_endpoint: str
    s3_bucket: str
    s3_region: str
    s3_key: str
    s3_key_secret: str
    cipher_pass: str
    s3_path: str = "/koinonia"
    s3_port: int = 443
    s3_uri_style: str = "host"
    s3_ca_file: Path | None = None
    # Where S3 is reached when it is not the endpoint's own address (a local TLS proxy).
    s3_storage_host: str | None = None
    retention_days: int = 30
    archive_timeout_seconds: int = 60
    os_user: str = "postgres"
    pg_bin: Path = Path("/usr/lib/postgresql/15/bin")
    log_path: Path = Path("/var/log/pgbackrest")
    lock_path: Path = Path("/tmp/pgbackrest")  # noqa: S108 - pgBackRest's own default
    spool_path: Path = Path("/var/spool/pgbackrest")
    archive_async: bool = True
    process_max: int = 2
    compress_type: str = "lz4"
    log_level_file: str = "info"
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> BackupConfig:
        return cls(
            stanza=settings.backup_stanza,
            config_path=Path(settings.backup_config_path),
            pg_data=Path(settings.backup_pg_data),
            pg_port=settings.backup_pg_port,
            pg_socket_dir=Path(settings.backup_pg_socket_dir),
            pg_bin=Path(settings.backup_pg_bin),
            os_user=settings.backup_os_user,
            s3_endpoint=settings.backup_s3_endpoint,
            s3_port=settings.backup_s3_port,
            s3_region=settings.backup_s3_region,
            s3_bucket=settings.backup_s3_bucket,
            s3_path=settings.backup_s3_path,
            s3_uri_style=settings.backup_s3_uri_style,
            s3_ca_file=Path(settings.backup_s3_ca_file) if settings.backup_s3_ca_file else None,
            s3_key=settings.backup_s3_key.get_secret_value(),
            s3_key_secret=settings.backup_s3_key_secret.get_secret_value(),
            cipher_pass=settings.backup_cipher_pass.get_secret_value(),
            retention_days=settings.backup_retention_days,
            archive_timeout_seconds=settings.backup_archive_timeout_seconds,
        )

    def with_changes(self, **changes: object) -> BackupConfig:
        return replace(self, **changes)  # type: ignore[arg-type]

    # --- validation ------------------------------------------------------------------

    def problems(self) -> list[str]:
        """Everything that would make the repository unusable or unencrypted."""
        found = []
        if not self.s3_bucket:
            found.append("BACKUP_S3_BUCKET is empty (backups are not configured)")
        if not self.s3_key or not self.s3_key_secret:
            found.append("BACKUP_S3_KEY and BACKUP_S3_KEY_SECRET must be set")
        if len(self.cipher_pass) < MIN_CIPHER_PASS_LENGTH:
            found.append(
                f"BACKUP_CIPHER_PASS must be at least {MIN_CIPHER_PASS_LENGTH} characters "
                "(the repository is always encrypted)"
            )
        if self.s3_uri_style not in ("host", "path"):
            found.append("BACKUP_S3_URI_STYLE must be host or path")
        values = (
            self.s3_endpoint, self.s3_bucket, self.s3_region, self.s3_path, self.s3_key,
            self.s3_key_secret, self.cipher_pass, self.stanza, str(self.pg_data),
        )  # fmt: skip
        if not all(_SAFE_VALUE.fullmatch(value) for value in values):
            found.append("backup settings may not contain line breaks")
        return found

    def validate(self) -> None:
        problems = self.problems()
        if problems:
            raise BackupConfigError("; ".join(problems))

    # --- rendering -------------------------------------------------------------------

    def archive_command(self) -> str:
        return f"pgbackrest --config={self.config_path} --stanza={self.stanza} archive-push %p"

    def render(self) -> str:
        """pgbackrest.conf, secrets included: write it mode 0640 (owner root or the
        PostgreSQL OS user, group of that user), never to a log."""
        self.validate()
        repo: list[tuple[str, str]] = [
            ("repo1-type", "s3"),
            ("repo1-path", self.s3_path),
            ("repo1-s3-endpoint", self.s3_endpoint),
            ("repo1-s3-bucket", self.s3_bucket),
            ("repo1-s3-region", self.s3_region),
            ("repo1-s3-uri-style", self.s3_uri_style),
            ("repo1-s3-key", self.s3_key),
            ("repo1-s3-key-secret", self.s3_key_secret),
            ("repo1-storage-port", str(self.s3_port)),
        ]
        if self.s3_storage_host:
            repo.append(("repo1-storage-host", self.s3_storage_host))
        if self.s3_ca_file:
            repo.append(("repo1-storage-ca-file", str(self.s3_ca_file)))
        repo += [
            ("repo1-storage-verify-tls", "y"),
            ("repo1-cipher-type", "aes-256-cbc"),
            ("repo1-cipher-pass", self.cipher_pass),
            ("repo1-retention-full-type", "time"),
            ("repo1-retention-full", str(self.retention_days)),
            ("repo1-bundle", "y"),
        ]
        general = [
            ("process-max", str(self.process_max)),
            ("compress-type", self.compress_type),
            ("start-fast", "y"),
            ("archive-async", "y" if self.archive_async else "n"),
            ("spool-path", str(self.spool_path)),
            ("log-path", str(self.log_path)),
            ("lock-path", str(self.lock_path)),
            ("log-level-console", "warn"),
            ("log-level-file", self.log_level_file),
            *sorted(self.extra.items()),
        ]
        stanza = [
            ("pg1-path", str(self.pg_data)),
            ("pg1-port", str(self.pg_port)),
            ("pg1-socket-path", str(self.pg_socket_dir)),
            ("pg1-user", self.os_user),
        ]
        lines = [
            "# Rendered by `koinonia backup config` from the BACKUP_* settings; edit those.",
            "# Contains the S3 secret and the cipher passphrase: mode 0640, group postgres.",
            "[global]",
            *(f"{key}={value}" for key, value in repo + general),
            "",
            f"[{self.stanza}]",
            *(f"{key}={value}" for key, value in stanza),
            "",
        ]
        return "\n".join(lines)

    def render_postgresql(self) -> str:
        """The primary's archiving settings (a conf.d file, or postgresql.conf lines)."""
        return "\n".join(
            [
                "# Continuous WAL archiving to pgBackRest (docs/backups.md). Rendered by",
                "# `koinonia backup config --postgresql`. archive_mode needs a restart.",
                "wal_level = replica",
                "archive_mode = on",
                f"archive_command = '{self.archive_command()}'",
                f"archive_timeout = {self.archive_timeout_seconds}",
                "",
            ]
        )

    def redacted(self, text: str) -> str:
        """`text` (a rendered configuration, a command's output) with the secrets this
        configuration holds replaced."""
        text = _SECRET_LINE.sub(r"\1=[REDACTED]", text)
        for secret in (self.s3_key_secret, self.cipher_pass, self.s3_key):
            if len(secret) >= 8:  # shorter values would mangle ordinary text
                text = text.replace(secret, "[REDACTED]")
        return text
