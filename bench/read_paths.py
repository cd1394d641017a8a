"""Authenticated list reads of the real API against floors measured in the same run (issue 11).

    .venv/bin/python -m bench.read_paths [--quick] [--duration 8] [--connections 64]
        [--rate 1000] [--open-loop-seconds 10] [--logs DIR]

Needs `wrk` (`apt-get install -y wrk`), `taskset` (util-linux) and PgBouncer on 6432
(`scripts/pgbouncer.sh start 6432`).

Servers, one at a time, each ONE process pinned to core 0 (`taskset -c 0`); the load
generators (wrk, `bench.open_loop`) pinned to core 1. PostgreSQL, PgBouncer and Redis are
shared and not pinned.

* Floors (`bench/floors.py`, uvicorn `--loop uvloop --http httptools --no-access-log`):
  `bare_json` (a precomputed page, `json.dumps` per request), `bare_fastapi` (one route
  with a `response_model` like MemberOut), `asyncpg_floor` (the member list's indexed query
  through PgBouncer on an asyncpg pool), `same_stack_floor` (what the route must do with
  our parts: pyjwt verification of the bearer token, one Redis EVALSHA of a rate-limit
  script, the same query on a psycopg 3 pool through PgBouncer, JSON out).
* Koinonia: `koinonia api` (one process) over a scratch database migrated to head,
  DATABASE_URL through PgBouncer (127.0.0.1:6432), Redis DB 11 (flushed at start; tests
  use 15, the other benches 12-14), rate limits enforced but above the offered load
  (RATE_LIMIT_PER_MINUTE = RATE_LIMIT_BURST = 6,000,000; no allow-list), LOG_LEVEL=INFO
  with stdout (the access log) to a file, the Telnyx/Stripe sandbox running, tokens valid
  3,600 s. Endpoints: /livez, /api/v1/auth/me, /api/v1/members?limit=20, /api/v1/groups,
  /api/v1/conversations, /api/v1/messages.

Seed (not timed): one church registered through the API; 1,000 members COPYed
(`bench.common.copy_members`, into a group "bench") and 10 more groups made through the
API, the first ("Choir") with 20 members; then with a worker (`--queue sms`) and the
sandbox: a sending number (`bench.common.give_number`), 20 broadcasts
`POST /api/v1/messages` to the choir and 20 inbox texts `POST /api/v1/conversations`,
waited for (with a deadline) until every text is delivered; the worker is stopped and
the database vacuumed and analysed. Each endpoint is then checked for 200 and a page of
the expected real rows (members 20 of 1,000 with a next cursor, groups 11, conversations
20, messages 20) before it is measured; each floor for 20 rows.

The API process that served the seed is measured first (a running server, as in
production), then stopped; then each floor in turn.

Measured per server and endpoint (after the server is idle: < 10 % of a core):

1. capacity, closed loop: `wrk -t1 -c<connections> -d<duration>s --latency` with the
   Authorization header, after a 1 s warm-up run: req/s, p50, p99, non-2xx answers and
   socket errors; CPU seconds of the server process (and of the PostgreSQL backends of the
   scratch database) from /proc, from the start of the run until the server is idle
   again, per request served (wrk's answers plus the one in flight on each connection
   when it stopped). CPU per request is the most stable figure on a shared machine: it
   does not depend much on what else ran on core 0.
2. latency at a fixed arrival rate, open loop (`bench.open_loop`, see its docstring for
   why it is our own): `--rate` req/s for `--open-loop-seconds` (after 1 s of warm-up,
   then up to 10 s for late answers) against the Koinonia list endpoints and the
   same-stack floor: achieved rate, errors, p50/p95/p99/max measured from each request's
   scheduled send time ("≥": a lower bound, some requests were still unanswered).

`--quick`: 3 s per wrk run, 3 s open loop with no warm-up and 2 s for late answers; a
smoke check of the whole harness (about 2 minutes, more on a busy machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from redis import Redis

from bench.common import copy_members, give_number, phone_of, plain_url, scratch_database
from bench.common import settings_for as common_settings
from bench.floors import FLOORS, PAGE, STATS_MARK
from bench.open_loop import describe, fmt_latency
from bench.send_throughput import (
    SANDBOX_SEED,
    CpuSnapshot,
    Service,
    Services,
    free_port,
    public_key,
    wait_http,
)

REPO = Path(__file__).resolve().parent.parent
REDIS_URL = "redis://127.0.0.1:6379/11"  # tests 15, send_throughput 13, fanout 14, others 12
PGBOUNCER_HOSTPORT = "127.0.0.1:6432"
SERVER_CPUS = "0"
LOAD_CPUS = "1"
AREA = "720"
MEMBERS = 1_000
GROUPS = 10  # made through the API, besides copy_members' "bench" group
CHOIR = 20
BROADCASTS = 20
CONVERSATIONS = 20
TOKEN_TTL = 3_600
RATE_LIMIT = 6_000_000  # per minute and burst: enforced, never reached
FLOOR_PATH = f"/api/v1/members?limit={PAGE}"
GROUP_NAMES = ["Choir", "Youth", "Elders", "Ushers", "Prayer", "Worship team", "Sunday school",
               "Men", "Women", "Visitors"]  # fmt: skip


@dataclass(frozen=True)
class Endpoint:
    name: str
    path: str
    rows: int | None  # expected `data` rows; None: not a list
    open_loop: bool = False
    more: bool = False  # a next page exists


ENDPOINTS = (
    Endpoint("livez", "/livez", None),
    Endpoint("auth/me", "/api/v1/auth/me", None),
    Endpoint("members?limit=20", FLOOR_PATH, PAGE, open_loop=True, more=True),
    Endpoint("groups", "/api/v1/groups", GROUPS + 1, open_loop=True),
    Endpoint("conversations", "/api/v1/conversations", CONVERSATIONS, open_loop=True),
    Endpoint("messages", "/api/v1/messages", BROADCASTS, open_loop=True),
)


# --- results ------------------------------------------------------------------------------


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    latency_ms: dict[int, float]  # percentile -> ms
    non_2xx: int
    socket_errors: dict[str, int]

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())


@dataclass
class Measured:
    name: str
    kind: str  # "floor" | "koinonia"
    pid: int = 0
    response_bytes: int = 0
    wrk: WrkResult | None = None
    served: int = 0  # wrk's answers + the requests in flight when it stopped
    server_cpu: float = 0.0  # seconds over the wrk run and until the server is idle
    pg_cpu: float = 0.0
    busy: float = 0.0  # whole-machine CPU over the wrk run, in cores
    cpu_wait: float = 0.0  # share of the wrk run the server waited for its core
    states: str = ""  # the server main thread's sampled states over the wrk run
    open_loop: dict[str, Any] | None = None
    open_loop_cpu: float = 0.0  # server CPU seconds over the open-loop run
    warnings: list[str] = field(default_factory=list)

    def cpu_ms(self, seconds: float | None = None) -> float:
        if not self.served:
            return math.nan
        return 1000 * (self.server_cpu if seconds is None else seconds) / self.served

    def pg_ms(self) -> float:
        return self.cpu_ms(self.pg_cpu)

    def open_loop_cpu_ms(self) -> float:
        """Server CPU per request served over the open-loop run: every answer (warm-up
        included) and the requests in flight when the generator closed its connections."""
        loop = self.open_loop or {}
        served = int(loop.get("answered_total", 0)) + int(loop.get("in_flight_at_end", 0))
        return 1000 * self.open_loop_cpu / served if served else math.nan


# --- processes ------------------------------------------------------------------------------


def start_pinned(
    services: Services,
    name: str,
    argv: list[str],
    cpus: str,
    extra_env: dict[str, str] | None = None,
) -> Service:
    """Like Services.start, but any command, pinned with `taskset -c` (which execs it: the
    pid is the server's own, so /proc accounting reads the right process)."""
    log = services.logs / f"{name}.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            ["taskset", "-c", cpus, *argv],
            env=services.env | (extra_env or {}),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    service = Service(name, process, log)
    services.running.append(service)
    return service


def koinonia(*args: str) -> list[str]:
    return [sys.executable, "-m", "koinonia", *args]


def backend_pids(direct_url: str) -> list[int]:
    with psycopg.connect(plain_url(direct_url), autocommit=True) as connection:
        rows = connection.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()"
        ).fetchall()
    return [int(row[0]) for row in rows]


def _cpu_of(snapshot: CpuSnapshot, pid: int) -> float:
    found = snapshot.per_pid.get(pid)
    return found[1] if found else 0.0


@dataclass
class CpuWindow:
    """Server, PostgreSQL-backend and machine CPU seconds between start() and stop()."""

    server_pid: int
    direct_url: str
    before: CpuSnapshot | None = None
    backends: list[int] = field(default_factory=list)
    server: float = 0.0
    postgres: float = 0.0
    machine: float = 0.0
    wall: float = 0.0

    def start(self) -> None:
        self.backends = backend_pids(self.direct_url)
        self.before = CpuSnapshot.take()

    def stop(self) -> None:
        after = CpuSnapshot.take()
        assert self.before is not None
        pids = set(self.backends) | set(backend_pids(self.direct_url))
        self.server = _cpu_of(after, self.server_pid) - _cpu_of(self.before, self.server_pid)
        # A backend that started during the run counts in full (it started with it).
        self.postgres = sum(max(0.0, _cpu_of(after, p) - _cpu_of(self.before, p)) for p in pids)
        self.machine = after.machine - self.before.machine
        self.wall = after.at - self.before.at


# --- wrk ----------------------------------------------------------------------------------

SOCKET_ERRORS = ("connect", "read", "write", "timeout")
_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def parse_wrk(output: str) -> WrkResult:
    percentiles = {
        int(m.group(1)): float(m.group(2)) * _UNITS[m.group(3)]
        for m in re.finditer(r"^\s*(\d+)%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.MULTILINE)
    }
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", output)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if total is None or rps is None or 50 not in percentiles or 99 not in percentiles:
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    return WrkResult(
        requests=int(total.group(1)),
        seconds=float(total.group(2)) * _UNITS[total.group(3)] / 1000,
        rps=float(rps.group(1)),
        latency_ms=percentiles,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=(
            {kind: int(sockets.group(i + 1)) for i, kind in enumerate(SOCKET_ERRORS)}
            if sockets
            else {}
        ),
    )


def run_wrk(url: str, token: str, connections: int, seconds: int) -> WrkResult:
    command = [
        "taskset", "-c", LOAD_CPUS, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
        "--latency", "--timeout", "10s", "-H", f"Authorization: Bearer {token}", url,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    return parse_wrk(done.stdout)


def run_open_loop(
    url: str, token: str, rate: float, seconds: float, warmup: float, drain: float
) -> dict[str, Any]:
    command = [
        "taskset", "-c", LOAD_CPUS, sys.executable, "-m", "bench.open_loop", "--url", url,
        "--header", f"Authorization: Bearer {token}", "--rate", f"{rate:g}",
        "--duration", f"{seconds:g}", "--warmup", f"{warmup:g}", "--drain", f"{drain:g}", "--json",
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + drain + 60, cwd=REPO
    )
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("OPEN_LOOP_JSON ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"open loop failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("OPEN_LOOP_JSON "))
    return result


# --- one server -----------------------------------------------------------------------------


@dataclass
class Plan:
    connections: int
    seconds: int
    rate: float
    open_loop_seconds: float
    open_loop_warmup: float
    drain: float
    token: str
    direct_url: str


def check_answer(url: str, token: str, rows: int | None, more: bool = False) -> int:
    """The endpoint answers 200 (with `rows` rows of data, and a next cursor when `more`);
    answers the body's size."""
    response = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    if response.status_code != 200:
        raise RuntimeError(f"{url} answered {response.status_code}: {response.text[:500]}")
    if rows is not None:
        page = response.json()
        data = page.get("data")
        if not isinstance(data, list) or len(data) != rows:
            got = len(data) if isinstance(data, list) else data
            raise RuntimeError(f"{url}: expected {rows} rows, got {got}: {response.text[:300]}")
        if (page.get("next_cursor") is not None) != more:
            raise RuntimeError(f"{url}: next_cursor {page.get('next_cursor')!r}, more={more}")
    return len(response.content)


def run_delay(pid: int) -> float:
    """Seconds the server's main thread has spent runnable but waiting for a CPU
    (/proc/PID/schedstat: on-CPU ns, run-queue ns, slices)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


class StallWatch:
    """A thread of the bench waking every 10 ms. The longest gap between its wake-ups is a
    stall of the machine (every process stopped, as this shared machine sometimes does for
    seconds), not of the server; a run with one is flagged. It also samples the server's
    main-thread state (R running or runnable, S sleeping: waiting for the network, the
    database or Redis, D blocked in the kernel: a disk write such as a log line)."""

    LIMIT = 0.25  # seconds

    def __init__(self, pid: int = 0) -> None:
        self.worst = 0.0
        self.pid = pid
        self.states: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def shares(self) -> str:
        total = sum(self.states.values()) or 1
        return " ".join(f"{k} {100 * n / total:.0f}%" for k, n in sorted(self.states.items()))

    def __enter__(self) -> StallWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        last = time.monotonic()
        stat = Path(f"/proc/{self.pid}/stat")
        while not self._stop.wait(0.01):
            now = time.monotonic()
            self.worst = max(self.worst, now - last - 0.01)
            last = now
            if self.pid:
                try:
                    raw = stat.read_text()
                except OSError:
                    continue
                self.states[raw[raw.rindex(")") + 2]] += 1


def wait_idle(pid: int, timeout: float = 60.0) -> float:
    """Until the server uses < 10 % of a core over 0.2 s (an open-loop run leaves
    up to --max-connections requests running after it ends); answers the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        before = CpuSnapshot.take()
        time.sleep(0.2)
        after = CpuSnapshot.take()
        if (_cpu_of(after, pid) - _cpu_of(before, pid)) / (after.at - before.at) < 0.10:
            break
    return time.monotonic() - started


def measure(
    result: Measured, url: str, plan: Plan, *, open_loop: bool, services: Services
) -> Measured:
    waited = wait_idle(result.pid)
    if waited > 5:
        print(f"  (waited {waited:.0f} s for {result.name}'s server to go idle)", flush=True)
    run_wrk(url, plan.token, plan.connections, 1)  # warm-up: pools, caches, code paths
    wait_idle(result.pid)  # the warm-up's last requests are not in the window
    window = CpuWindow(result.pid, plan.direct_url)
    window.start()
    delay_before = run_delay(result.pid)
    with StallWatch(result.pid) as watch:
        result.wrk = run_wrk(url, plan.token, plan.connections, plan.seconds)
    ended = CpuSnapshot.take()
    result.cpu_wait = (run_delay(result.pid) - delay_before) / max(1e-9, result.wrk.seconds)
    result.states = watch.shares()
    if watch.worst > StallWatch.LIMIT:
        result.warnings.append(
            f"the machine stalled for {watch.worst:.1f} s during the wrk run (every process "
            "stopped): its latencies and req/s are suspect; rerun"
        )
        print(f"  WARNING: {result.warnings[-1]}", flush=True)
    # When wrk stops, each of its connections has one request in flight, which the server
    # still serves: the window runs until it is idle, and they count as served.
    wait_idle(result.pid)
    window.stop()
    services.check()
    result.served = result.wrk.requests + plan.connections
    result.server_cpu, result.pg_cpu = window.server, window.postgres
    assert window.before is not None
    result.busy = (ended.machine - window.before.machine) / (ended.at - window.before.at)
    wrk = result.wrk
    print(
        f"  {result.kind:<8} {result.name:<18} wrk {wrk.rps:8,.0f} req/s  p50 "
        f"{wrk.latency_ms[50]:7.2f} ms  p99 {wrk.latency_ms[99]:7.2f} ms  non-2xx "
        f"{wrk.non_2xx}  socket errors {sum(wrk.socket_errors.values())}  server CPU "
        f"{result.cpu_ms():.3f} ms/req  pg {result.pg_ms():.3f} ms/req  machine busy "
        f"{result.busy:.2f} cores; server main thread waited for core {SERVER_CPUS} "
        f"{100 * result.cpu_wait:.0f}% of the run, states {result.states}",
        flush=True,
    )
    if open_loop:
        window = CpuWindow(result.pid, plan.direct_url)
        window.start()
        with StallWatch() as watch:
            result.open_loop = run_open_loop(
                url,
                plan.token,
                plan.rate,
                plan.open_loop_seconds,
                plan.open_loop_warmup,
                plan.drain,
            )
        wait_idle(result.pid)  # what was in flight when the generator closed is served
        window.stop()
        services.check()
        result.open_loop_cpu = window.server
        loop = result.open_loop
        print(
            f"  {'':<8} {'':<18} open loop at {plan.rate:g}/s: {describe(loop)}; server CPU "
            f"{result.open_loop_cpu_ms():.3f} ms per request served",
            flush=True,
        )
        lag = loop["send_lag_p99_ms"]
        if watch.worst > StallWatch.LIMIT:
            result.warnings.append(
                f"the machine stalled for {watch.worst:.1f} s during the open loop (every "
                "process stopped): its latencies are suspect; rerun"
            )
            print(f"  WARNING: {result.warnings[-1]}", flush=True)
        if lag is None or lag > 50:
            result.warnings.append(
                f"the open-loop generator fell behind its own schedule (send lag p99 {lag} ms;"
                " core 1 busy with other work?): that much of each latency is not the server's"
            )
            print(f"  WARNING: {result.warnings[-1]}", flush=True)
        # An open loop at or above capacity should still get about the closed-loop rate.
        expected = min(plan.rate, result.wrk.rps)
        if loop["answered"] == 0 or loop["achieved_rate"] < 0.25 * expected:
            result.warnings.append(
                f"open loop achieved {loop['achieved_rate']:,.0f}/s against {expected:,.0f}/s "
                "expected from wrk: the server or a shared service (PostgreSQL, PgBouncer, "
                "Redis) stalled during the run; rerun before reading its figures"
            )
            print(f"  WARNING: {result.warnings[-1]}", flush=True)
    return result


def errors_of(loop: dict[str, Any]) -> int:
    return int(loop["non_2xx"]) + sum(int(n) for n in loop["errors"].values())


def measure_floor(name: str, services: Services, plan: Plan, floor_env: dict[str, str]) -> Measured:
    port = free_port()
    argv = [
        sys.executable, "-m", "uvicorn", f"bench.floors:{name}", "--host", "127.0.0.1",
        "--port", str(port), "--loop", "uvloop", "--http", "httptools", "--no-access-log",
        "--log-level", "warning",
    ]  # fmt: skip
    server = start_pinned(services, name, argv, SERVER_CPUS, floor_env)
    result = Measured(name, "floor", pid=server.process.pid)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + FLOOR_PATH, services)
        result.response_bytes = check_answer(base + FLOOR_PATH, plan.token, PAGE, more=True)
        measure(
            result,
            base + FLOOR_PATH,
            plan,
            open_loop=name == "same_stack_floor",
            services=services,
        )
    finally:
        services.stop(server)
    # The floor's own count of pool timeouts (503) and Redis errors (let through).
    for line in server.log.read_text(errors="replace").splitlines():
        if line.startswith(STATS_MARK):
            counts = {k: v for k, v in json.loads(line.removeprefix(STATS_MARK)).items()
                      if k != "floor" and v}  # fmt: skip
            if counts:
                result.warnings.append(f"the floor counted {counts}")
    return result


# --- seeding -------------------------------------------------------------------------------


async def _give_number(settings: Any, church_id: uuid.UUID, segments: int) -> None:
    from koinonia.db import Database

    database = Database(settings)
    try:
        await give_number(database, settings, church_id, "+17205550100", segments)
    finally:
        await database.dispose()


def wait_for(
    what: str, check: Any, services: Services, timeout: float, interval: float = 0.2
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        services.check()
        done, state = check()
        if done:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not done after {timeout:.0f} s ({state})")
        time.sleep(interval)


async def post_texts(api_url: str, token: str, choir: str, members: list[str]) -> None:
    """BROADCASTS broadcasts to the choir and one inbox text to each of `members`, 8 at once."""
    gate = asyncio.Semaphore(8)

    async def post(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> None:
        async with gate:
            headers = {"Idempotency-Key": uuid.uuid4().hex} if path.endswith("messages") else {}
            answer = await client.post(path, json=body, headers=headers)
        if answer.status_code not in (200, 201, 202):
            raise RuntimeError(f"{path} refused: {answer.status_code} {answer.text}")

    async with httpx.AsyncClient(
        base_url=api_url, timeout=60, headers={"Authorization": f"Bearer {token}"}
    ) as client:
        broadcasts = [
            post(
                client,
                "/api/v1/messages",
                {
                    "body": f"Hi {{{{first_name}}}}, choir practice #{n + 1} is at 7pm Thursday.",
                    "group_ids": [choir],
                },
            )
            for n in range(BROADCASTS)
        ]
        texts = [
            post(
                client,
                "/api/v1/conversations",
                {"member_id": member_id, "body": "Hello from the church office: how are you?"},
            )
            for member_id in members
        ]
        await asyncio.gather(*broadcasts, *texts)


def seed(api_url: str, direct_url: str, services: Services, settings: Any) -> tuple[str, uuid.UUID]:
    """The church, its members, groups, broadcasts and conversations; answers its
    (access token, church id)."""
    phases: list[str] = []
    mark = time.perf_counter()

    def phase(what: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        phases.append(f"{what} {now - mark:.1f} s")
        mark = now

    # The worker starts first: it gets ready while the church is set up.
    worker = start_pinned(
        services, "worker", koinonia("worker", "--concurrency", "8", "--queue", "sms"), LOAD_CPUS
    )
    client = httpx.Client(base_url=api_url, timeout=60)
    registered = client.post(
        "/api/v1/auth/register",
        json={
            "church_name": "Read Paths Church",
            "name": "Lydia Purple",
            "email": f"read-paths-{uuid.uuid4().hex[:8]}@example.org",
            "password": "correct horse battery",
        },
    )
    if registered.status_code != 201:
        raise RuntimeError(f"registration refused: {registered.status_code} {registered.text}")
    token = str(registered.json()["access_token"])
    church_id = uuid.UUID(registered.json()["church"]["id"])
    client.headers["Authorization"] = f"Bearer {token}"

    asyncio.run(_give_number(settings, church_id, 10 * (BROADCASTS * CHOIR + CONVERSATIONS)))
    copy_members(direct_url, settings, church_id, [phone_of(i, AREA) for i in range(MEMBERS)])
    with psycopg.connect(plain_url(direct_url)) as connection:
        member_ids = [
            str(row[0])
            for row in connection.execute(
                "SELECT id FROM members WHERE church_id = %s ORDER BY id", (church_id,)
            ).fetchall()
        ]
    group_ids = []
    for i, name in enumerate(GROUP_NAMES[:GROUPS]):
        made = client.post("/api/v1/groups", json={"name": name, "description": f"{name} list"})
        made.raise_for_status()
        group_id = str(made.json()["id"])
        group_ids.append(group_id)
        size = CHOIR if i == 0 else 10 * i
        added = client.post(
            f"/api/v1/groups/{group_id}/members",
            json={"member_ids": member_ids[i * 50 : i * 50 + size]},
        )
        added.raise_for_status()

    phase("church, members and groups")

    def workers_registered() -> tuple[bool, int]:
        with psycopg.connect(plain_url(direct_url), autocommit=True) as connection:
            row = connection.execute("SELECT count(*) FROM procrastinate_workers").fetchone()
        count = int(row[0]) if row else 0
        return count >= 1, count

    wait_for("the worker registering", workers_registered, services, 60)
    phase("worker ready")
    asyncio.run(post_texts(api_url, token, group_ids[0], member_ids[500 : 500 + CONVERSATIONS]))

    def statuses(connection: psycopg.Connection[Any], table: str) -> dict[str, int]:
        rows = connection.execute(f"SELECT status, count(*) FROM {table} GROUP BY 1").fetchall()
        return {str(status): int(count) for status, count in rows}

    def all_delivered() -> tuple[bool, dict[str, Any]]:
        with psycopg.connect(plain_url(direct_url), autocommit=True) as connection:
            messages = statuses(connection, "messages")
            recipients = statuses(connection, "message_recipients")
            texts = statuses(connection, "conversation_messages")
        done = (
            messages.get("completed", 0) == BROADCASTS
            and recipients.get("delivered", 0) == BROADCASTS * CHOIR
            and texts.get("delivered", 0) == CONVERSATIONS
        )
        return done, {"messages": messages, "recipients": recipients, "texts": texts}

    phase("texts posted")
    wait_for("every text delivered", all_delivered, services, 180, interval=0.25)
    phase("every text sent and delivered")
    services.stop(worker)
    client.close()
    with psycopg.connect(plain_url(direct_url), autocommit=True) as connection:
        connection.execute("VACUUM ANALYZE")
    phase("VACUUM ANALYZE")
    print(f"seed phases: {', '.join(phases)}", flush=True)
    return token, church_id


def decrypt_cost_us(settings: Any, direct_url: str, church_id: uuid.UUID) -> float:
    """µs of CPU to decrypt one page's phones (AES-GCM per row) here, as the real member
    list does and the floors do not."""
    from koinonia.members.crypto import ContactCipher

    cipher = ContactCipher.from_settings(settings)
    with psycopg.connect(plain_url(direct_url)) as connection:
        blobs = [
            bytes(row[0])
            for row in connection.execute(
                "SELECT phone_ct FROM members WHERE church_id = %s LIMIT %s", (church_id, PAGE)
            ).fetchall()
        ]
    rounds = 500
    start = time.process_time()
    for _ in range(rounds):
        for blob in blobs:
            cipher.decrypt(blob, church_id)
    return (time.process_time() - start) / rounds * 1e6


# --- report ---------------------------------------------------------------------------------


def access_log_note(log: Path, offset: int) -> str:
    """What the API's log says from `offset` on (the measured runs): a cross-check of the
    generators' status counts."""
    statuses: Counter[int] = Counter()
    events: Counter[str] = Counter()
    with log.open("rb") as handle:
        handle.seek(offset)
        text = handle.read().decode(errors="replace")
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        event = str(entry.get("event", ""))
        if entry.get("logger") == "koinonia.access":
            statuses[int(entry.get("status", 0))] += 1
        elif entry.get("level") in ("warning", "error", "critical"):
            events[event] += 1
    return (
        f"the API's log of the measured runs ({len(text) / 1e6:,.1f} MB): "
        f"{sum(statuses.values()):,} "
        f"access lines, statuses {dict(sorted(statuses.items()))}; warnings and errors "
        f"{dict(events.most_common(5)) or 'none'}"
    )


def report(results: list[Measured], args: argparse.Namespace, notes: list[str]) -> None:
    floor = next((r for r in results if r.name == "same_stack_floor" and r.wrk), None)
    print()
    print(
        f"Read paths: one server process on core {SERVER_CPUS}, load on core {LOAD_CPUS}. "
        f"wrk -t1 -c{args.connections} -d{args.duration}s (closed loop): req/s, p50, p99, "
        "errors (non-2xx + socket errors); x floor = req/s / same_stack_floor's req/s; CPU = "
        "ms of CPU per request of the server process (pg: of the PostgreSQL backends of "
        "the scratch database); wait = share of the run the server was runnable but waiting "
        f"for core {SERVER_CPUS} (other processes on it). Open loop at {args.rate:g} req/s for "
        f"{args.open_loop_seconds:g} s: achieved req/s, latency from each request's scheduled "
        "send (ms; ≥ = a lower bound, requests still unanswered at the end), errors."
    )
    header = (
        f"{'name':<27} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'x floor':>7} "
        f"{'CPU ms':>7} {'pg ms':>6} {'wait':>5} | {'open loop':>9} {'p50':>9} {'p95':>9} "
        f"{'p99':>9} {'max':>9} {'errors':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        if r.wrk is None:
            continue
        ratio = r.wrk.rps / floor.wrk.rps if floor and floor.wrk and floor.wrk.rps else math.nan
        line = (
            f"{r.kind + ' ' + r.name:<27} {r.wrk.rps:>7,.0f} {r.wrk.latency_ms[50]:>8.2f} "
            f"{r.wrk.latency_ms[99]:>8.2f} {r.wrk.errors:>6} {ratio:>6.2f}x "
            f"{r.cpu_ms():>7.3f} {r.pg_ms():>6.3f} {100 * r.cpu_wait:>4.0f}% |"
        )
        if r.open_loop:
            loop = r.open_loop
            line += (
                f" {loop['achieved_rate']:>7,.0f}/s {fmt_latency(loop, 'p50'):>9} "
                f"{fmt_latency(loop, 'p95'):>9} {fmt_latency(loop, 'p99'):>9} "
                f"{fmt_latency(loop, 'max'):>9} {errors_of(loop):>6}"
            )
        print(line)
    print()
    if floor is not None and floor.wrk is not None:
        for r in results:
            if r.kind == "koinonia" and r.wrk is not None and floor.cpu_ms() > 0:
                print(
                    f"  {r.name:<18} CPU per request {r.cpu_ms() / floor.cpu_ms():5.2f} x the "
                    f"same-stack floor's ({r.cpu_ms():.3f} vs {floor.cpu_ms():.3f} ms); "
                    f"answer {r.response_bytes:,} bytes"
                )
    for r in results:
        for warning in r.warnings:
            print(f"  WARNING ({r.kind} {r.name}): {warning}")
    for note in notes:
        print(f"  note: {note}")


# --- main ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="3 s runs: a smoke check")
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections")
    parser.add_argument("--rate", type=float, default=1000.0, help="open-loop req/s")
    parser.add_argument("--open-loop-seconds", type=float, default=10.0)
    parser.add_argument("--logs", type=Path, default=None, help="keep the processes' logs here")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.open_loop_seconds = 3, 3.0
    if args.duration < 1 or args.connections < 1 or args.rate <= 0:
        parser.error("--duration, --connections and --rate must be positive")
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (apt-get install -y wrk / util-linux).")
            raise SystemExit(2)
    cores = os.cpu_count() or 1
    if cores < 2:
        print("needs 2 cores: the server on core 0, the load generators on core 1")
        raise SystemExit(2)
    print(
        f"Read paths (issue 11): {cores} cores; servers pinned to core {SERVER_CPUS}, wrk and "
        f"the open-loop generator to core {LOAD_CPUS}; PostgreSQL through PgBouncer "
        f"{PGBOUNCER_HOSTPORT}; Redis {REDIS_URL}",
        flush=True,
    )
    Redis.from_url(REDIS_URL).flushdb()
    jwt_secret = secrets.token_urlsafe(48)
    started = time.perf_counter()
    results: list[Measured] = []
    notes: list[str] = []
    with ExitStack() as stack:
        direct_url = stack.enter_context(scratch_database("koinonia_bench_read"))
        migrated = time.perf_counter() - started
        app_url = direct_url.replace("@127.0.0.1:5432/", f"@{PGBOUNCER_HOSTPORT}/", 1)
        if app_url == direct_url:
            raise RuntimeError(f"cannot route {direct_url} through PgBouncer")
        if args.logs is not None:
            logs = args.logs
            logs.mkdir(parents=True, exist_ok=True)
        else:
            logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-read-")))
        sandbox_port, api_port = free_port(), free_port()
        sandbox_url, api_url = f"http://127.0.0.1:{sandbox_port}", f"http://127.0.0.1:{api_port}"
        env = os.environ | {
            "KOINONIA_ENV": "development",
            "DATABASE_URL": app_url,
            "DATABASE_DIRECT_URL": direct_url,  # the worker's queue (LISTEN) only
            "REDIS_URL": REDIS_URL,
            "LOG_LEVEL": "INFO",
            "API_HOST": "127.0.0.1",
            "API_PORT": str(api_port),
            "PUBLIC_BASE_URL": api_url,
            "TELNYX_BASE_URL": sandbox_url,
            "STRIPE_BASE_URL": sandbox_url,
            "TELNYX_PUBLIC_KEY": public_key(),
            "JWT_SECRET": jwt_secret,
            "ACCESS_TOKEN_TTL_SECONDS": str(TOKEN_TTL),
            "RATE_LIMIT_PER_MINUTE": str(RATE_LIMIT),
            "RATE_LIMIT_BURST": str(RATE_LIMIT),
            "RATE_LIMIT_ALLOWLIST": "",
            # Seeding only: let the worker send the seed's texts at once.
            "SENDS_PER_SECOND_PER_NUMBER": "100000",
            "TELNYX_ACCOUNT_SENDS_PER_SECOND": "100000",
            "SANDBOX_TELNYX_PRIVATE_KEY": SANDBOX_SEED,
            "SANDBOX_TELNYX_WEBHOOK_URL": f"{api_url}/api/v1/webhooks/telnyx",
            "SANDBOX_STRIPE_WEBHOOK_URL": f"{api_url}/api/v1/webhooks/stripe",
            "SANDBOX_PUBLIC_BASE_URL": sandbox_url,
            "SANDBOX_TELNYX_RECEIPTS": "on",
        }
        services = Services(logs, env)
        stack.callback(services.stop_all)
        start_pinned(
            services, "sandbox", koinonia("sandbox", "--port", str(sandbox_port)), LOAD_CPUS
        )
        api = start_pinned(services, "api", koinonia("api", "--port", str(api_port)), SERVER_CPUS)
        wait_http(f"{sandbox_url}/sandbox/faults", services)
        wait_http(f"{api_url}/livez", services)
        print(
            f"scratch database migrated in {migrated:.1f} s; sandbox and API up after "
            f"{time.perf_counter() - started:.1f} s",
            flush=True,
        )

        settings = common_settings(direct_url, redis_url=REDIS_URL, jwt_secret=jwt_secret)
        token, church_id = seed(api_url, direct_url, services, settings)
        print(
            f"seed (not timed): 1 church, {MEMBERS:,} members, {GROUPS + 1} groups, "
            f"{BROADCASTS} broadcasts x {CHOIR} delivered, {CONVERSATIONS} conversations; "
            f"{time.perf_counter() - started:.1f} s",
            flush=True,
        )
        plan = Plan(
            connections=args.connections,
            seconds=args.duration,
            rate=args.rate,
            open_loop_seconds=args.open_loop_seconds,
            open_loop_warmup=0.0 if args.quick else 1.0,
            drain=2.0 if args.quick else max(10.0, args.open_loop_seconds),
            token=token,
            direct_url=direct_url,
        )  # fmt: skip

        # The API process that served the seed (the worker is stopped, every receipt
        # applied): a running server, as in production. Its log from here on is the
        # measured runs'.
        print("koinonia api (one process, LOG_LEVEL=INFO access log to a file):", flush=True)
        wait_http(f"{api_url}/readyz", services)
        log_offset = api.log.stat().st_size
        for endpoint in ENDPOINTS:
            url = api_url + endpoint.path
            result = Measured(endpoint.name, "koinonia", pid=api.process.pid)
            result.response_bytes = check_answer(url, token, endpoint.rows, endpoint.more)
            results.append(
                measure(result, url, plan, open_loop=endpoint.open_loop, services=services)
            )
        services.stop(api)  # one server at a time
        notes.append(access_log_note(api.log, log_offset))

        floor_env = {
            "BENCH_FLOOR_DSN": plain_url(app_url),
            "BENCH_FLOOR_POOL_SIZE": "10",
            "BENCH_FLOOR_CHURCH_ID": str(church_id),
            "BENCH_FLOOR_REDIS_URL": REDIS_URL,
            "BENCH_FLOOR_JWT_SECRET": jwt_secret,
        }
        print("floors:", flush=True)
        floors = [measure_floor(name, services, plan, floor_env) for name in FLOORS]
        results = floors + results  # the table lists the floors first
        decrypt_us = decrypt_cost_us(settings, direct_url, church_id)
        notes.append(
            f"decrypting one page's {PAGE} phones costs {decrypt_us:.0f} µs of CPU here: the "
            "member list does it, the floors do not"
        )
    notes.append(f"whole run {time.perf_counter() - started:.0f} s")
    report(results, args, notes)


if __name__ == "__main__":
    main()
