"""pgBackRest commands behind `koinonia backup run|list|check` and `koinonia restore`.

pgBackRest runs as the PostgreSQL OS user (`BACKUP_OS_USER`): when we are root, through
`runuser`; otherwise as ourselves (run the command as that user). Every call has a
timeout; `restore` never writes into a non-empty directory and never onto the running
primary's port.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from koinonia.backups.config import BackupConfig

BackupType = Literal["full", "diff", "incr"]
PGBACKREST = "pgbackrest"


class PgBackRestError(RuntimeError):
    """A pgBackRest or PostgreSQL command failed; the message has its output."""


def as_os_user(os_user: str, command: Sequence[str | Path]) -> list[str]:
    args = [str(part) for part in command]
    if os.geteuid() == 0 and os_user != "root":
        return ["runuser", "-u", os_user, "--", *args]
    return args


def chown_to(os_user: str, *paths: Path) -> None:
    """Give `paths` to the OS user pgBackRest and PostgreSQL run as (when we are root)."""
    if os.geteuid() != 0:
        return
    owner = pwd.getpwnam(os_user)
    for path in paths:
        os.chown(path, owner.pw_uid, owner.pw_gid)


@dataclass(frozen=True)
class BackupSet:
    label: str
    type: str
    started: datetime
    stopped: datetime
    size_bytes: int
    repo_size_bytes: int
    wal_start: str | None
    wal_stop: str | None
    error: bool


@dataclass(frozen=True)
class StanzaInfo:
    name: str
    status_code: int
    status_message: str
    cipher: str
    backups: list[BackupSet]
    wal_min: str | None
    wal_max: str | None

    @property
    def last_good(self) -> BackupSet | None:
        good = [backup for backup in self.backups if not backup.error]
        return max(good, key=lambda backup: backup.stopped) if good else None

    def last_good_of(self, backup_type: str) -> BackupSet | None:
        good = [b for b in self.backups if not b.error and b.type == backup_type]
        return max(good, key=lambda backup: backup.stopped) if good else None


def _timestamp(value: Any) -> datetime:
    return datetime.fromtimestamp(int(value), tz=UTC)


def parse_info(document: str) -> list[StanzaInfo]:
    """`pgbackrest info --output=json` → one `StanzaInfo` per stanza."""
    stanzas = []
    for raw in json.loads(document):
        backups = []
        for entry in raw.get("backup", []):
            archive = entry.get("archive") or {}
            info = entry.get("info") or {}
            repository = info.get("repository") or {}
            backups.append(
                BackupSet(
                    label=str(entry["label"]),
                    type=str(entry["type"]),
                    started=_timestamp(entry["timestamp"]["start"]),
                    stopped=_timestamp(entry["timestamp"]["stop"]),
                    size_bytes=int(info.get("size", 0)),
                    repo_size_bytes=int(repository.get("delta", repository.get("size", 0))),
                    wal_start=archive.get("start"),
                    wal_stop=archive.get("stop"),
                    error=bool(entry.get("error", False)),
                )
            )
        archives = raw.get("archive") or []
        status = raw.get("status") or {}
        stanzas.append(
            StanzaInfo(
                name=str(raw["name"]),
                status_code=int(status.get("code", 99)),
                status_message=str(status.get("message", "")),
                cipher=str(raw.get("cipher", "none")),
                backups=backups,
                wal_min=min((a["min"] for a in archives if a.get("min")), default=None),
                wal_max=max((a["max"] for a in archives if a.get("max")), default=None),
            )
        )
    return stanzas


class PgBackRest:
    """One stanza of one repository, as configured by `config.config_path`."""

    def __init__(self, config: BackupConfig, *, executable: str = PGBACKREST) -> None:
        self.config = config
        self.executable = executable

    def command(self, *args: str) -> list[str]:
        return as_os_user(
            self.config.os_user,
            [
                self.executable,
                f"--config={self.config.config_path}",
                f"--stanza={self.config.stanza}",
                *args,
            ],
        )

    def run(self, *args: str, timeout: float = 3600.0) -> str:
        if shutil.which(self.executable) is None:
            raise PgBackRestError(
                f"{self.executable} is not installed (apt-get install -y pgbackrest, or "
                "scripts/ops-deps.sh)"
            )
        try:
            result = subprocess.run(  # noqa: S603 - fixed executable, our own arguments
                self.command(*args),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                cwd="/",  # runuser keeps the cwd; the OS user must be able to enter it
            )
        except subprocess.TimeoutExpired as error:
            raise PgBackRestError(f"pgbackrest {args[-1]} timed out after {timeout:g}s") from error
        if result.returncode != 0:
            output = self.config.redacted(f"{result.stdout}\n{result.stderr}".strip())
            raise PgBackRestError(
                f"pgbackrest {' '.join(args)} failed ({result.returncode}): {output}"
            )
        return result.stdout

    # --- the commands ----------------------------------------------------------------

    def stanza_create(self) -> None:
        """Create the stanza in the repository (idempotent)."""
        self.run("stanza-create", timeout=300)

    def check(self) -> None:
        """Repository reachable and decryptable; the primary's archive_command works (a
        WAL switch reaches the repository within pgBackRest's archive-timeout)."""
        self.run("check", timeout=300)

    def backup(self, backup_type: BackupType = "diff") -> BackupSet:
        """Take a backup (then expire what retention no longer needs); the new set."""
        before = {backup.label for backup in self.stanza_info().backups}
        self.run("backup", f"--type={backup_type}")
        info = self.stanza_info()
        new = [backup for backup in info.backups if backup.label not in before]
        if not new:
            raise PgBackRestError("pgbackrest backup succeeded but no new backup set is listed")
        return max(new, key=lambda backup: backup.stopped)

    def info_json(self, timeout: float = 120.0) -> str:
        return self.run("info", "--output=json", timeout=timeout)

    def info_text(self) -> str:
        return self.run("info", timeout=120)

    def stanza_info(self) -> StanzaInfo:
        stanzas = parse_info(self.info_json())
        for stanza in stanzas:
            if stanza.name == self.config.stanza:
                return stanza
        raise PgBackRestError(f"stanza {self.config.stanza!r} not in pgbackrest info")

    def expire(self) -> None:
        self.run("expire", timeout=1800)


# --- restore ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RestoreResult:
    data_dir: Path
    port: int | None
    target_time: datetime | None
    restore_seconds: float
    recovery_seconds: float | None


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex((host, port)) == 0


def format_target(moment: datetime) -> str:
    """A recovery_target_time PostgreSQL parses unambiguously (UTC, microseconds)."""
    if moment.tzinfo is None:
        raise ValueError("the restore target time needs a time zone (e.g. +00:00)")
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00")


_SCRATCH_HBA = """\
# Written by `koinonia restore`: the restored cluster's own pg_hba.conf was not in the
# backup (Debian keeps it in /etc/postgresql). Local peer, loopback with a password.
local   all   all                 peer
host    all   all   127.0.0.1/32  scram-sha-256
"""


def restore(
    pgbackrest: PgBackRest,
    target: Path,
    *,
    to: datetime | None,
    port: int | None,
    archive: bool = False,
    start_timeout: float = 600.0,
    backup_set: str | None = None,
) -> RestoreResult:
    """Restore the stanza into `target` (missing or empty) up to `to` (None: the end of
    the archived WAL) and, with a `port`, start it there and wait until it is promoted.
    Without a port the files are restored and nothing is started (the replacement of a
    Debian cluster is then started with `pg_ctlcluster`, which uses its /etc settings).

    `archive=False` (the default) turns archiving off in the restored cluster, so a
    scratch copy never pushes WAL into the production repository. Turn it on only for the
    cluster that replaces the primary.
    """
    config = pgbackrest.config
    target = target.resolve()
    # A running cluster's directory is never empty: this also keeps the live primary safe.
    # (Rebuilding the primary in place means moving its old directory aside first.)
    if target.exists() and any(target.iterdir()):
        raise PgBackRestError(f"{target} is not empty; restore into a new or empty directory")
    if port is not None and (port == config.pg_port or port_in_use(port)):
        raise PgBackRestError(f"port {port} is in use (or the primary's); choose a free one")
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    target.chmod(0o700)
    chown_to(config.os_user, target)

    args = ["restore", f"--pg1-path={target}", f"--archive-mode={'preserve' if archive else 'off'}"]
    if not archive:
        # A scratch copy may run beside the primary on this host: asynchronous archive-get
        # would share the primary's spool directory and archive lock with its
        # archive-push, so it fetches WAL synchronously instead.
        args.append(
            f"--recovery-option=restore_command={pgbackrest.executable} "
            f"--config={config.config_path} --stanza={config.stanza} --pg1-path={target} "
            '--archive-async=n archive-get %f "%p"'
        )
    if backup_set:
        args.append(f"--set={backup_set}")
    if to is not None:
        args += ["--type=time", f"--target={format_target(to)}", "--target-action=promote"]
    started = time.monotonic()
    pgbackrest.run(*args, timeout=start_timeout)
    restore_seconds = time.monotonic() - started

    if port is None:
        return RestoreResult(target, None, to, restore_seconds, None)

    _prepare_to_start(config, target, port)
    started = time.monotonic()
    start_cluster(config, target, timeout=start_timeout)
    wait_promoted(config, target, timeout=start_timeout)
    return RestoreResult(target, port, to, restore_seconds, time.monotonic() - started)


def _prepare_to_start(config: BackupConfig, target: Path, port: int) -> None:
    """Serve the restored cluster on 127.0.0.1:`port` with its socket in its own
    directory, whatever the primary's settings were."""
    if not (target / "postgresql.conf").exists():
        (target / "postgresql.conf").write_text("# Written by `koinonia restore`.\n")
    if not (target / "pg_hba.conf").exists():
        (target / "pg_hba.conf").write_text(_SCRATCH_HBA)
    if not (target / "pg_ident.conf").exists():
        (target / "pg_ident.conf").write_text("")
    with (target / "postgresql.auto.conf").open("a") as auto:
        auto.write(
            "\n# --- koinonia restore: where this restored copy is served\n"
            f"port = {port}\n"
            "listen_addresses = '127.0.0.1'\n"
            f"unix_socket_directories = '{target}'\n"
            f"hba_file = '{target / 'pg_hba.conf'}'\n"
            f"ident_file = '{target / 'pg_ident.conf'}'\n"
        )
    chown_to(
        config.os_user,
        target / "postgresql.conf",
        target / "pg_hba.conf",
        target / "pg_ident.conf",
        target / "postgresql.auto.conf",
    )


def _pg_ctl(config: BackupConfig, data_dir: Path, *args: str, timeout: float) -> None:
    command = as_os_user(config.os_user, [config.pg_bin / "pg_ctl", "-D", data_dir, *args])
    try:
        result = subprocess.run(  # noqa: S603 - fixed executable, our own arguments
            command, capture_output=True, text=True, timeout=timeout + 5, check=False, cwd="/"
        )
    except subprocess.TimeoutExpired as error:
        raise PgBackRestError(f"pg_ctl {args[0]} timed out after {timeout:g}s") from error
    if result.returncode != 0:
        raise PgBackRestError(
            f"pg_ctl {' '.join(args)} failed ({result.returncode}): "
            f"{result.stdout}{result.stderr}\n{startup_log_tail(data_dir)}"
        )


def startup_log(data_dir: Path) -> Path:
    return data_dir / "koinonia-restore-startup.log"


def startup_log_tail(data_dir: Path, lines: int = 20) -> str:
    try:
        text = startup_log(data_dir).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def start_cluster(config: BackupConfig, data_dir: Path, *, timeout: float) -> None:
    """pg_ctl start, waiting (bounded) until it accepts connections."""
    _pg_ctl(
        config,
        data_dir,
        "start",
        "-w",
        "-t",
        str(max(1, int(timeout))),
        "-l",
        str(startup_log(data_dir)),
        timeout=timeout,
    )


def stop_cluster(config: BackupConfig, data_dir: Path, *, mode: str = "fast") -> None:
    if (data_dir / "postmaster.pid").exists():
        _pg_ctl(config, data_dir, "stop", "-m", mode, "-w", "-t", "30", timeout=30)


def cluster_state(config: BackupConfig, data_dir: Path) -> str:
    """`pg_controldata`'s "Database cluster state" (needs no connection or password)."""
    command = as_os_user(config.os_user, [config.pg_bin / "pg_controldata", "-D", data_dir])
    result = subprocess.run(  # noqa: S603 - fixed executable, our own arguments
        command, capture_output=True, text=True, timeout=30, check=False, cwd="/"
    )
    for line in result.stdout.splitlines():
        if line.startswith("Database cluster state:"):
            return line.split(":", 1)[1].strip()
    return f"unknown ({result.stderr.strip()[:200]})"


def wait_promoted(config: BackupConfig, data_dir: Path, *, timeout: float) -> None:
    """Until the restored cluster has finished recovery ("in production") and answers."""
    deadline = time.monotonic() + timeout
    state = "unknown"
    while time.monotonic() < deadline:
        state = cluster_state(config, data_dir)
        if state == "in production":
            return
        if not (data_dir / "postmaster.pid").exists():
            raise PgBackRestError(
                f"the restored cluster stopped during recovery ({state}):\n"
                f"{startup_log_tail(data_dir)}"
            )
        time.sleep(0.1)
    raise PgBackRestError(f"the restored cluster was not promoted within {timeout:g}s: {state}")
