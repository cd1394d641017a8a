"""PgBouncer in production: its pool sizes from the process counts, its configuration
file and its SCRAM secrets.

The formula lives here once; docs/scaling.md ("PgBouncer in production") shows it and
`koinonia pgbouncer-config` prints it worked out for a deployment (and renders
`deploy/pgbouncer/pgbouncer.ini` with the results).

Who connects where (DATABASE_URL: PgBouncer; DATABASE_DIRECT_URL: PostgreSQL itself):

- an API process: its SQLAlchemy pool (P_a + O_a) through PgBouncer; the Telnyx webhook
  writer's pool (`WEBHOOK_WRITER_CONNECTIONS`) direct; one admin-console connection to
  PgBouncer for its metrics when `PGBOUNCER_ADMIN_URL` is set.
- a worker of concurrency C: the job queue's pool (C + `JOB_POOL_EXTRA`) and its LISTEN
  connection direct (LISTEN is session state, which transaction pooling drops); its
  SQLAlchemy pool (P_w + O_w), database probe and metrics refresher through DATABASE_URL
  (PgBouncer, or PostgreSQL when the workers' DATABASE_URL names it).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from dataclasses import dataclass

from sqlalchemy.engine import make_url

# What the code opens (kept equal to it by tests/platform/test_pgbouncer_config.py):
WEBHOOK_WRITER_CONNECTIONS = 2  # EventWriter(flushers=2): its pool's max_size
JOB_POOL_EXTRA = 2  # worker.py: the procrastinate pool is `concurrency + 2`
LISTEN_CONNECTIONS = 1  # procrastinate's LISTEN: a standalone connection beside its pool
WORKER_SIDE_CONNECTIONS = 2  # worker.py's database probe + worker_metrics' refresher
METRICS_CONSOLE_CONNECTIONS = 1  # per API process, to PgBouncer's admin console

# Choices (docs/scaling.md explains them):
SERVER_CONNECTIONS_PER_CPU = 4  # transactions worth running at once per primary vCPU
RESERVE_DIVISOR = 5  # a fifth of the server connections is the reserve pool
CLIENT_HEADROOM = 2  # old and new processes overlap during a rolling restart
CONSOLE_HEADROOM = 10  # operators' psql sessions to PgBouncer and its console

_PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")


class PoolPlanError(ValueError):
    """The inputs leave PgBouncer no server connection: the message says what to raise."""


@dataclass(frozen=True)
class Topology:
    """A deployment's process counts and pool settings, and its PostgreSQL's limits."""

    api_processes: int
    api_pool_size: int  # the API's DATABASE_POOL_SIZE
    api_max_overflow: int  # the API's DATABASE_MAX_OVERFLOW
    workers: int
    worker_concurrency: int
    worker_pool_size: int  # the workers' DATABASE_POOL_SIZE
    worker_max_overflow: int  # the workers' DATABASE_MAX_OVERFLOW
    # The workers' DATABASE_URL names PgBouncer (True) or PostgreSQL (False).
    workers_through_pgbouncer: bool = True
    max_connections: int = 100  # PostgreSQL's max_connections
    superuser_reserved: int = 3  # PostgreSQL's superuser_reserved_connections
    # Direct sessions kept free for people and tools: `koinonia migrate`, psql,
    # pgBackRest's backup connection, monitoring, PgBouncer's auth_user.
    admin_reserved: int = 10
    primary_cpus: int = 0  # 0: no cap from the primary's size

    def __post_init__(self) -> None:
        for name in (
            "api_processes",
            "api_pool_size",
            "workers",
            "worker_concurrency",
            "max_connections",
        ):
            if getattr(self, name) < (0 if name == "workers" else 1):
                raise PoolPlanError(f"{name} must be at least {0 if name == 'workers' else 1}")
        for name in (
            "api_max_overflow",
            "worker_pool_size",
            "worker_max_overflow",
            "superuser_reserved",
            "admin_reserved",
            "primary_cpus",
        ):
            if getattr(self, name) < 0:
                raise PoolPlanError(f"{name} must not be negative")


@dataclass(frozen=True)
class PoolPlan:
    topology: Topology
    api_clients: int  # A × (P_a + O_a)
    worker_clients: int  # W × (P_w + O_w + 2), through PgBouncer or direct
    pooled_clients: int  # client connections into PgBouncer, steady state
    direct: int  # connections that bypass PgBouncer
    server_budget: int  # what max_connections leaves PgBouncer
    server_demand: int  # the most transactions the clients can run at once
    server_connections: int  # max_db_connections = default_pool_size + reserve_pool_size
    default_pool_size: int
    reserve_pool_size: int
    max_client_conn: int
    max_connections_without_waiting: int  # PostgreSQL max_connections for demand ≤ budget

    def ini_values(self) -> dict[str, str]:
        """The template's pool placeholders."""
        return {
            "DEFAULT_POOL_SIZE": str(self.default_pool_size),
            "RESERVE_POOL_SIZE": str(self.reserve_pool_size),
            "MAX_DB_CONNECTIONS": str(self.server_connections),
            "MAX_CLIENT_CONN": str(self.max_client_conn),
        }

    def ini_section(self) -> str:
        """The `[pgbouncer]` pool settings, with the arithmetic as comments."""
        lines = [f"; {line}" for line in self.explain()]
        lines += [
            f"default_pool_size = {self.default_pool_size}",
            f"reserve_pool_size = {self.reserve_pool_size}",
            f"max_db_connections = {self.server_connections}",
            f"max_client_conn = {self.max_client_conn}",
        ]
        return "\n".join(lines) + "\n"

    def explain(self) -> list[str]:
        t = self.topology
        worker_side = f"W × (P_w + O_w + {WORKER_SIDE_CONNECTIONS})"
        return [
            f"A={t.api_processes} API processes (P_a={t.api_pool_size}, "
            f"O_a={t.api_max_overflow}), W={t.workers} workers (C={t.worker_concurrency}, "
            f"P_w={t.worker_pool_size}, O_w={t.worker_max_overflow}, "
            f"{'through PgBouncer' if t.workers_through_pgbouncer else 'direct'})",
            "clients into PgBouncer = A × (P_a + O_a)"
            + (f" + {worker_side}" if t.workers_through_pgbouncer else "")
            + f" = {self.pooled_clients}",
            f"direct to PostgreSQL = A × {WEBHOOK_WRITER_CONNECTIONS}"
            f" + W × (C + {JOB_POOL_EXTRA} + {LISTEN_CONNECTIONS})"
            + ("" if t.workers_through_pgbouncer else f" + {worker_side}")
            + f" = {self.direct}",
            f"server budget = max_connections {t.max_connections}"
            f" - superuser_reserved {t.superuser_reserved}"
            f" - admin_reserved {t.admin_reserved} - direct {self.direct}"
            f" = {self.server_budget}",
            f"server connections = min(clients {self.server_demand}, budget "
            f"{self.server_budget}"
            + (
                f", {SERVER_CONNECTIONS_PER_CPU} × {t.primary_cpus} vCPUs"
                if t.primary_cpus
                else ""
            )
            + f") = {self.server_connections}"
            f" = default_pool_size {self.default_pool_size}"
            f" + reserve_pool_size {self.reserve_pool_size} (a {RESERVE_DIVISOR}th)",
            f"max_client_conn = {CLIENT_HEADROOM} × (clients + A × "
            f"{METRICS_CONSOLE_CONNECTIONS}) + {CONSOLE_HEADROOM} = {self.max_client_conn}",
            f"the budget covers every client from max_connections "
            f"{self.max_connections_without_waiting} on",
        ]


def plan_pools(topology: Topology) -> PoolPlan:
    """PgBouncer's pool sizes for `topology` (docs/scaling.md shows the formula)."""
    t = topology
    api_clients = t.api_processes * (t.api_pool_size + t.api_max_overflow)
    worker_clients = t.workers * (
        t.worker_pool_size + t.worker_max_overflow + WORKER_SIDE_CONNECTIONS
    )
    pooled = api_clients + (worker_clients if t.workers_through_pgbouncer else 0)
    direct = (
        t.api_processes * WEBHOOK_WRITER_CONNECTIONS
        + t.workers * (t.worker_concurrency + JOB_POOL_EXTRA + LISTEN_CONNECTIONS)
        + (0 if t.workers_through_pgbouncer else worker_clients)
    )
    reserved = t.superuser_reserved + t.admin_reserved
    budget = t.max_connections - reserved - direct
    # A client connection runs one transaction at a time: more server connections than
    # clients would never be used.
    demand = pooled
    if budget < 1:
        raise PoolPlanError(
            f"max_connections {t.max_connections} leaves PgBouncer no server connection: "
            f"{reserved} are reserved and {direct} go direct; raise it to at least "
            f"{reserved + direct + demand}"
        )
    caps = [demand, budget]
    if t.primary_cpus:
        caps.append(SERVER_CONNECTIONS_PER_CPU * t.primary_cpus)
    servers = max(1, min(caps))
    reserve = servers // RESERVE_DIVISOR
    return PoolPlan(
        topology=t,
        api_clients=api_clients,
        worker_clients=worker_clients,
        pooled_clients=pooled,
        direct=direct,
        server_budget=budget,
        server_demand=demand,
        server_connections=servers,
        default_pool_size=servers - reserve,
        reserve_pool_size=reserve,
        max_client_conn=CLIENT_HEADROOM * (pooled + t.api_processes * METRICS_CONSOLE_CONNECTIONS)
        + CONSOLE_HEADROOM,
        max_connections_without_waiting=reserved + direct + demand,
    )


def server_values(database_url: str) -> dict[str, str]:
    """`PG_HOST`, `PG_PORT`, `PG_DATABASE` of the template from a direct database URL."""
    url = make_url(database_url)
    if not url.host or not url.database:
        raise ValueError("the direct database URL must name a host and a database")
    return {"PG_HOST": url.host, "PG_PORT": str(url.port or 5432), "PG_DATABASE": url.database}


TEMPLATE_DEFAULTS = {
    "LISTEN_ADDR": "127.0.0.1",
    "LISTEN_PORT": "6432",
    "CONF_DIR": "/etc/pgbouncer",
    "RUN_DIR": "/var/run/postgresql",
    "LOG_DIR": "/var/log/postgresql",
}


def placeholders(template: str) -> set[str]:
    return set(_PLACEHOLDER.findall(template))


def render(template: str, values: dict[str, str]) -> str:
    """Fill every `${NAME}` of `template`; a name without a value is an error (listed)."""
    missing = sorted(placeholders(template) - values.keys())
    if missing:
        raise KeyError(f"no value for {', '.join(missing)}")
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


# --- SCRAM secrets for auth_file -------------------------------------------------------


def scram_sha256_secret(
    password: str, *, salt: bytes | None = None, iterations: int = 4096
) -> str:
    """A SCRAM-SHA-256 secret as PostgreSQL stores it (`pg_authid.rolpassword`) and
    PgBouncer's auth_file takes it: `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.

    For users only PgBouncer knows (its admin and stats users). The application role's
    secret must be copied from PostgreSQL instead: PgBouncer logs in to the server with
    the keys of the client's proof, which work only against the server's own secret.
    Printable ASCII only: PostgreSQL applies SASLprep, which leaves ASCII unchanged.
    """
    if not password or not all(" " <= char <= "~" for char in password):
        raise ValueError("the password must be non-empty printable ASCII")
    salt = salt if salt is not None else os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def userlist_line(user: str, secret: str) -> str:
    """One auth_file line: `"user" "secret"` (a double quote is written twice)."""

    def quote(value: str) -> str:
        return '"' + value.replace('"', '""') + '"'

    return f"{quote(user)} {quote(secret)}"
