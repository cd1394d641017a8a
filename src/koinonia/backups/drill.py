"""The point-in-time restore drill (`scripts/restore-drill`; docs/backups.md).

Everything it uses it makes, on free loopback ports, in one temporary directory, and
removes again — on failure and on SIGTERM too. The shared cluster on 5432 is never
touched. Steps:

1. an S3 API server (`moto_server`) behind `stunnel4` with a self-signed CA that
   pgBackRest is told to trust (pgBackRest speaks only HTTPS to S3);
2. a source cluster (initdb, as the PostgreSQL OS user) with WAL archiving on through the
   rendered pgBackRest configuration (`BackupConfig`, the same renderer production uses),
   the Koinonia schema migrated and rows written (phase A);
3. `koinonia backup init` (stanza-create + check) and `koinonia backup run --type full`;
4. more rows (phase B), the time T, more rows (phase C); the RPO is measured: the seconds
   from phase C's commit until `archive_timeout` has put its WAL in the repository;
5. `koinonia restore --to T --target DIR:PORT` into a scratch cluster, `koinonia migrate`
   against it (nothing to apply) and `koinonia api` against it until
   `/api/v1/health` answers 200 — the RTO is the seconds from "restore" to that;
6. through the application's `Database`: phases A and B are there, row for row, and
   nothing of phase C;
7. everything stopped and deleted.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import httpx
import psycopg
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from koinonia.backups.config import BackupConfig
from koinonia.backups.metrics import BackupMonitor, read_archiver
from koinonia.backups.pgbackrest import as_os_user, chown_to, parse_info

SHARED_PORT = 5432
OS_USER = "postgres"
STANZA = "drill"
BUCKET = "koinonia-drill"
PG_BIN = Path(os.environ.get("TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
ROWS = {"A": 200, "B": 100, "C": 100}


class DrillError(RuntimeError):
    pass


# --- small tools -----------------------------------------------------------------------


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def left(self, cap: float | None = None) -> float:
        remaining = self.at - time.monotonic()
        if remaining <= 0:
            raise DrillError(f"the drill ran over its {self.seconds:g}s deadline")
        return remaining if cap is None else min(cap, remaining)


def wait_until(
    what: str, probe: Callable[[], bool], deadline: Deadline, cap: float, interval: float = 0.05
) -> None:
    """Poll `probe` until it is true, at most `cap` seconds (and never past `deadline`)."""
    until = time.monotonic() + deadline.left(cap)
    last_error: Exception | None = None
    while time.monotonic() < until:
        try:
            if probe():
                return
        except Exception as error:  # the probe's failures are what we wait out
            last_error = error
        time.sleep(interval)
    detail = f" (last error: {type(last_error).__name__}: {last_error})" if last_error else ""
    raise DrillError(f"timed out after {cap:g}s waiting for {what}{detail}")


def free_port() -> int:
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        if port != SHARED_PORT:
            return port


def say(message: str) -> None:
    print(f"[drill] {message}", flush=True)  # noqa: T201 - the drill reports on stdout


@dataclass
class Step:
    name: str
    seconds: float


class Timer:
    def __init__(self) -> None:
        self.steps: list[Step] = []

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        yield
        seconds = time.monotonic() - started
        self.steps.append(Step(name, seconds))
        say(f"{name}: {seconds:.1f}s")


# --- processes -------------------------------------------------------------------------


class Processes:
    """Processes the drill started; stopped by their pid (TERM, then KILL)."""

    def __init__(self) -> None:
        self.running: list[tuple[str, subprocess.Popen[bytes], TextIO]] = []

    def start(
        self, name: str, args: Sequence[str | Path], log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        handle = log.open("w")
        process = subprocess.Popen(  # noqa: S603 - our own executables and arguments
            [str(a) for a in args],
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        self.running.append((name, process, handle))
        return process

    def stop(self, process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        for name, running, handle in list(self.running):
            if running is process:
                handle.close()
                self.running.remove((name, running, handle))

    def stop_all(self) -> None:
        for _, process, _ in reversed(list(self.running)):
            self.stop(process)


# --- TLS -------------------------------------------------------------------------------


def make_tls(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 signed by it.

    The address is in the certificate both as an IP and as a DNS name: pgBackRest 2.45
    matches the host against DNS subjectAltNames only."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "koinonia restore drill CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("127.0.0.1"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, cert_file = directory / "ca.pem", directory / "server.pem"
    key_file = directory / "server.key"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    return ca_file, cert_file, key_file


# --- PostgreSQL ------------------------------------------------------------------------


class Cluster:
    """A PostgreSQL cluster the drill owns: its directory, its port, its processes."""

    def __init__(self, name: str, base: Path, port: int, data_dir: Path | None = None) -> None:
        if port == SHARED_PORT:
            raise DrillError("the drill never uses the shared cluster's port 5432")
        self.name = name
        self.port = port
        self.data_dir = data_dir or base / name
        self.socket_dir = base / f"{name}-run"
        self.log = base / f"{name}.log"

    def run(self, *args: str | Path, timeout: float = 60.0) -> None:
        result = subprocess.run(  # noqa: S603 - our own executables and arguments
            as_os_user(OS_USER, args),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd="/",
        )
        if result.returncode != 0:
            raise DrillError(
                f"{Path(str(args[0])).name} ({self.name}) failed: {result.stdout}{result.stderr}"
                f"\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def initdb(self, settings: str) -> None:
        self.socket_dir.mkdir()
        self.data_dir.mkdir(mode=0o700)
        chown_to(OS_USER, self.socket_dir, self.data_dir)
        self.run(
            PG_BIN / "initdb",
            "-D",
            self.data_dir,
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        )
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# --- koinonia restore drill\n"
                "listen_addresses = '127.0.0.1'\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
                "max_connections = 40\n"
                "shared_buffers = 32MB\n"
                "fsync = off\n"
                "logging_collector = off\n" + settings
            )
        (self.data_dir / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 trust\n"
        )

    def start(self, timeout: float) -> None:
        self.run(
            PG_BIN / "pg_ctl", "start", "-D", self.data_dir, "-l", self.log, "-w",
            "-t", str(max(1, int(timeout))), timeout=timeout + 5,
        )  # fmt: skip

    def stop(self) -> None:
        """Immediate stop; if pg_ctl cannot, the postmaster (ours) is killed by pid."""
        pid_file = self.data_dir / "postmaster.pid"
        if not pid_file.exists():
            return
        try:
            self.run(PG_BIN / "pg_ctl", "stop", "-D", self.data_dir, "-m", "immediate",
                     "-w", "-t", "20", timeout=25)  # fmt: skip
        except (DrillError, subprocess.TimeoutExpired):
            try:
                pid = int(pid_file.read_text().splitlines()[0])
                os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError, IndexError):
                pass

    def conninfo(self, dbname: str = "koinonia") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname} connect_timeout=5"

    def url(self, dbname: str = "koinonia") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{dbname}"


def insert_churches(cluster: Cluster, phase: str, count: int) -> None:
    with psycopg.connect(cluster.conninfo()) as connection, connection.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO churches (name) VALUES (%s)",
            [(f"drill-{phase}-{index:04d}",) for index in range(count)],
        )


def server_time(cluster: Cluster) -> dt.datetime:
    with psycopg.connect(cluster.conninfo(), autocommit=True) as connection:
        row = connection.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    moment: dt.datetime = row[0]
    return moment


# --- the drill -------------------------------------------------------------------------


@dataclass
class Result:
    rpo_seconds: float
    archive_timeout: int
    rto_seconds: float
    restore_seconds: float
    duration_seconds: float


class Drill:
    def __init__(self, archive_timeout: int, deadline: Deadline, keep: bool) -> None:
        self.archive_timeout = archive_timeout
        self.deadline = deadline
        self.keep = keep
        self.timer = Timer()
        self.processes = Processes()
        self.base = Path(tempfile.mkdtemp(prefix="koinonia-restore-drill-"))
        self.venv_bin = Path(sys.executable).parent
        self.koinonia = self.venv_bin / "koinonia"

    # --- helpers -------------------------------------------------------------------

    def child_env(self, **overrides: str) -> dict[str, str]:
        """The environment for `koinonia` commands: ours, minus anything that points at
        other databases or collectors, plus the drill's backup settings."""
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in {"DATABASE_REPLICA_URLS", "OTEL_EXPORTER_OTLP_ENDPOINT", "LOG_FILE"}
        }
        env.update(
            LOG_LEVEL="WARNING",
            BACKUP_STANZA=STANZA,
            BACKUP_CONFIG_PATH=str(self.config.config_path),
            BACKUP_OS_USER=OS_USER,
            BACKUP_PG_BIN=str(PG_BIN),
            BACKUP_PG_DATA=str(self.source.data_dir),
            BACKUP_PG_PORT=str(self.source.port),
            BACKUP_PG_SOCKET_DIR=str(self.source.socket_dir),
        )
        env.update(overrides)
        return env

    def koinonia_cmd(self, *args: str, timeout: float, **env: str) -> str:
        result = subprocess.run(  # noqa: S603 - our own executable and arguments
            [str(self.koinonia), *args],
            capture_output=True,
            text=True,
            timeout=self.deadline.left(timeout),
            env=self.child_env(**env),
            cwd=self.base,
            check=False,
        )
        if result.returncode != 0:
            raise DrillError(
                f"koinonia {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}"
            )
        return result.stdout

    # --- steps ---------------------------------------------------------------------

    def start_s3(self) -> None:
        tls_dir = self.base / "tls"
        tls_dir.mkdir()
        self.ca_file, cert_file, key_file = make_tls(tls_dir)
        for path in (tls_dir, self.ca_file):
            path.chmod(0o755 if path.is_dir() else 0o644)
        moto = shutil.which("moto_server", path=str(self.venv_bin)) or shutil.which("moto_server")
        stunnel = shutil.which("stunnel4") or shutil.which("stunnel")
        if moto is None:
            raise DrillError("moto_server is missing: uv sync (moto[server] is a dev dependency)")
        if stunnel is None:
            raise DrillError("stunnel4 is missing: scripts/ops-deps.sh")
        self.moto_port, self.s3_port = free_port(), free_port()
        self.processes.start(
            "moto_server", [moto, "-H", "127.0.0.1", "-p", str(self.moto_port)],
            self.base / "moto.log",
        )  # fmt: skip
        stunnel_conf = self.base / "stunnel.conf"
        stunnel_conf.write_text(
            "foreground = yes\npid =\nsyslog = no\ndebug = warning\n"
            "[s3]\n"
            f"accept = 127.0.0.1:{self.s3_port}\n"
            f"connect = 127.0.0.1:{self.moto_port}\n"
            f"cert = {cert_file}\nkey = {key_file}\n"
        )
        self.processes.start("stunnel", [stunnel, stunnel_conf], self.base / "stunnel.log")

        def moto_answers() -> bool:
            response = httpx.put(f"http://127.0.0.1:{self.moto_port}/{BUCKET}", timeout=2)
            return response.status_code == 200

        wait_until("moto_server (and the bucket)", moto_answers, self.deadline, cap=30)
        verify = ssl.create_default_context(cafile=str(self.ca_file))

        def https_answers() -> bool:
            response = httpx.get(f"https://127.0.0.1:{self.s3_port}/", verify=verify, timeout=2)
            return response.status_code == 200 and BUCKET in response.text

        wait_until("stunnel (HTTPS with the drill's CA)", https_answers, self.deadline, cap=15)

    def render_config(self) -> None:
        work = self.base / "pgbackrest"
        for sub in ("", "log", "lock", "spool"):
            (work / sub).mkdir(exist_ok=True)
            chown_to(OS_USER, work / sub)
        self.config = BackupConfig(
            stanza=STANZA,
            config_path=work / "pgbackrest.conf",
            pg_data=self.source.data_dir,
            pg_port=self.source.port,
            pg_socket_dir=self.source.socket_dir,
            pg_bin=PG_BIN,
            os_user=OS_USER,
            s3_endpoint="127.0.0.1",
            s3_port=self.s3_port,
            s3_region="us-east-1",
            s3_bucket=BUCKET,
            s3_path="/koinonia",
            s3_uri_style="path",
            s3_ca_file=self.ca_file,
            s3_key="drill-access-key",
            s3_key_secret="drill-secret-key",  # noqa: S106 - moto accepts any
            cipher_pass=os.urandom(24).hex(),
            retention_days=30,
            archive_timeout_seconds=self.archive_timeout,
            log_path=work / "log",
            lock_path=work / "lock",
            spool_path=work / "spool",
            log_level_file="detail",
        )
        self.config.config_path.write_text(self.config.render())
        self.config.config_path.chmod(0o600)
        chown_to(OS_USER, self.config.config_path)

    def make_source(self) -> None:
        chown_to(OS_USER, self.base)  # PostgreSQL and pgBackRest write beside each other
        self.source = Cluster("source", self.base, free_port())
        self.render_config()
        self.source.initdb(self.config.render_postgresql())
        self.source.start(self.deadline.left(30))
        with psycopg.connect(self.source.conninfo("postgres"), autocommit=True) as connection:
            connection.execute("CREATE DATABASE koinonia")
        from alembic import command

        from koinonia.cli.database import alembic_config

        command.upgrade(alembic_config(self.source.url()), "heads")
        insert_churches(self.source, "A", ROWS["A"])

    def backup(self) -> None:
        self.koinonia_cmd("backup", "init", timeout=90)
        out = self.koinonia_cmd("backup", "run", "--type", "full", timeout=90)
        say(out.strip())

    def write_around_t(self) -> tuple[dt.datetime, float]:
        insert_churches(self.source, "B", ROWS["B"])
        target = server_time(self.source)
        with psycopg.connect(self.source.conninfo()) as connection:
            connection.execute(
                "INSERT INTO churches (name) SELECT 'drill-C-' || lpad(i::text, 4, '0') "
                "FROM generate_series(0, %s) AS i",
                (ROWS["C"] - 1,),
            )
            connection.commit()
            row = connection.execute(
                "SELECT pg_walfile_name(pg_current_wal_lsn()), clock_timestamp()"
            ).fetchone()
        assert row is not None
        segment, committed = str(row[0]), row[1]
        say(f"T = {target.isoformat()}; phase C committed in WAL segment {segment}")
        # RPO: from phase C's commit until its segment is in the repository, with nothing
        # forcing a switch but archive_timeout.
        archived: dict[str, Any] = {}

        def segment_archived() -> bool:
            with psycopg.connect(self.source.conninfo(), autocommit=True) as connection:
                found = connection.execute(
                    "SELECT last_archived_wal, last_archived_time FROM pg_stat_archiver"
                ).fetchone()
            if found and found[0] and len(found[0]) == 24 and found[0] >= segment:
                archived["time"] = found[1]
                return True
            return False

        wait_until(
            f"WAL segment {segment} to be archived (archive_timeout={self.archive_timeout}s)",
            segment_archived,
            self.deadline,
            cap=self.archive_timeout * 3 + 30,
            interval=0.1,
        )
        rpo = max(0.0, (archived["time"] - committed).total_seconds())
        return target, rpo

    def check_metrics(self) -> None:
        """The backup gauges, computed as `/metrics` computes them, against the source."""
        from prometheus_client import REGISTRY

        from koinonia.db import Database
        from koinonia.settings import load_settings

        info = parse_info(self.koinonia_cmd("backup", "list", "--json", timeout=60))
        say("backup list:\n" + self.koinonia_cmd("backup", "list", timeout=60).rstrip())
        say(self.koinonia_cmd("backup", "check", "--max-age-hours", "1", timeout=90).strip())
        stanza = next(s for s in info if s.name == STANZA)
        if stanza.cipher != "aes-256-cbc" or self.plain_text_in_repository():
            raise DrillError(f"the repository is not encrypted (cipher {stanza.cipher})")
        settings = load_settings(database_url=self.source.url(), database_pool_size=1)

        async def measure() -> None:
            database = Database(settings)
            try:
                monitor = BackupMonitor(self.config, database, info_enabled=False)
                monitor.apply_info(stanza)
                await monitor.refresh()
                snapshot = await read_archiver(database)
                assert snapshot.archive_mode == "on"
            finally:
                await database.dispose()

        asyncio.run(measure())
        labels = {"stanza": STANZA}
        backup_age = REGISTRY.get_sample_value("koinonia_backup_last_success_age_seconds", labels)
        wal_age = REGISTRY.get_sample_value("koinonia_wal_archive_last_success_age_seconds", labels)
        pending = REGISTRY.get_sample_value("koinonia_wal_archive_pending_segments", labels)
        say(f"metrics: backup age {backup_age:.0f}s, WAL archive age {wal_age:.1f}s, "
            f"pending segments {pending:.0f}")  # fmt: skip
        if backup_age is None or backup_age > 600 or wal_age is None or wal_age > 600:
            raise DrillError("backup metrics are missing or implausible")

    def plain_text_in_repository(self) -> bool:
        """Read the repository's objects straight from the S3 server (boto3, not
        pgBackRest): each must be OpenSSL-encrypted ("Salted__"), no row text showing."""
        import boto3  # type: ignore[import-untyped]  # from moto (the dev group)

        s3 = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{self.moto_port}",
            region_name="us-east-1",
            aws_access_key_id=self.config.s3_key,
            aws_secret_access_key=self.config.s3_key_secret,
        )
        keys = [
            str(item["Key"])
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for item in page.get("Contents", [])
        ]
        if not keys:
            raise DrillError("the S3 bucket is empty after a backup")
        for key in keys:
            body: bytes = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
            if not body.startswith(b"Salted__") or b"drill-A-0001" in body:
                say(f"not encrypted: {key}: {body[:16]!r}")
                return True
        say(f"{len(keys)} objects in the bucket, every one encrypted (aes-256-cbc)")
        return False

    def restore_and_serve(self, target: dt.datetime) -> tuple[float, float]:
        restored_port, api_port = free_port(), free_port()
        restored_dir = self.base / "restored"
        self.restored = Cluster("restored", self.base, restored_port, data_dir=restored_dir)
        started = time.monotonic()
        out = self.koinonia_cmd(
            "restore", "--to", target.isoformat(), "--target", f"{restored_dir}:{restored_port}",
            "--json", timeout=120,
        )  # fmt: skip
        restore_seconds = time.monotonic() - started
        say(f"restored and promoted on 127.0.0.1:{restored_port} in {restore_seconds:.1f}s")
        say(f"  {out.strip()}")
        app_env = {"DATABASE_URL": self.restored.url(), "API_PORT": str(api_port)}
        before = self.alembic_version(self.restored)
        self.koinonia_cmd("migrate", timeout=90, **app_env)
        if self.alembic_version(self.restored) != before:
            raise DrillError("`koinonia migrate` changed the restored schema (a stale backup)")
        api = self.processes.start(
            "koinonia api",
            [self.koinonia, "api", "--host", "127.0.0.1", "--port", str(api_port)],
            self.base / "api.log",
            env=self.child_env(**app_env),
        )

        def healthy() -> bool:
            if api.poll() is not None:
                raise DrillError(f"koinonia api exited ({api.returncode}); see api.log")
            response = httpx.get(f"http://127.0.0.1:{api_port}/api/v1/health", timeout=2)
            return response.status_code == 200

        try:
            wait_until("the API on the restored database to be healthy", healthy,
                       self.deadline, cap=60, interval=0.1)  # fmt: skip
        except DrillError:
            say((self.base / "api.log").read_text(errors="replace")[-3000:])
            raise
        rto = time.monotonic() - started
        health = httpx.get(f"http://127.0.0.1:{api_port}/api/v1/health", timeout=5).json()
        checks = ", ".join(f"{name} {check['status']}" for name, check in health["checks"].items())
        say(f"app healthy on the restored database: {health['status']} ({checks}; "
            "telnyx/stripe are non-critical and no sandbox runs here)")  # fmt: skip
        metrics = httpx.get(f"http://127.0.0.1:{api_port}/metrics", timeout=5).text
        if "# HELP koinonia_backup_last_success_age_seconds" not in metrics:
            raise DrillError("/metrics has no backup gauges")
        self.processes.stop(api)
        return rto, restore_seconds

    @staticmethod
    def alembic_version(cluster: Cluster) -> list[str]:
        with psycopg.connect(cluster.conninfo(), autocommit=True) as connection:
            rows = connection.execute("SELECT version_num FROM alembic_version").fetchall()
        return sorted(str(row[0]) for row in rows)

    def verify_rows(self) -> dict[str, int]:
        """Count each phase's rows through the application's `Database`."""
        from sqlalchemy import text

        from koinonia.db import Database
        from koinonia.settings import load_settings

        settings = load_settings(database_url=self.restored.url(), database_pool_size=1)

        async def count() -> dict[str, list[str]]:
            database = Database(settings)
            try:
                async with database.engine.connect() as connection:
                    rows = await connection.execute(
                        text("SELECT name FROM churches WHERE name LIKE 'drill-%' ORDER BY name")
                    )
                    names = [str(row.name) for row in rows]
            finally:
                await database.dispose()
            phases: dict[str, list[str]] = {"A": [], "B": [], "C": []}
            for name in names:
                phases[name.split("-")[1]].append(name)
            return phases

        phases = asyncio.run(count())
        counts = {phase: len(names) for phase, names in phases.items()}
        expected = {"A": ROWS["A"], "B": ROWS["B"], "C": 0}
        for phase in ("A", "B"):
            wanted = [f"drill-{phase}-{index:04d}" for index in range(ROWS[phase])]
            if phases[phase] != wanted:
                raise DrillError(f"phase {phase} rows differ after the restore: {counts}")
        if counts != expected:
            raise DrillError(f"expected {expected} rows after restoring to T, found {counts}")
        return counts

    def run(self) -> Result:
        started = time.monotonic()
        with self.timer.step("S3 server behind stunnel (self-signed CA)"):
            self.start_s3()
        with self.timer.step("source cluster with archiving, migrated, phase A rows"):
            self.make_source()
        with self.timer.step("koinonia backup init + run --type full"):
            self.backup()
        with self.timer.step("phase B, T, phase C, WAL archived by archive_timeout"):
            target, rpo = self.write_around_t()
        with self.timer.step("backup list + check, encryption, metrics"):
            self.check_metrics()
        with self.timer.step("restore to T + migrate + API healthy"):
            rto, restore_seconds = self.restore_and_serve(target)
        with self.timer.step("rows checked through the app's Database"):
            counts = self.verify_rows()
        say(f"rows after restore: {counts} (expected A={ROWS['A']}, B={ROWS['B']}, C=0)")
        return Result(
            rpo_seconds=rpo,
            archive_timeout=self.archive_timeout,
            rto_seconds=rto,
            restore_seconds=restore_seconds,
            duration_seconds=time.monotonic() - started,
        )

    # --- cleanup -------------------------------------------------------------------

    def cleanup(self) -> None:
        self.processes.stop_all()
        for name in ("restored", "source"):
            cluster = getattr(self, name, None)
            if isinstance(cluster, Cluster):
                cluster.stop()
        self._stop_archive_async()
        if self.keep:
            say(f"kept {self.base}")
        else:
            shutil.rmtree(self.base, ignore_errors=True)

    def _stop_archive_async(self) -> None:
        """pgBackRest's asynchronous archive-push runs detached from the source cluster;
        wait (bounded) for the ones using our configuration, then end them by pid."""
        marker = str(self.base).encode()

        def ours() -> list[int]:
            pids = []
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    if marker in (entry / "cmdline").read_bytes():
                        pids.append(int(entry.name))
                except OSError:
                    continue
            return [pid for pid in pids if pid != os.getpid()]

        until = time.monotonic() + 10
        while ours() and time.monotonic() < until:
            time.sleep(0.1)
        for pid in ours():
            with suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="restore-drill", description=__doc__.split("\n")[0])
    parser.add_argument("--archive-timeout", type=int, default=5, help="seconds (default 5)")
    parser.add_argument("--deadline", type=float, default=150, help="give up after (seconds)")
    parser.add_argument("--keep", action="store_true", help="keep the directory (debugging)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    deadline = Deadline(args.deadline)
    drill = Drill(args.archive_timeout, deadline, args.keep)
    say(f"working in {drill.base}")
    with ExitStack() as cleanup:
        cleanup.callback(drill.cleanup)
        try:
            result = drill.run()
        except DrillError as error:
            say(f"FAILED: {error}")
            return 1
        except (SystemExit, KeyboardInterrupt):
            say("interrupted: removing everything the drill made")
            raise
    say(
        f"RPO: {result.rpo_seconds:.1f}s measured (last commit → its WAL in the repository) "
        f"with archive_timeout={result.archive_timeout}s"
    )
    say(
        f"RTO: {result.rto_seconds:.1f}s from `koinonia restore` to app healthy "
        f"(restore + recovery {result.restore_seconds:.1f}s)"
    )
    say(f"drill took {result.duration_seconds:.1f}s; everything removed: {not drill.base.exists()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
