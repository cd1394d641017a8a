"""Broadcast sending throughput of one Koinonia worker process, beside the bare HTTP client.

    uv run python -m bench.send_throughput [--recipients 20000] [--latency-ms 50]
        [--send-concurrency 64] [--worker-concurrency 8] [--escalate 128,256]
        [--profile DIR] [--logs DIR]

Everything runs as separate OS processes, as in production, on a scratch database and
Redis DB 13 (flushed at start): the Telnyx sandbox (`koinonia sandbox`, answering every
`POST /v2/messages` after `--latency-ms`, set through `POST /sandbox/faults`, and then
POSTing signed `message.sent` / `message.finalized` receipts), the API (`koinonia api`,
which stores those receipts; it is not what is measured) and ONE worker
(`koinonia worker --queue sms`).

Setup (not timed): a church registered through the API, a sending number and segments
given to it, N members COPYed into one group, one broadcast to the group accepted by
`POST /api/v1/messages` (202) while no worker runs.

Timed, per worker setting:

* baseline: httpx.AsyncClient with as many requests in flight as the worker's
  `SEND_CONCURRENCY` (connection limits as in `koinonia.telnyx.client`) POSTs N messages
  straight to the same sandbox: no database, no worker, no receipts (the ceiling the
  sandbox and the loopback network allow at that concurrency);
* koinonia: the worker is started; the clock runs from the first recipient claimed until
  no recipient is `queued` or `sending` (polled every 0.2 s with plain psycopg; the
  figure uses the rows' own `claimed_at` / `sent_at`), steady state between 10 % and
  90 % sent. The worker keeps running until every receipt is applied (`delivered`).

Then the sandbox's log is checked: N texts accepted, one per phone. If the default
setting misses the target (1,000 SMS/s per worker process), the `--escalate` values of
`SEND_CONCURRENCY` are tried in the same run. CPU seconds per process over the timed
window are read from /proc; on a 2-core machine sandbox, API, worker, PostgreSQL and
Redis share the cores, and other processes' CPU shows as "other".
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from redis import Redis

from bench.common import (
    copy_members,
    give_number,
    phone_of,
    plain_url,
    scratch_database,
    settings_for,
)
from koinonia.telnyx.client import CONNECTIONS_PER_CLIENT

TARGET = 1_000.0  # SMS/s per worker process
REDIS_URL = "redis://127.0.0.1:6379/13"  # tests use 15; flushed at start
# The sandbox signs receipts with this seed (as the tests do); the API trusts its public half.
SANDBOX_SEED = base64.b64encode(bytes(range(32))).decode()
AREA = "303"
BODY = "Hello {{first_name}}, service at {{church_name}} starts at 10am this Sunday."
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def public_key() -> str:
    from koinonia.sandbox.signing import load_telnyx_key, public_key_b64

    return public_key_b64(load_telnyx_key(SANDBOX_SEED))


# --- processes --------------------------------------------------------------------------


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Services:
    logs: Path
    env: dict[str, str]
    running: list[Service] = field(default_factory=list)

    def start(self, name: str, *args: str, extra_env: dict[str, str] | None = None) -> Service:
        log = self.logs / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "koinonia", *args],
                env=self.env | (extra_env or {}),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        service = Service(name, process, log)
        self.running.append(service)
        return service

    def stop(self, service: Service, timeout: float = 15.0) -> None:
        if service.process.poll() is None:
            service.process.send_signal(signal.SIGTERM)
            try:
                service.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                service.process.kill()
                service.process.wait()
        if service in self.running:
            self.running.remove(service)

    def stop_all(self) -> None:
        for service in reversed(list(self.running)):
            self.stop(service)

    def check(self) -> None:
        for service in self.running:
            if service.process.poll() is not None:
                raise RuntimeError(
                    f"{service.name} exited ({service.process.returncode}):\n{service.tail()}"
                )


def wait_http(url: str, services: Services, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        services.check()
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


# --- CPU accounting from /proc ---------------------------------------------------------


def _proc_cpu(pid: int) -> tuple[str, float] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()
    # utime, stime are fields 14 and 15 of stat: 12 and 13 after the name.
    return name, (int(fields[11]) + int(fields[12])) / TICKS


def _machine_busy() -> float:
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in parts]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / TICKS


@dataclass
class CpuSnapshot:
    at: float
    machine: float
    per_pid: dict[int, tuple[str, float]]

    @classmethod
    def take(cls) -> CpuSnapshot:
        per_pid: dict[int, tuple[str, float]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                found = _proc_cpu(int(entry))
                if found is not None:
                    per_pid[int(entry)] = found
        return cls(time.monotonic(), _machine_busy(), per_pid)


def cpu_report(before: CpuSnapshot, after: CpuSnapshot, roles: dict[int, str]) -> str:
    wall = after.at - before.at
    used: dict[str, float] = dict.fromkeys(
        ("worker", "api", "sandbox", "postgres", "redis", "bench", "other"), 0.0
    )
    for pid, (name, seconds) in after.per_pid.items():
        start = before.per_pid.get(pid)
        delta = seconds - (start[1] if start and start[0] == name else 0.0)
        if delta <= 0:
            continue
        if pid in roles:
            used[roles[pid]] += delta
        elif name == "postgres":
            used["postgres"] += delta
        elif name.startswith("redis-server"):
            used["redis"] += delta
        else:
            used["other"] += delta
    machine = after.machine - before.machine
    # Processes that ended inside the window are not in either snapshot: count them as other.
    used["other"] += max(0.0, machine - sum(used.values()))
    order = ["worker", "api", "sandbox", "postgres", "redis", "bench", "other"]
    parts = [f"{k} {used[k]:.1f}s ({100 * used[k] / wall:.0f}%)" for k in order if used[k]]
    cores = os.cpu_count() or 1
    return (
        f"CPU over {wall:.1f} s (% of one core): {', '.join(parts)}; "
        f"machine busy {100 * machine / (wall * cores):.0f}% of {cores} cores"
    )


# --- setup ------------------------------------------------------------------------------


async def given_number(settings: Any, church_id: uuid.UUID, segments: int) -> None:
    from koinonia.db import Database

    database = Database(settings)
    try:
        await give_number(database, settings, church_id, "+12025550199", segments)
    finally:
        await database.dispose()


# --- the baseline -----------------------------------------------------------------------


async def baseline(sandbox_url: str, count: int, concurrency: int) -> float:
    """Seconds for `count` sends with `concurrency` in flight, straight to the sandbox."""
    # The same client layout as koinonia.telnyx.client.TelnyxClient: small pools in turn.
    connections = max(16, concurrency * 3 // 2)
    per_client = min(CONNECTIONS_PER_CLIENT, connections)
    limits = httpx.Limits(
        max_connections=per_client, max_keepalive_connections=per_client, keepalive_expiry=3.0
    )
    headers = {"Authorization": "Bearer KEY_sandbox", "Accept": "application/json"}
    next_index = iter(range(count))
    failures: Counter[int] = Counter()

    async with contextlib.AsyncExitStack() as stack:
        shards = [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=sandbox_url, headers=headers, limits=limits, timeout=10)
            )
            for _ in range(-(-connections // per_client))
        ]
        turn = itertools.cycle(shards)

        async def lane() -> None:
            for i in next_index:
                body = {
                    "from": "+12025550100",
                    "to": f"+1555{200 + i // 9000}{1000 + i % 9000:04d}",
                    "text": f"Hello Member{i}, service starts at 10am this Sunday.",
                    "type": "SMS",
                    "use_profile_webhooks": False,  # no receipts: nobody to receive them
                }
                try:
                    response = await next(turn).post("/v2/messages", json=body)
                except (httpx.ReadError, httpx.RemoteProtocolError):
                    # The sandbox closed an idle keep-alive connection as this request
                    # went out on it (uvicorn's 5 s keep-alive); nothing was accepted.
                    failures[0] += 1
                    response = await next(turn).post("/v2/messages", json=body)
                if response.status_code != 200:
                    failures[response.status_code] += 1
                else:
                    response.json()  # decoded, as the worker's client does

        # Warm the connections up so that connect time does not count.
        await asyncio.gather(*(next(turn).get("/sandbox/faults") for _ in range(concurrency)))
        start = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    if failures[0]:
        print(f"  (httpx baseline: {failures.pop(0)} sends retried after a closed connection)")
    if failures:
        raise RuntimeError(f"baseline sends failed: {dict(failures)}")
    return elapsed


async def raw_baseline(sandbox_url: str, count: int, concurrency: int) -> float:
    """The same sends over `concurrency` plain asyncio keep-alive connections (HTTP/1.1
    written by hand, no pool): what the sandbox and loopback allow without httpx's cost."""
    host, port = sandbox_url.removeprefix("http://").split(":")
    next_index = iter(range(count))
    failures: Counter[str] = Counter()

    async def lane() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for i in next_index:
                body = json.dumps(
                    {
                        "from": "+12025550100",
                        "to": f"+1556{200 + i // 9000}{1000 + i % 9000:04d}",
                        "text": f"Hello Member{i}, service starts at 10am this Sunday.",
                        "type": "SMS",
                        "use_profile_webhooks": False,
                    }
                ).encode()
                writer.write(
                    b"POST /v2/messages HTTP/1.1\r\nHost: sandbox\r\n"
                    b"Authorization: Bearer KEY_sandbox\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                json.loads(await reader.readexactly(length))
                if not head.startswith(b"HTTP/1.1 200"):
                    failures[head.split(b"\r\n", 1)[0].decode()] += 1
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"raw baseline sends failed: {dict(failures)}")
    return elapsed


# --- one measured broadcast -------------------------------------------------------------


@dataclass
class Run:
    send_concurrency: int
    worker_concurrency: int
    baseline_seconds: float = 0.0
    raw_seconds: float = 0.0  # the same sends without httpx: plain asyncio connections
    elapsed: float = 0.0  # first claim → last sent_at
    polled: float = 0.0  # first poll seeing a claim → first poll seeing none left
    steady: float = 0.0  # SMS/s between 10 % and 90 % sent
    delivered_after: float = 0.0  # first claim → every receipt applied
    accepted: int = 0
    distinct: int = 0
    twice: int = 0
    states: dict[str, int] = field(default_factory=dict)
    cpu: str = ""
    cpu_delivery: str = ""

    def rate(self, count: int) -> float:
        return count / self.elapsed if self.elapsed else 0.0

    def baseline_rate(self, count: int) -> float:
        return count / self.baseline_seconds if self.baseline_seconds else 0.0


def recipient_states(connection: psycopg.Connection[Any], message_id: uuid.UUID) -> dict[str, int]:
    rows = connection.execute(
        "SELECT status, count(*) FROM message_recipients WHERE message_id = %s GROUP BY status",
        (message_id,),
    ).fetchall()
    return {str(status): int(n) for status, n in rows}


def post_broadcast(api_url: str, token: str, group_id: uuid.UUID) -> uuid.UUID:
    response = httpx.post(
        f"{api_url}/api/v1/messages",
        json={"body": BODY, "group_ids": [str(group_id)]},
        headers={"Authorization": f"Bearer {token}", "Idempotency-Key": uuid.uuid4().hex},
        timeout=300,
    )
    if response.status_code != 202:
        raise RuntimeError(f"broadcast refused: {response.status_code} {response.text}")
    return uuid.UUID(response.json()["id"])


@contextmanager
def profiler(directory: Path | None, pid: int, label: str) -> Iterator[None]:
    """py-spy over the worker while it sends (only with --profile; it costs CPU too)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if directory is None or not Path(spy).exists():
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / f"worker-{label}.txt"
    process = subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--rate",
            "50",
            "--nonblocking",
            "-o",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def measure(
    run: Run,
    *,
    url: str,
    services: Services,
    api_url: str,
    sandbox_url: str,
    token: str,
    group_id: uuid.UUID,
    phones: set[str],
    roles: dict[int, str],
    profile: Path | None,
    final_sent: bool = False,
) -> None:
    """`final_sent`: the sandbox sends no receipts, so `sent` is where rows end."""
    count = len(phones)
    httpx.delete(f"{sandbox_url}/sandbox/messages", timeout=60)
    message_id = post_broadcast(api_url, token, group_id)
    label = f"sc{run.send_concurrency}-wc{run.worker_concurrency}"
    worker = services.start(
        f"worker-{label}",
        "worker",
        "--concurrency",
        str(run.worker_concurrency),
        "--queue",
        "sms",
        extra_env={"SEND_CONCURRENCY": str(run.send_concurrency)},
    )
    roles[worker.process.pid] = "worker"
    try:
        with psycopg.connect(plain_url(url), autocommit=True) as connection:
            deadline = time.monotonic() + 120
            while True:
                services.check()
                states = recipient_states(connection, message_id)
                if states.get("queued", 0) < count:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError("the worker claimed nothing in 120 s")
                time.sleep(0.05)
            first_seen = time.monotonic()
            before = CpuSnapshot.take()
            with profiler(profile, worker.process.pid, label):
                while states.get("queued", 0) + states.get("sending", 0) > 0:
                    time.sleep(0.2)
                    services.check()
                    states = recipient_states(connection, message_id)
                    if time.monotonic() - first_seen > 3600:
                        raise TimeoutError(f"not sent after 3600 s: {states}")
            run.polled = time.monotonic() - first_seen
            after = CpuSnapshot.take()
            run.cpu = cpu_report(before, after, roles)
            while (
                states.get("delivered", 0)
                + (states.get("sent", 0) if final_sent else 0)
                + states.get("failed", 0)
                + states.get("skipped", 0)
                + states.get("undelivered", 0)
                < count
            ):
                time.sleep(0.2)
                services.check()
                states = recipient_states(connection, message_id)
                if time.monotonic() - first_seen > 4200:
                    raise TimeoutError(f"receipts not applied after 4200 s: {states}")
            run.delivered_after = time.monotonic() - first_seen
            run.cpu_delivery = cpu_report(after, CpuSnapshot.take(), roles)
            run.states = states
            first, last, p10, p90 = connection.execute(
                "SELECT min(claimed_at), max(sent_at), "
                "percentile_disc(0.1) WITHIN GROUP (ORDER BY sent_at), "
                "percentile_disc(0.9) WITHIN GROUP (ORDER BY sent_at) "
                "FROM message_recipients WHERE message_id = %s",
                (message_id,),
            ).fetchone() or (None, None, None, None)
            run.elapsed = (last - first).total_seconds()
            run.steady = 0.8 * count / max(1e-9, (p90 - p10).total_seconds())
    finally:
        services.stop(worker)
    log = httpx.get(f"{sandbox_url}/sandbox/messages", timeout=120).json()["data"]
    texts = Counter(str(m["to"][0]["phone_number"]) for m in log)
    run.accepted = len(log)
    run.distinct = len(texts)
    run.twice = sum(1 for n in texts.values() if n > 1)
    if set(texts) != phones:
        raise RuntimeError(f"the sandbox texted {len(set(texts) ^ phones)} phones wrongly")


# --- main -------------------------------------------------------------------------------


def ints(value: str) -> list[int]:
    return [int(v) for v in value.split(",") if v.strip()]


def print_run(run: Run, count: int) -> None:
    rate, base = run.rate(count), run.baseline_rate(count)
    raw = count / run.raw_seconds if run.raw_seconds else 0.0
    verdict = "MET" if rate >= TARGET else "MISSED"
    n = run.send_concurrency
    print(f"\n[SEND_CONCURRENCY={n}, koinonia worker --concurrency {run.worker_concurrency}]")
    lines = [
        (f"baseline: bare httpx, {n} in flight", run.baseline_seconds, base, ""),
        (f"sandbox ceiling: plain sockets, {n} in flight", run.raw_seconds, raw, ""),
        (
            "koinonia: one worker process",
            run.elapsed,
            rate,
            f"  (first claim -> last sent; polled {run.polled:.2f} s)",
        ),
    ]
    for label, seconds, per_second, note in lines:
        print(f"  {label:<46} {seconds:7.2f} s {per_second:7,.0f} SMS/s{note}")
    print(f"  {'  steady state (10 % -> 90 % sent)':<46}           {run.steady:7,.0f} SMS/s")
    print(f"    every receipt applied after {run.delivered_after:.1f} s: {run.states}")
    print(
        f"  worker / httpx baseline {rate / base if base else 0:.2f} x; worker / plain sockets "
        f"{rate / raw if raw else 0:.2f} x"
    )
    print(f"  target >= {TARGET:,.0f} SMS/s per worker process: {verdict}")
    print(
        f"  sandbox accepted {run.accepted:,} texts to {run.distinct:,} phones; "
        f"phones texted twice: {run.twice}"
    )
    print(f"  sending:  {run.cpu}")
    print(f"  receipts: {run.cpu_delivery}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipients", type=int, default=20_000)
    parser.add_argument("--latency-ms", type=int, default=50)
    parser.add_argument("--send-concurrency", type=ints, default=[64])
    parser.add_argument("--worker-concurrency", type=ints, default=[8])
    parser.add_argument(
        "--escalate",
        type=ints,
        default=[128, 256],
        help="SEND_CONCURRENCY values tried in turn while the target is missed",
    )
    parser.add_argument("--profile", type=Path, default=None, help="py-spy raw stacks here")
    parser.add_argument("--logs", type=Path, default=None, help="keep the processes' logs here")
    parser.add_argument(
        "--no-receipts",
        action="store_true",
        help="the sandbox sends no receipts: the worker alone, as when Telnyx and its "
        "webhook traffic run on other machines",
    )
    args = parser.parse_args()
    count: int = args.recipients
    cores = os.cpu_count() or 1
    print(
        f"Koinonia send throughput: {count:,} recipients, sandbox latency {args.latency_ms} ms, "
        f"{cores} CPU cores shared by sandbox, API, worker, PostgreSQL, Redis and this bench"
    )
    Redis.from_url(REDIS_URL).flushdb()
    sandbox_port, api_port = free_port(), free_port()
    sandbox_url, api_url = f"http://127.0.0.1:{sandbox_port}", f"http://127.0.0.1:{api_port}"
    with ExitStack() as stack:
        url = stack.enter_context(scratch_database("koinonia_bench_send"))
        if args.logs is not None:
            logs = args.logs
            logs.mkdir(parents=True, exist_ok=True)
        else:
            logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-send-")))
        env = os.environ | {
            "KOINONIA_ENV": "development",
            "DATABASE_URL": url,
            "REDIS_URL": REDIS_URL,
            "LOG_LEVEL": "WARNING",
            "API_HOST": "127.0.0.1",
            "API_PORT": str(api_port),
            "PUBLIC_BASE_URL": api_url,
            "TELNYX_BASE_URL": sandbox_url,
            "STRIPE_BASE_URL": sandbox_url,
            "TELNYX_PUBLIC_KEY": public_key(),
            "SENDS_PER_SECOND_PER_NUMBER": "100000",
            "RATE_LIMIT_ALLOWLIST": "127.0.0.1",
            "ACCESS_TOKEN_TTL_SECONDS": "86400",
            "SANDBOX_TELNYX_PRIVATE_KEY": SANDBOX_SEED,
            "SANDBOX_TELNYX_WEBHOOK_URL": f"{api_url}/api/v1/webhooks/telnyx",
            "SANDBOX_STRIPE_WEBHOOK_URL": f"{api_url}/api/v1/webhooks/stripe",
            "SANDBOX_PUBLIC_BASE_URL": sandbox_url,
            "SANDBOX_TELNYX_RECEIPTS": "off" if args.no_receipts else "on",
        }
        services = Services(logs, env)
        stack.callback(services.stop_all)
        sandbox = services.start("sandbox", "sandbox", "--port", str(sandbox_port))
        api = services.start("api", "api", "--port", str(api_port))
        roles = {sandbox.process.pid: "sandbox", api.process.pid: "api", os.getpid(): "bench"}
        wait_http(f"{sandbox_url}/sandbox/faults", services)
        wait_http(f"{api_url}/livez", services)
        httpx.post(
            f"{sandbox_url}/sandbox/faults", json={"latency_ms": args.latency_ms}
        ).raise_for_status()

        started = time.perf_counter()
        registered = httpx.post(
            f"{api_url}/api/v1/auth/register",
            json={
                "church_name": "Bench Church",
                "name": "Ruth Miller",
                "email": f"bench-{uuid.uuid4().hex[:8]}@example.org",
                "password": "correct horse battery",
            },
            timeout=30,
        )
        registered.raise_for_status()
        church_id = uuid.UUID(registered.json()["church"]["id"])
        token = str(registered.json()["access_token"])
        plan = [(s, w) for s in args.send_concurrency for w in args.worker_concurrency]
        most_runs = len(plan) + len(args.escalate)
        settings = settings_for(url, redis_url=REDIS_URL)
        asyncio.run(given_number(settings, church_id, count * 2 * most_runs))
        phone_list = [phone_of(i, AREA) for i in range(count)]
        group_id = copy_members(url, settings, church_id, phone_list)
        phones = set(phone_list)
        print(
            f"setup (not timed): church, number, {count:,} members "
            f"in {time.perf_counter() - started:.1f} s"
        )

        runs: list[Run] = []
        escalate = list(args.escalate)
        while plan:
            send_concurrency, worker_concurrency = plan.pop(0)
            run = Run(send_concurrency, worker_concurrency)
            run.baseline_seconds = asyncio.run(baseline(sandbox_url, count, send_concurrency))
            run.raw_seconds = asyncio.run(raw_baseline(sandbox_url, count, send_concurrency))
            measure(
                run,
                url=url,
                services=services,
                api_url=api_url,
                sandbox_url=sandbox_url,
                token=token,
                group_id=group_id,
                phones=phones,
                roles=roles,
                profile=args.profile,
                final_sent=args.no_receipts,
            )
            runs.append(run)
            print_run(run, count)
            if not plan and escalate and max(r.rate(count) for r in runs) < TARGET:
                plan.append((escalate.pop(0), args.worker_concurrency[0]))

    print("\nsummary (SMS/s; target >= 1,000 per worker process)")
    print(
        "  SEND_CONCURRENCY  --concurrency  httpx baseline  plain sockets  worker  steady"
        "  worker/httpx"
    )
    for run in runs:
        rate, base = run.rate(count), run.baseline_rate(count)
        print(
            f"  {run.send_concurrency:16d}  {run.worker_concurrency:13d}  {base:14,.0f}  "
            f"{count / run.raw_seconds:13,.0f}  {rate:6,.0f}  {run.steady:6,.0f}"
            f"  {rate / base if base else 0:12.2f}"
        )


if __name__ == "__main__":
    main()
