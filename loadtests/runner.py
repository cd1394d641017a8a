"""Koinonia's load test: artillery (open model) against one API process through PgBouncer.

    loadtests/run --smoke                # 60 s at 30 arrivals/s: the last stage of scripts/test
    loadtests/run                        # full: ramp 10->50/s, 240 s at 50, 60 s at 75, 60 s at 50
    loadtests/run --rate 40 --peak-rate 90 --steady-seconds 120 --timeline
    loadtests/run --phases 30:5-50,120:50,30:90     # SECONDS:RATE[-RATE_TO],...
    .venv/bin/python -m loadtests.report DIR/report.json    # the table of a kept report

`loadtests/run` installs artillery (`npm ci` from package-lock.json) when
loadtests/node_modules is missing, then runs this module with the project's virtualenv.

What runs, all on 127.0.0.1: a scratch database created and migrated by `koinonia migrate`
(PostgreSQL on 5432), Redis DB 10 (flushed at start), and three server processes pinned
with `taskset -c 0`: the sandbox (`koinonia sandbox`, Telnyx + Stripe, sending signed
receipts for every text), ONE API process (`koinonia api`: uvicorn, one worker) whose
DATABASE_URL goes through PgBouncer in transaction mode (127.0.0.1:6432, database = the
scratch database), and one worker (`koinonia worker`, to PostgreSQL directly, as
deployed). Artillery runs pinned with `taskset -c 1`. PostgreSQL, PgBouncer and Redis are
the machine's own services and are not pinned. Readiness is polled with deadlines.

Seeding (not measured): churches registered through the API, each given a sending number,
a window open all day and a segment grant (`bench.common.give_number`), ~1,000 members
COPYed into one group (`bench.common.copy_members`), small groups of a few members made
through the API (broadcasts go to these, so the sandbox is not flooded), staff users
created and logged in (their JWTs go to artillery in the payload CSV) and conversations
opened with some members. Rate limits stay on (no allow-list) with `RATE_LIMIT_PER_MINUTE`
and `RATE_LIMIT_BURST` set above the whole offered rate.

The workload is workload.yml: staff browsing, broadcasts, inbox replies, a storm of
signed delivery receipts and inbound texts (signed per request by processor.js with the
sandbox's Ed25519 key; the API verifies them for real). Afterwards the per-endpoint
table (p50/p95/p99/max, status codes, errors) is printed from artillery's JSON report, with
the CPU each process used, what the run made and the worker's backlog; `--timeline` (and
any failure) adds every 10-second period beside the CPU of each process. The exit status
is 1 on any 5xx, any request without an answer (ETIMEDOUT, ECONNREFUSED, ...) or any
unexpected 4xx (`--allow-4xx` only reports those). Whatever happens (SIGTERM, SIGINT and
SIGHUP included), every process started is stopped and the scratch database dropped; the
children also get SIGTERM should this runner be killed outright.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import csv
import ctypes
import json
import math
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import psycopg
from psycopg import sql

from loadtests.report import summarise, table

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "loadtests"
ARTILLERY = HERE / "node_modules" / ".bin" / "artillery"
WORKLOAD = HERE / "workload.yml"
ADMIN_URL = os.environ.get(
    "LOADTEST_DATABASE_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
PG_HOSTPORT = os.environ.get("LOADTEST_PG_HOSTPORT", "127.0.0.1:5432")
PGBOUNCER_HOSTPORT = os.environ.get("LOADTEST_PGBOUNCER_HOSTPORT", "127.0.0.1:6432")
# tests use 15, the contract test 11, the benches 12-14
REDIS_URL = os.environ.get("LOADTEST_REDIS_URL", "redis://127.0.0.1:6379/10")
PASSWORD = "load-test-password-123"  # noqa: S105 - scratch users only
AREA = "737"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(f"loadtest: {message}", flush=True)


# --- phases -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    seconds: int
    rate: float
    ramp_to: float | None = None
    name: str = ""

    @property
    def peak(self) -> float:
        return max(self.rate, self.ramp_to or 0.0)

    @property
    def arrivals(self) -> float:
        return self.seconds * (self.rate + (self.ramp_to or self.rate)) / 2

    def artillery(self) -> dict[str, Any]:
        # A steady phase is given as a ramp from R to R too: artillery times plain
        # `arrivalRate` phases with a timer that spins on setImmediate (a whole core at
        # 50/s), ramps with one that sleeps (about a quarter of the CPU, same arrivals).
        spec: dict[str, Any] = {
            "duration": self.seconds,
            "arrivalRate": self.rate,
            "rampTo": self.rate if self.ramp_to is None else self.ramp_to,
        }
        if self.name:
            spec["name"] = self.name
        return spec

    def describe(self) -> str:
        rate = f"{self.rate:g}" + (f"→{self.ramp_to:g}" if self.ramp_to is not None else "")
        return f"{self.name or 'phase'} {self.seconds} s at {rate}/s"


def parse_phases(text: str) -> list[Phase]:
    phases = []
    for number, entry in enumerate(filter(None, (e.strip() for e in text.split(","))), 1):
        seconds, sep, rates = entry.partition(":")
        start, _, end = rates.partition("-")
        try:
            phase = Phase(int(seconds), float(start), float(end) if end else None, f"p{number}")
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad phase {entry!r}: SECONDS:RATE[-RATE]") from None
        if not sep or phase.seconds < 1 or phase.rate < 0 or (phase.ramp_to or 0) < 0:
            raise argparse.ArgumentTypeError(f"bad phase {entry!r}: SECONDS:RATE[-RATE]")
        phases.append(phase)
    if not phases:
        raise argparse.ArgumentTypeError("no phase given")
    return phases


def plan(args: argparse.Namespace) -> list[Phase]:
    """The phases: --phases as given, else the smoke or full preset from the rates."""
    if args.phases:
        phases: list[Phase] = args.phases
        return phases
    rate = args.rate
    if args.smoke:
        warm = min(10, max(1, args.duration // 6))
        return [
            Phase(warm, max(1.0, rate / 3), rate, "warm-up"),
            Phase(args.duration - warm, rate, None, "steady"),
        ]
    return [
        Phase(60, max(1.0, rate / 5), rate, "ramp"),
        Phase(args.steady_seconds, rate, None, "steady"),
        Phase(60, args.peak_rate, None, "peak"),
        Phase(60, rate, None, "recovery"),
    ]


# --- processes ----------------------------------------------------------------------------

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if this runner dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Services:
    logs: Path
    taskset: str | None
    running: list[Service] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str], cpus: str | None) -> Service:
        command = [self.taskset, "-c", cpus, *argv] if self.taskset and cpus else argv
        log_path = self.logs / f"{name}.log"
        with log_path.open("ab") as out:
            process = subprocess.Popen(  # noqa: S603 - our own executables, no shell
                command,
                env=env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,  # before any thread is started
            )
        service = Service(name, process, log_path)
        self.running.append(service)
        return service

    def check(self) -> None:
        for service in self.running:
            if service.process.poll() is not None:
                raise RuntimeError(
                    f"{service.name} exited ({service.process.returncode}); its log ends:\n"
                    f"{service.tail()}"
                )

    def stop(self, service: Service, timeout: float = 20.0, *, signalled: bool = False) -> None:
        """SIGTERM (once: a second one tells the worker to abort its jobs), wait, then
        SIGKILL past `timeout`."""
        if service.process.poll() is None:
            if not signalled:
                service.process.send_signal(signal.SIGTERM)
            try:
                service.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                service.process.kill()
                service.process.wait()
        if service in self.running:
            self.running.remove(service)

    def stop_all(self) -> None:
        """All at once: SIGTERM to each, then wait for each."""
        services = list(reversed(self.running))
        for service in services:
            if service.process.poll() is None:
                service.process.send_signal(signal.SIGTERM)
        for service in services:
            self.stop(service, signalled=True)


def wait_until(
    what: str, ready: Callable[[], bool], services: Services, seconds: float = 60.0
) -> None:
    """Poll `ready` until it answers True; fail at the deadline or if a service died."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        services.check()
        with contextlib.suppress(httpx.HTTPError, psycopg.Error, OSError):
            if ready():
                return
        time.sleep(0.1)
    services.check()
    raise TimeoutError(f"{what} was not ready within {seconds:g} s")


def http_ok(url: str) -> Callable[[], bool]:
    return lambda: httpx.get(url, timeout=2).status_code == 200


def workers_registered(database_url: str) -> Callable[[], bool]:
    def ready() -> bool:
        with psycopg.connect(database_url, autocommit=True, connect_timeout=2) as connection:
            row = connection.execute("SELECT count(*) FROM procrastinate_workers").fetchone()
        return row is not None and int(row[0]) >= 1

    return ready


# --- the scratch database -----------------------------------------------------------------


@contextlib.contextmanager
def scratch_database(services: Services, env: dict[str, str]) -> Iterator[str]:
    """A new database, created and migrated by `koinonia migrate`; dropped on the way out."""
    name = f"koinonia_loadtest_{uuid.uuid4().hex[:10]}"
    url = f"postgresql://postgres@{PG_HOSTPORT}/{name}"
    try:
        migrate = services.start(
            "migrate", [str(ROOT / ".venv/bin/koinonia"), "migrate"], env | {"DATABASE_URL": url},
            None,
        )  # fmt: skip
        try:
            code = migrate.process.wait(timeout=180)
        finally:
            services.stop(migrate)
        if code != 0:
            raise RuntimeError(f"koinonia migrate failed ({code}):\n{migrate.tail()}")
        yield name
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
        log(f"dropped database {name}")


# --- seeding ------------------------------------------------------------------------------


@dataclass
class Church:
    index: int
    id: uuid.UUID
    owner_token: str
    number: str
    phones: list[str]
    big_group: uuid.UUID | None = None
    members: dict[int, uuid.UUID] = field(default_factory=dict)  # member index → id
    small_groups: list[uuid.UUID] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    conversations: dict[int, uuid.UUID] = field(default_factory=dict)  # member index → id


def phone_of(church: int, member: int) -> str:
    """Distinct valid US numbers (lines 1000-9999: never the 0000-0002 the sandbox refuses)."""
    i = church * 10_000 + member
    return f"+1{AREA}{200 + i // 9000}{1000 + i % 9000:04d}"


def number_of(church: int) -> str:
    return f"+1{AREA}555{1000 + church:04d}"


def _json(response: httpx.Response, expected: int) -> Any:
    if response.status_code != expected:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path} answered "
            f"{response.status_code}: {response.text[:500]}"
        )
    return response.json()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def register(client: httpx.AsyncClient, index: int, members: int) -> Church:
    answer = _json(
        await client.post(
            "/api/v1/auth/register",
            json={
                "church_name": f"Load Test Church {index}",
                "name": f"Pastor {index}",
                "email": f"pastor-{index}-{uuid.uuid4().hex[:8]}@loadtest.example.org",
                "password": PASSWORD,
            },
        ),
        201,
    )
    return Church(
        index=index,
        id=uuid.UUID(answer["church"]["id"]),
        owner_token=str(answer["access_token"]),
        number=number_of(index),
        phones=[phone_of(index, j) for j in range(members)],
    )


async def give_numbers(settings: Any, churches: list[Church], segments: int) -> None:
    from bench.common import give_number

    from koinonia.db import Database

    database = Database(settings)
    try:
        for church in churches:
            await give_number(database, settings, church.id, church.number, segments)
    finally:
        await database.dispose()


async def staff_and_groups(
    client: httpx.AsyncClient, church: Church, args: argparse.Namespace
) -> None:
    owner = bearer(church.owner_token)
    church.tokens.append(church.owner_token)
    for k in range(args.small_groups):
        group = _json(
            await client.post("/api/v1/groups", json={"name": f"Small group {k}"}, headers=owner),
            201,
        )
        ids = [church.members[k * args.group_size + j] for j in range(args.group_size)]
        _json(
            await client.post(
                f"/api/v1/groups/{group['id']}/members", json={"member_ids": [str(i) for i in ids]},
                headers=owner,
            ),
            200,
        )  # fmt: skip
        church.small_groups.append(uuid.UUID(group["id"]))
    for s in range(args.staff):
        email = f"staff-{church.index}-{s}-{uuid.uuid4().hex[:6]}@loadtest.example.org"
        _json(
            await client.post(
                "/api/v1/users",
                json={"email": email, "name": f"Staff {s}", "role": "staff", "password": PASSWORD},
                headers=owner,
            ),
            201,
        )
        login = _json(
            await client.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD}),
            200,
        )
        church.tokens.append(str(login["access_token"]))
    for j in range(args.conversations):
        conversation = _json(
            await client.post(
                "/api/v1/conversations",
                json={"member_id": str(church.members[j])},
                headers=bearer(church.tokens[j % len(church.tokens)]),
            ),
            201,
        )
        church.conversations[j] = uuid.UUID(conversation["id"])


def member_ids(database_url: str, church: Church) -> None:
    with psycopg.connect(database_url) as connection:
        rows = connection.execute(
            "SELECT id, first_name FROM members WHERE church_id = %s", (church.id,)
        ).fetchall()
    for member_id, first_name in rows:
        if first_name and first_name.startswith("Member"):
            church.members[int(first_name.removeprefix("Member"))] = member_id


def search_term(rng: random.Random, church: Church) -> str:
    """A name fragment (most searches), the last name (every member) or an exact phone."""
    roll = rng.random()
    if roll < 0.7:
        return f"member{rng.randrange(1, 100)}"
    if roll < 0.8:
        return "bench"
    return rng.choice(church.phones)


def write_payload(path: Path, churches: list[Church], seed: int) -> int:
    rng = random.Random(seed)
    rows = 0
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(
            ["token", "church_id", "group_id", "conversation_id", "search", "member_phone",
             "church_number"]
        )  # fmt: skip
        for church in churches:
            for token in church.tokens:
                for j, conversation in church.conversations.items():
                    writer.writerow(
                        [
                            token,
                            church.id,
                            rng.choice(church.small_groups),
                            conversation,
                            search_term(rng, church),
                            church.phones[j],
                            church.number,
                        ]
                    )
                    rows += 1
    return rows


# --- measuring ----------------------------------------------------------------------------


def proc_cpu(pid: int) -> tuple[str, float] | None:
    """(command name, CPU seconds) of a live process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return raw[raw.index("(") + 1 : raw.rindex(")")], (
        int(fields[11]) + int(fields[12])
    ) / CLOCK_TICKS


def every_process() -> dict[int, tuple[str, float]]:
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (cpu := proc_cpu(int(entry))) is not None:
            found[int(entry)] = cpu
    return found


def machine_busy() -> float:
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / CLOCK_TICKS


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def backend_pids(database_url: str) -> set[int]:
    with psycopg.connect(database_url, autocommit=True) as connection:
        rows = connection.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()"
        ).fetchall()
    return {int(row[0]) for row in rows}


@dataclass
class Cpu:
    """CPU used during the load by each server process, artillery, this database's
    PostgreSQL backends, PgBouncer and Redis; `other` is the rest of the machine (another
    program running at the same time shows there)."""

    roles: dict[str, int]
    database_url: str
    at: float = 0.0
    before: dict[int, tuple[str, float]] = field(default_factory=dict)
    machine: float = 0.0
    children: float = 0.0  # CPU of the children this process has waited for

    def start(self) -> None:
        self.at = time.monotonic()
        self.children = children_cpu()
        self.before = every_process()
        self.machine = machine_busy()

    def report(self) -> str:
        wall = time.monotonic() - self.at
        machine = machine_busy() - self.machine
        # Artillery has exited (so /proc has no figure for it) and been waited for.
        used = dict.fromkeys(self.roles, 0.0) | {"artillery": children_cpu() - self.children}
        used |= {"postgres": 0.0, "pgbouncer": 0.0, "redis": 0.0}
        backends = backend_pids(self.database_url)
        by_pid = {pid: role for role, pid in self.roles.items()}
        for pid, (name, seconds) in every_process().items():
            start = self.before.get(pid)
            delta = seconds - (start[1] if start is not None and start[0] == name else 0.0)
            if pid in by_pid:
                used[by_pid[pid]] += delta
            elif pid in backends:
                used["postgres"] += delta
            elif name == "pgbouncer":
                used["pgbouncer"] += delta
            elif name.startswith("redis-server"):
                used["redis"] += delta
        used["other"] = max(0.0, machine - sum(used.values()))
        parts = [f"{role} {100 * s / wall:.0f} %" for role, s in used.items()]
        cores = os.cpu_count() or 1
        return (
            f"CPU over {wall:.0f} s (% of one core): {', '.join(parts)}; machine busy "
            f"{100 * machine / (wall * cores):.0f} % of {cores} cores"
        )


class Sampler(threading.Thread):
    """CPU per role every `every` seconds during the load (a stall shows which process
    ran, or whether something else on the machine did): (wall time, % of one core)."""

    def __init__(self, roles: dict[str, int], every: float = 2.0) -> None:
        super().__init__(name="cpu-sampler", daemon=True)
        self.roles = roles
        self.every = every
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.halt = threading.Event()

    def _read(self) -> tuple[float, dict[str, float]]:
        by_pid = {pid: role for role, pid in self.roles.items()}
        seconds = dict.fromkeys([*self.roles, "postgres"], 0.0)
        for pid, (name, cpu) in every_process().items():
            if pid in by_pid:
                seconds[by_pid[pid]] += cpu
            elif name == "postgres":
                seconds["postgres"] += cpu
        seconds["machine"] = machine_busy()
        return time.time(), seconds

    def run(self) -> None:
        at, last = self._read()
        while not self.halt.wait(self.every):
            now, current = self._read()
            used = {k: max(0.0, 100 * (current[k] - last[k]) / (now - at)) for k in current}
            used["other"] = max(0.0, used.pop("machine") - sum(used.values()))
            self.samples.append((now, used))
            at, last = now, current

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=10)

    def over(self, start: float, end: float) -> dict[str, float]:
        """Mean % of one core per role over samples ending in [start, end)."""
        inside = [used for at, used in self.samples if start <= at < end]
        if not inside:
            return {}
        return {k: sum(u[k] for u in inside) / len(inside) for k in inside[0]}


def timeline(report: dict[str, Any], sampler: Sampler) -> str:
    """Artillery's 10-second periods beside the CPU of each process in the same window."""
    roles = ["api", "worker", "sandbox", "artillery", "postgres", "other"]
    header = f"{'period':>8} {'arrivals':>8} {'answers':>7} {'p50 ms':>7} {'p99 ms':>7} "
    header += f"{'no answer':>9} {'5xx':>4}  " + " ".join(f"{r:>9}" for r in roles)
    lines = [header, "  (CPU: % of one core; postgres = every database, other = the rest)"]
    for period in report.get("intermediate", []):
        counters: dict[str, int] = period.get("counters", {})
        times: dict[str, float] = period.get("summaries", {}).get("http.response_time", {})
        start = int(period["period"]) / 1000
        cpu = sampler.over(start, start + 10)
        errors = sum(v for k, v in counters.items() if k.startswith("errors."))
        fives = sum(v for k, v in counters.items() if k.startswith("http.codes.5"))
        lines.append(
            f"{time.strftime('%H:%M:%S', time.localtime(start)):>8} "
            f"{counters.get('vusers.created', 0):>8} {counters.get('http.responses', 0):>7} "
            f"{times.get('median', math.nan):>7.0f} {times.get('p99', math.nan):>7.0f} "
            f"{errors:>9} {fives:>4}  "
            + " ".join(f"{cpu[r]:>8.0f}%" if r in cpu else f"{'-':>9}" for r in roles)
        )
    return "\n".join(lines)


def backlog(database_url: str) -> dict[str, int]:
    with psycopg.connect(database_url, autocommit=True) as connection:
        events = connection.execute(
            "SELECT count(*) FROM webhook_events WHERE provider = 'telnyx' AND processed_at IS NULL"
        ).fetchone()
        recipients = connection.execute(
            "SELECT count(*) FROM message_recipients WHERE status IN ('queued', 'sending')"
        ).fetchone()
        replies = connection.execute(
            "SELECT count(*) FROM conversation_messages WHERE direction = 'outbound' "
            "AND status IN ('queued', 'sending')"
        ).fetchone()
    return {
        "webhook events to apply": int(events[0]) if events else 0,
        "broadcast texts to send": int(recipients[0]) if recipients else 0,
        "replies to send": int(replies[0]) if replies else 0,
    }


def totals(database_url: str) -> dict[str, int]:
    with psycopg.connect(database_url, autocommit=True) as connection:
        row = connection.execute(
            "SELECT (SELECT count(*) FROM webhook_events WHERE provider = 'telnyx'), "
            "(SELECT count(*) FROM messages), "
            "(SELECT count(*) FROM message_recipients), "
            "(SELECT count(*) FROM conversation_messages WHERE direction = 'inbound'), "
            "(SELECT count(*) FROM conversation_messages WHERE direction = 'outbound')"
        ).fetchone()
    names = ["webhook events stored", "broadcasts", "broadcast texts", "inbound texts",
             "replies"]  # fmt: skip
    return dict(zip(names, (int(v) for v in row or ()), strict=False))


# --- main ---------------------------------------------------------------------------------


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="loadtests/run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--smoke", action="store_true", help="CI size: 60 s at 30 arrivals/s (10 s warm-up)"
    )
    parser.add_argument("--rate", type=float, help="steady arrivals/s (smoke 30, full 50)")
    parser.add_argument("--peak-rate", type=float, help="full run's peak arrivals/s (75)")
    parser.add_argument("--duration", type=int, default=60, help="smoke: total seconds (60)")
    parser.add_argument(
        "--steady-seconds", type=int, default=240, help="full run: the steady phase (240)"
    )
    parser.add_argument(
        "--phases", type=parse_phases, help="SECONDS:RATE[-RATE_TO],... instead of a preset"
    )
    parser.add_argument("--churches", type=int, default=3)
    parser.add_argument("--members", type=int, default=1000, help="members per church")
    parser.add_argument("--staff", type=int, default=2, help="staff users per church (+ owner)")
    parser.add_argument("--small-groups", type=int, default=4, help="per church")
    parser.add_argument("--group-size", type=int, default=5, help="members per small group")
    parser.add_argument("--conversations", type=int, default=30, help="opened per church")
    parser.add_argument("--worker-concurrency", type=int, default=8)
    parser.add_argument("--server-cpus", default="0", help="taskset list for the servers")
    parser.add_argument("--artillery-cpus", default="1", help="taskset list for artillery")
    parser.add_argument(
        "--drain-seconds", type=float, help="wait for the worker's backlog (smoke 10, full 60)"
    )
    parser.add_argument("--allow-4xx", action="store_true", help="report 4xx, do not fail")
    parser.add_argument(
        "--timeline",
        action="store_true",
        help="print every 10 s period with the CPU of each process (always on failure)",
    )
    parser.add_argument(
        "--output", type=Path, help="keep logs, payload and report.json in this directory"
    )
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    if args.rate is None:
        args.rate = 30.0 if args.smoke else 50.0
    if args.peak_rate is None:
        args.peak_rate = 75.0
    if args.drain_seconds is None:
        args.drain_seconds = 10.0 if args.smoke else 60.0
    if args.duration < 2 or args.steady_seconds < 1 or args.rate <= 0 or args.peak_rate <= 0:
        parser.error("--duration, --steady-seconds, --rate and --peak-rate must be positive")
    needed = args.small_groups * args.group_size
    if args.members < max(needed, args.conversations, 100) or args.members > 9000:
        parser.error(
            "--members must be 100..9000 and cover --small-groups x --group-size and "
            "--conversations"
        )
    if not 1 <= args.churches <= 999 or args.small_groups < 1 or args.group_size < 1:
        parser.error("--churches (1..999), --small-groups and --group-size must be positive")
    if args.conversations < 1 or args.staff < 0:
        parser.error("--conversations must be positive, --staff at least 0")
    return args


def _raise_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    args = arguments()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_on_signal)
    if not ARTILLERY.exists():
        log(f"{ARTILLERY} is missing: run loadtests/run (it installs artillery with npm ci)")
        return 2
    phases = plan(args)
    taskset = shutil.which("taskset")
    if taskset is None or (os.cpu_count() or 1) < 2:
        log("taskset missing or a single CPU: processes are not pinned")
        taskset = None
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
        workdir = args.output.resolve()
    else:
        workdir = Path(tempfile.mkdtemp(prefix="koinonia-loadtest-"))
    ok = False
    try:
        ok = run(args, phases, workdir, taskset)
    except (RuntimeError, TimeoutError, OSError, psycopg.Error, httpx.HTTPError) as error:
        log(f"FAILED: {type(error).__name__}: {error}")
    finally:
        if args.output is None and ok:
            shutil.rmtree(workdir, ignore_errors=True)
        elif args.output is None:
            log(f"logs, payload and artillery's report kept in {workdir}")
    return 0 if ok else 1


def run(args: argparse.Namespace, phases: list[Phase], workdir: Path, taskset: str | None) -> bool:
    from koinonia.sandbox.signing import load_telnyx_key, public_key_b64

    started = time.monotonic()
    peak = max(p.peak for p in phases)
    seconds = sum(p.seconds for p in phases)
    arrivals = sum(p.arrivals for p in phases)
    log(
        f"{'smoke' if args.smoke else 'full'} run: {', '.join(p.describe() for p in phases)} "
        f"= {seconds} s, ~{arrivals:,.0f} requests; {args.churches} churches x "
        f"{args.members:,} members"
    )
    seed = base64.b64encode(os.urandom(32)).decode()
    sandbox_port, api_port = free_port(), free_port()
    sandbox_url, api_url = f"http://127.0.0.1:{sandbox_port}", f"http://127.0.0.1:{api_port}"
    # The whole offered rate fits in ONE token's limit: never refused, yet enforced.
    # (The settings want RATE_LIMIT_BURST >= RATE_LIMIT_PER_MINUTE.)
    per_minute = max(600, math.ceil(peak * 60 * 1.5))
    burst = per_minute
    env = {k: v for k, v in os.environ.items() if not k.startswith("RATE_LIMIT_")} | {
        "KOINONIA_ENV": "development",
        "REDIS_URL": REDIS_URL,
        "LOG_LEVEL": "WARNING",
        "API_HOST": "127.0.0.1",
        "API_PORT": str(api_port),
        "PUBLIC_BASE_URL": api_url,
        "TELNYX_BASE_URL": sandbox_url,
        "STRIPE_BASE_URL": sandbox_url,
        "TELNYX_PUBLIC_KEY": public_key_b64(load_telnyx_key(seed)),
        "RATE_LIMIT_PER_MINUTE": str(per_minute),
        "RATE_LIMIT_BURST": str(burst),
        "RATE_LIMIT_LOGIN_PER_MINUTE": "600",  # seeding logs in a few users at once
        "ACCESS_TOKEN_TTL_SECONDS": "86400",
        "API_SHUTDOWN_SECONDS": "5",
        "WORKER_SHUTDOWN_SECONDS": "10",
        "WORKER_METRICS_PORT": "0",
        "SANDBOX_TELNYX_PRIVATE_KEY": seed,
        "SANDBOX_TELNYX_WEBHOOK_URL": f"{api_url}/api/v1/webhooks/telnyx",
        "SANDBOX_STRIPE_WEBHOOK_URL": f"{api_url}/api/v1/webhooks/stripe",
        "SANDBOX_PUBLIC_BASE_URL": sandbox_url,
        "SANDBOX_TELNYX_RECEIPTS": "on",
    }
    from redis import Redis

    with contextlib.closing(Redis.from_url(REDIS_URL)) as redis:
        redis.flushdb()
    koinonia = str(ROOT / ".venv/bin/koinonia")
    services = Services(workdir, taskset)
    cpus = args.server_cpus
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: log(f"stopped everything at {time.monotonic() - started:.1f} s"))
        stack.callback(services.stop_all)  # also before the database is dropped
        sandbox = services.start(
            "sandbox", [koinonia, "sandbox", "--port", str(sandbox_port)], env, cpus
        )
        name = stack.enter_context(scratch_database(services, env))
        stack.callback(services.stop_all)
        direct = f"postgresql://postgres@{PG_HOSTPORT}/{name}"
        pooled = f"postgresql://postgres@{PGBOUNCER_HOSTPORT}/{name}"
        api = services.start(
            "api", [koinonia, "api", "--workers", "1", "--port", str(api_port)],
            env | {"DATABASE_URL": pooled}, cpus,
        )  # fmt: skip
        wait_until("the sandbox", http_ok(f"{sandbox_url}/sandbox/faults"), services)
        wait_until("the API", http_ok(f"{api_url}/readyz"), services)
        log(
            f"migrated {name}; sandbox and API (through PgBouncer {PGBOUNCER_HOSTPORT}) "
            f"ready at {time.monotonic() - started:.1f} s"
        )
        worker, _ = seed_all(args, services, env, direct, api_url, workdir)
        roles = {
            "api": api.process.pid,
            "worker": worker.process.pid,
            "sandbox": sandbox.process.pid,
        }
        log(f"seeded at {time.monotonic() - started:.1f} s")
        return load(args, phases, services, roles, workdir, api_url, seed, direct)
    raise AssertionError("unreachable")  # the ExitStack never swallows an exception


def seed_all(
    args: argparse.Namespace,
    services: Services,
    env: dict[str, str],
    direct: str,
    api_url: str,
    workdir: Path,
) -> tuple[Service, list[Church]]:
    from bench.common import copy_members, settings_for

    settings = settings_for(f"postgresql+psycopg://{direct.removeprefix('postgresql://')}")

    async def registered() -> list[Church]:
        async with httpx.AsyncClient(base_url=api_url, timeout=60) as client:
            return list(
                await asyncio.gather(
                    *(register(client, i, args.members) for i in range(args.churches))
                )
            )

    churches = asyncio.run(registered())
    asyncio.run(give_numbers(settings, churches, segments=1_000_000))
    # The worker starts now (its start-up overlaps the rest of the seeding): the numbers
    # are assigned, so the provisioning jobs that registration deferred find nothing to do.
    worker = services.start(
        "worker",
        [str(ROOT / ".venv/bin/koinonia"), "worker", "--concurrency",
         str(args.worker_concurrency)],
        env | {"DATABASE_URL": direct},
        args.server_cpus,
    )  # fmt: skip
    for church in churches:
        church.big_group = copy_members(direct, settings, church.id, church.phones)
        member_ids(direct, church)

    async def staffed() -> None:
        async with httpx.AsyncClient(base_url=api_url, timeout=60) as client:
            await asyncio.gather(*(staff_and_groups(client, c, args) for c in churches))

    asyncio.run(staffed())
    limit = httpx.get(
        f"{api_url}/api/v1/groups", headers=bearer(churches[0].tokens[-1]), timeout=10
    ).headers.get("ratelimit-limit")
    if limit is None:
        raise RuntimeError("no RateLimit-Limit header: are the rate limits off (allow-list)?")
    rows = write_payload(workdir / "payload.csv", churches, args.seed)
    wait_until("the worker", workers_registered(direct), services)
    log(
        f"{len(churches)} churches x {args.members:,} members, {args.small_groups} groups of "
        f"{args.group_size} and {args.conversations} conversations each, "
        f"{sum(len(c.tokens) for c in churches)} staff tokens ({rows} payload rows); "
        f"rate limit {limit} per principal (burst) and {env['RATE_LIMIT_PER_MINUTE']}/min"
    )
    return worker, churches


def workload_names() -> list[str]:
    import yaml  # type: ignore[import-untyped]

    script = yaml.safe_load(WORKLOAD.read_text())
    names = []
    for scenario in script["scenarios"]:
        for step in scenario["flow"]:
            for request in step.values():
                if isinstance(request, dict) and "name" in request:
                    names.append(str(request["name"]))
    return names


def load(
    args: argparse.Namespace,
    phases: list[Phase],
    services: Services,
    roles: dict[str, int],
    workdir: Path,
    api_url: str,
    seed: str,
    direct: str,
) -> bool:
    report_path = workdir / "report.json"
    overrides = {"config": {"phases": [p.artillery() for p in phases]}}
    env = os.environ | {
        "LOADTEST_TELNYX_SEED": seed,
        "ARTILLERY_DISABLE_TELEMETRY": "true",
        # Refuses artillery its PostHog client: else ~12 s of retries at exit (see the file).
        "NODE_OPTIONS": f"--require {HERE / 'no-telemetry.js'}",
        "WORKERS": "1",  # one artillery worker thread: it has one core
    }
    seconds = sum(p.seconds for p in phases)
    argv = [
        str(ARTILLERY), "run", "--target", api_url, "--overrides", json.dumps(overrides),
        "-p", str(workdir / "payload.csv"), "--output", str(report_path), str(WORKLOAD),
    ]  # fmt: skip
    cpu = Cpu(roles, direct)
    before = totals(direct)
    artillery = services.start("artillery", argv, env, args.artillery_cpus)
    cpu.start()
    sampler = Sampler(roles | {"artillery": artillery.process.pid})
    sampler.start()
    log(f"artillery running for {seconds} s (pinned to CPU {args.artillery_cpus}) ...")
    deadline = time.monotonic() + seconds + 120
    while artillery.process.poll() is None:
        for service in services.running:
            if service is not artillery and service.process.poll() is not None:
                raise RuntimeError(
                    f"{service.name} exited during the load ({service.process.returncode}):\n"
                    f"{service.tail()}"
                )
        if time.monotonic() > deadline:
            raise TimeoutError(f"artillery still running {seconds + 120} s after it started")
        time.sleep(0.5)
    sampler.stop()
    usage = cpu.report()
    code = artillery.process.returncode
    services.running.remove(artillery)
    if code != 0 or not report_path.exists():
        log(f"artillery failed ({code}); its log ends:\n{artillery.tail()}")
        return False
    report = json.loads(report_path.read_text())
    summary = summarise(report, workload_names())
    (workdir / "timeline.txt").write_text(timeline(report, sampler) + "\n")
    summary.seconds = seconds  # rates over the phases (the counters' span adds the stragglers)

    drained = time.monotonic() + args.drain_seconds
    left = backlog(direct)
    while any(left.values()) and time.monotonic() < drained:
        time.sleep(0.5)
        left = backlog(direct)
    after = totals(direct)
    done = {k: after[k] - before.get(k, 0) for k in after}

    print()
    print(
        f"Koinonia load test, {time.strftime('%Y-%m-%d %H:%M %Z')}: "
        f"{', '.join(p.describe() for p in phases)}: {summary.vusers_created:,} arrivals; "
        f"{os.cpu_count()} CPUs"
    )
    print()
    print(table(summary))
    print()
    print(f"  {usage}")
    if args.timeline or summary.failures:
        print()
        print(timeline(report, sampler))
        print()
    print(f"  made during the run: {', '.join(f'{k} {v:,}' for k, v in done.items())}")
    state = "drained" if not any(left.values()) else "NOT drained"
    print(
        f"  worker backlog {args.drain_seconds:g} s after the load: {state} "
        f"({', '.join(f'{k} {v:,}' for k, v in left.items())})"
    )
    slow = (services.logs / "api.log").read_text(errors="replace").count("slow_query")
    print(f"  API log: {slow} slow_query warnings (statements >= 100 ms)")
    problems = summary.failures
    if summary.unexpected_4xx:
        if args.allow_4xx:
            print(f"  note: {summary.unexpected_4xx}")
        else:
            problems.append(summary.unexpected_4xx)
    for name in (e.name for e in summary.endpoints if e.requests == 0):
        problems.append(f"{name}: no request made")
    print()
    if problems:
        for problem in problems:
            print(f"FAILED: {problem}")
        return False
    print("PASSED: no 5xx, no request without an answer, no unexpected 4xx")
    return True


if __name__ == "__main__":
    sys.exit(main())
