"""A throw-away PostgreSQL cluster for fault tests (restarts, outages).

`initdb` into a temporary directory, served on a free loopback port with trust
authentication, so a test can stop, start and restart PostgreSQL without touching the
shared cluster on 5432. initdb and postgres refuse to run as root: as root, they run as
the `postgres` OS user (`runuser`), which owns the temporary directory.

    with PgCluster() as cluster:
        url = cluster.create_app_database()   # created and migrated (alembic heads)
        cluster.restart(down_seconds=3)
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import psycopg
from psycopg import sql

from tests.support.servers import free_port

PG_BIN = Path(os.environ.get("TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
SHARED_PORT = 5432
OS_USER = "postgres"

_SETTINGS = """
# --- tests.support.pgcluster: a disposable cluster, speed over durability
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{socket_dir}'
max_connections = 60
shared_buffers = 32MB
fsync = off
synchronous_commit = off
full_page_writes = off
logging_collector = off
"""

_HBA = """\
local all all trust
host all all 127.0.0.1/32 trust
"""


class PgCluster:
    def __init__(self, port: int | None = None, bin_dir: Path = PG_BIN) -> None:
        self.port = port or free_port()
        if self.port == SHARED_PORT:
            raise ValueError("a private cluster must not use the shared cluster's port 5432")
        self.bin_dir = bin_dir
        self.base = Path(tempfile.mkdtemp(prefix="koinonia-pgcluster-"))
        self.data_dir = self.base / "data"
        self.socket_dir = self.base / "run"
        self.log_file = self.base / "postgres.log"
        self._initialized = False
        self._removed = False

    # --- URLs ------------------------------------------------------------------------

    def url(self, dbname: str = "koinonia") -> str:
        """SQLAlchemy URL (psycopg driver), the form `DATABASE_URL` takes."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{dbname}"

    def conninfo(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname} connect_timeout=5"

    # --- lifecycle -------------------------------------------------------------------

    def _as_owner(self, *command: str | Path) -> list[str]:
        args = [str(part) for part in command]
        if os.geteuid() == 0:
            return ["runuser", "-u", OS_USER, "--", *args]
        return args

    def _run(self, *command: str | Path, timeout: float = 60.0) -> None:
        result = subprocess.run(
            self._as_owner(*command),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.base,  # runuser keeps the cwd; postgres must be able to read it
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(str(c) for c in command)} failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}\n{self._log_tail()}"
            )

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def init(self) -> None:
        if self._initialized:
            return
        self.socket_dir.mkdir()
        if os.geteuid() == 0:
            owner = pwd.getpwnam(OS_USER)
            for path in (self.base, self.socket_dir):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        self._run(
            self.bin_dir / "initdb",
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
            conf.write(_SETTINGS.format(port=self.port, socket_dir=self.socket_dir))
        (self.data_dir / "pg_hba.conf").write_text(_HBA)
        self._initialized = True

    def start(self, timeout: float = 30.0) -> None:
        self.init()
        self._run(
            self.bin_dir / "pg_ctl",
            "start",
            "-D",
            self.data_dir,
            "-l",
            self.log_file,
            "-w",
            "-t",
            str(int(timeout)),
            timeout=timeout + 5,
        )
        self._wait_ready(timeout)

    def stop(self, mode: str = "fast", timeout: float = 10.0) -> None:
        """`fast` disconnects every client (what a restart does to the application); if
        the server has not stopped within `timeout`, it is stopped `immediate`ly."""
        if not self.running:
            return
        try:
            self._pg_ctl_stop(mode, timeout)
        except (RuntimeError, subprocess.TimeoutExpired):
            if mode == "immediate":
                raise
            self._pg_ctl_stop("immediate", timeout)

    def _pg_ctl_stop(self, mode: str, timeout: float) -> None:
        self._run(
            self.bin_dir / "pg_ctl",
            "stop",
            "-D",
            self.data_dir,
            "-m",
            mode,
            "-w",
            "-t",
            str(int(timeout)),
            timeout=timeout + 5,
        )

    def restart(self, down_seconds: float = 0.0) -> None:
        """Stop, stay down for `down_seconds` (the outage being simulated), start."""
        self.stop()
        if down_seconds > 0:
            time.sleep(down_seconds)
        self.start()

    @property
    def running(self) -> bool:
        return self._initialized and (self.data_dir / "postmaster.pid").exists()

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.conninfo(), autocommit=True) as connection:
                    connection.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def remove(self) -> None:
        """Stop the server (immediately) and delete its directory."""
        if self._removed:
            return
        try:
            if self.running:
                self.stop(mode="immediate")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
            self._removed = True

    # --- databases -------------------------------------------------------------------

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.conninfo(), autocommit=True) as connection:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def create_app_database(self, name: str = "koinonia") -> str:
        """Create the application database and migrate it (alembic heads); its URL."""
        from alembic import command

        from koinonia.cli.database import alembic_config

        url = self.create_database(name)
        command.upgrade(alembic_config(url), "heads")
        return url

    # --- context manager -------------------------------------------------------------

    def __enter__(self) -> PgCluster:
        try:
            self.start()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()
