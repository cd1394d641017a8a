"""Open-loop HTTP/1.1 load: requests sent at a fixed arrival rate, latency from the schedule.

    .venv/bin/python -m bench.open_loop --url http://127.0.0.1:8000/api/v1/members?limit=20 \\
        --header "Authorization: Bearer …" --rate 1000 --duration 10 [--warmup 1] [--json]

Request i is due at t0 + i / rate, whatever happened to the earlier ones: it goes out on an
idle keep-alive connection, or on a new one when every connection is busy (up to
`--max-connections`, then it waits for the first connection to free up). Its latency runs
FROM ITS SCHEDULED TIME to the last byte of its answer, so a server that falls behind is
charged for the whole wait of every request it delayed (no coordinated omission). Requests
not answered by the end of the drain (`--drain`, after the last send) count as errors and
as at least (end of the drain − due time) in the percentiles, which are then marked as
lower bounds ("≥"); failed requests (connection refused or closed) count as infinitely
slow. The send lag (dispatch − due time, before any wait for a free connection) is
reported apart: it is the generator's own lateness (timer granularity, its CPU), not the
server's.

Parsing is minimal: status line, `Content-Length`, body, `Connection: close`. No
`Accept-Encoding` is sent (the API then never compresses) and no pipelining is done.

Why our own generator. `wrk` (installed, and used by `bench.read_paths` for capacity) is
closed-loop: each connection sends its next request only after the previous answer, so
when the server stalls, wrk stops offering load and the stall shows in one sample instead
of in every request that should have been sent meanwhile. The tools made for a fixed
arrival rate — wrk2 (constant throughput, corrected histograms), vegeta, k6 — are not
installable here (no Debian package; the npm `k6` package is a stub), and npm's artillery
spends far too much CPU to offer 1,000 req/s from one core. Debian's httperf does fix a
rate, but of new connections, reports means and a median rather than tail percentiles,
and is bound to select(). This one is a few hundred lines of asyncio (uvloop) with
pre-built request bytes and one `asyncio.Protocol` per connection; at 1,000 req/s it used
15-20 % of a core here (`cpu_seconds` in its output says how much).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

MAX_HEAD = 65_536


def build_request(url: str, headers: Sequence[str]) -> tuple[str, int, bytes]:
    """(host, port, raw GET request) for `url` with extra `Name: value` headers."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"only http:// URLs: {url}")
    port = parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [f"GET {target} HTTP/1.1", f"Host: {parts.hostname}:{port}", "User-Agent: open-loop"]
    for header in headers:
        name, sep, value = header.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"a header is 'Name: value', not {header!r}")
        lines.append(f"{name.strip()}: {value.strip()}")
    return parts.hostname, port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest rank (q in 0..100) of an ascending sequence; NaN when empty."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Stats:
    measured_from: float = 0.0
    scheduled: int = 0  # requests due inside the measured window
    latencies: list[float] = field(default_factory=list)  # seconds, measured requests
    send_lags: list[float] = field(default_factory=list)  # dispatch − due: our own lateness
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    connections_opened: int = 0
    most_connections: int = 0
    most_waiting: int = 0  # requests due while every connection (up to the cap) was busy
    waited: int = 0  # measured requests that waited for a connection
    answered_total: int = 0  # warm-up included
    started: float = 0.0  # t0: the first request's due time
    last_answer_any: float = 0.0  # warm-up included


class Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, loader: OpenLoop) -> None:
        self.loader = loader
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.scheduled: float | None = None  # the in-flight request's due time
        self.body_end = -1
        self.status = 0
        self.close_after = False

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.loader.ready(self)

    def data_received(self, data: bytes) -> None:
        if self.scheduled is None:
            self._fail("unexpected bytes")
            return
        self.buffer += data
        if self.body_end < 0:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    self._fail("head too large")
                return
            head = bytes(self.buffer[:end]).split(b"\r\n")
            try:
                self.status = int(head[0].split(b" ", 2)[1])
            except (IndexError, ValueError):
                self._fail("bad status line")
                return
            length = -1
            for line in head[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    self.close_after = True
            if length < 0:
                self._fail("no content-length")
                return
            self.body_end = end + 4 + length
        if len(self.buffer) < self.body_end:
            return
        done = time.perf_counter()
        if len(self.buffer) > self.body_end:
            self._fail("bytes after the body")
            return
        scheduled, status = self.scheduled, self.status
        self.buffer.clear()
        self.scheduled, self.body_end, self.status = None, -1, 0
        self.loader.answered(scheduled, status, done)
        if self.close_after:
            self.close_after = False
            if self.transport is not None:
                self.transport.close()
        else:
            self.loader.ready(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.scheduled is not None:
            scheduled, self.scheduled = self.scheduled, None
            self.loader.failed(scheduled, "closed by the server")
        self.loader.lost(self)

    # ours

    def send(self, scheduled: float, request: bytes) -> None:
        assert self.transport is not None
        self.scheduled = scheduled
        self.transport.write(request)

    def _fail(self, why: str) -> None:
        if self.scheduled is not None:
            scheduled, self.scheduled = self.scheduled, None
            self.loader.failed(scheduled, why)
        if self.transport is not None:
            self.transport.close()


class OpenLoop:
    def __init__(
        self,
        host: str,
        port: int,
        request: bytes,
        *,
        rate: float,
        duration: float,
        warmup: float,
        max_connections: int,
        initial_connections: int,
        drain: float,
    ) -> None:
        self.host, self.port, self.request = host, port, request
        self.rate, self.duration, self.warmup = rate, duration, warmup
        self.max_connections = max(1, max_connections)
        self.initial_connections = max(0, min(initial_connections, self.max_connections))
        self.drain = drain
        self.idle: list[Connection] = []
        self.open: set[Connection] = set()
        self.opening = 0
        self.waiting: deque[float] = deque()  # due requests with no connection yet
        self.outstanding = 0
        self.closing = False
        self.all_sent = False
        self.drained = asyncio.Event()
        self.stats = Stats()

    # --- connection events ----------------------------------------------------------

    def ready(self, connection: Connection) -> None:
        """A new or freed connection: it takes the oldest waiting request, or idles."""
        self.open.add(connection)
        self.stats.most_connections = max(self.stats.most_connections, len(self.open))
        if self.waiting:
            self._send(connection, self.waiting.popleft())
        else:
            self.idle.append(connection)

    def lost(self, connection: Connection) -> None:
        self.open.discard(connection)
        if connection in self.idle:
            self.idle.remove(connection)
        if self.waiting and not self.closing:
            self._grow()

    def answered(self, scheduled: float, status: int, done: float) -> None:
        self._settled()
        self.stats.answered_total += 1
        self.stats.last_answer_any = max(self.stats.last_answer_any, done)
        if scheduled >= self.stats.measured_from and not self.closing:
            self.stats.latencies.append(done - scheduled)
            self.stats.statuses[status] += 1

    def failed(self, scheduled: float, why: str) -> None:
        self._settled()
        if scheduled >= self.stats.measured_from and not self.closing:
            self.stats.errors[why] += 1

    def _settled(self) -> None:
        self.outstanding -= 1
        if self.all_sent and self.outstanding == 0:
            self.drained.set()

    # --- sending --------------------------------------------------------------------

    def _send(self, connection: Connection, scheduled: float) -> None:
        connection.send(scheduled, self.request)

    def _grow(self) -> None:
        if len(self.open) + self.opening >= self.max_connections:
            return
        self.opening += 1
        self.stats.connections_opened += 1
        loop = asyncio.get_running_loop()
        task = loop.create_task(
            loop.create_connection(lambda: Connection(self), self.host, self.port)
        )
        task.add_done_callback(self._opened)

    def _opened(self, task: asyncio.Task[Any]) -> None:
        self.opening -= 1
        if task.cancelled() or self.closing:
            return
        error = task.exception()
        if error is not None:
            # Each failed connect costs one waiting request, so a dead server ends the run.
            if self.waiting:
                self.failed(self.waiting.popleft(), f"connect: {type(error).__name__}")
            if self.waiting:
                self._grow()

    def dispatch(self, scheduled: float) -> None:
        self.outstanding += 1
        measured = scheduled >= self.stats.measured_from
        if measured:
            self.stats.send_lags.append(time.perf_counter() - scheduled)
        if self.idle:
            self._send(self.idle.pop(), scheduled)
            return
        self.waiting.append(scheduled)
        if measured:
            self.stats.waited += 1
            self.stats.most_waiting = max(self.stats.most_waiting, len(self.waiting))
        self._grow()

    def pending(self) -> list[float]:
        """Due times of the measured requests sent or waiting and not answered yet."""
        due = [c.scheduled for c in self.open if c.scheduled is not None] + list(self.waiting)
        return [s for s in due if s >= self.stats.measured_from]

    async def run(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        # Connections opened before the clock starts: their connect is not measured.
        for _ in range(self.initial_connections):
            self.opening += 1
            self.stats.connections_opened += 1
            try:
                await loop.create_connection(lambda: Connection(self), self.host, self.port)
            finally:
                self.opening -= 1
        cpu_before = os.times()
        total = round(self.rate * (self.warmup + self.duration))
        first_measured = round(self.rate * self.warmup)
        t0 = self.stats.started = time.perf_counter() + 0.01
        self.stats.measured_from = t0 + first_measured / self.rate
        self.stats.scheduled = total - first_measured
        i = 0
        while i < total:
            now = time.perf_counter()
            while i < total and t0 + i / self.rate <= now:
                self.dispatch(t0 + i / self.rate)
                i += 1
            if i < total:
                delay = t0 + i / self.rate - time.perf_counter()
                await asyncio.sleep(max(0.0, delay))
        last_due = t0 + (total - 1) / self.rate
        self.all_sent = True
        if self.outstanding > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.drained.wait(), self.drain)
        cpu_after = os.times()
        cpu = cpu_after.user + cpu_after.system - cpu_before.user - cpu_before.system
        summary = self._summary(self.outstanding, last_due, cpu, self.pending())
        self.closing = True  # what the closes below report is not counted
        for connection in list(self.open):
            if connection.transport is not None:
                connection.transport.close()
        await asyncio.sleep(0.01)
        return summary

    def _summary(
        self, unanswered: int, last_due: float, cpu: float, pending: list[float]
    ) -> dict[str, Any]:
        stats = self.stats
        now = time.perf_counter()
        # Latency entries (seconds, is-a-lower-bound): answered requests exactly; requests
        # still unanswered at the end of the drain at least (now − due); failed ones
        # (connection errors, closed) as infinite.
        entries = [(latency, False) for latency in stats.latencies]
        entries += [(now - due, True) for due in pending]
        failed = sum(stats.errors.values())
        entries += [(math.inf, False)] * failed
        if pending:
            stats.errors["unanswered at the end of the drain"] += len(pending)
        entries.sort()
        ok = sum(n for status, n in stats.statuses.items() if 200 <= status < 300)
        # The server's throughput over the run: every answer (warm-up included, so that a
        # backlog left by the warm-up does not count against it), first due → last answer.
        span = stats.last_answer_any - stats.started if stats.answered_total else 0.0
        lags = sorted(stats.send_lags)

        def ms(value: float) -> float | None:
            return None if math.isinf(value) or math.isnan(value) else round(value * 1000, 3)

        def at(q: float) -> tuple[float | None, bool]:
            """The q-th percentile (nearest rank) in ms, and whether it is a lower bound:
            true when an unanswered request ranks at or below it."""
            if not entries:
                return None, False
            rank = max(1, math.ceil(q / 100 * len(entries)))
            return ms(entries[rank - 1][0]), any(bound for _, bound in entries[:rank])

        figures: dict[str, Any] = {}
        for name, q in (("p50", 50), ("p90", 90), ("p95", 95), ("p99", 99), ("p999", 99.9)):
            figures[f"{name}_ms"], figures[f"{name}_at_least"] = at(q)
        figures["max_ms"], figures["max_at_least"] = at(100)
        return {
            "offered_rate": self.rate,
            "duration_s": self.duration,
            "warmup_s": self.warmup,
            "drain_s": self.drain,
            "scheduled": stats.scheduled,
            "answered": len(stats.latencies),
            "answered_total": stats.answered_total,
            "ok": ok,
            "statuses": {str(k): v for k, v in sorted(stats.statuses.items())},
            "errors": dict(stats.errors),
            "non_2xx": len(stats.latencies) - ok,
            "unanswered_total": unanswered,
            # sent and not answered (warm-up included): the server may still serve them
            "in_flight_at_end": sum(1 for c in self.open if c.scheduled is not None),
            "achieved_rate": round(stats.answered_total / span, 1) if span > 0 else 0.0,
            "send_window_s": round(last_due - stats.measured_from, 3),
            **figures,
            "send_lag_p50_ms": ms(percentile(lags, 50)),
            "send_lag_p99_ms": ms(percentile(lags, 99)),
            "send_lag_max_ms": ms(lags[-1]) if lags else None,
            "waited_for_connection": stats.waited,
            "most_waiting": stats.most_waiting,
            "connections_opened": stats.connections_opened,
            "most_connections": stats.most_connections,
            "cpu_seconds": round(cpu, 3),
        }


def run(
    url: str,
    headers: Sequence[str],
    *,
    rate: float,
    duration: float,
    warmup: float = 1.0,
    max_connections: int = 512,
    initial_connections: int = 16,
    drain: float | None = None,
) -> dict[str, Any]:
    """One open-loop run in this process (uvloop); answers the summary dict."""
    import uvloop

    host, port, request = build_request(url, headers)
    loader = OpenLoop(
        host,
        port,
        request,
        rate=rate,
        duration=duration,
        warmup=warmup,
        max_connections=max_connections,
        initial_connections=initial_connections,
        drain=max(10.0, duration) if drain is None else drain,
    )
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(loader.run())


def fmt_latency(result: dict[str, Any], name: str) -> str:
    """`p99` → "12.3", "≥4,120.0" (a lower bound: unanswered requests) or "inf"."""
    value = result.get(f"{name}_ms")
    if value is None:
        return "inf"
    text = f"{value:,.1f}" if value >= 10 else f"{value:.2f}"
    return ("≥" + text) if result.get(f"{name}_at_least") else text


def describe(result: dict[str, Any]) -> str:
    lag = result["send_lag_p99_ms"]
    return (
        f"offered {result['offered_rate']:g} req/s for {result['duration_s']:g} s "
        f"({result['scheduled']} requests): achieved {result['achieved_rate']:.0f} req/s, "
        f"answered {result['answered']} ({result['ok']} 2xx), statuses {result['statuses']}, "
        f"errors {result['errors'] or 0}; latency from the schedule p50 "
        f"{fmt_latency(result, 'p50')} / p95 {fmt_latency(result, 'p95')} / p99 "
        f"{fmt_latency(result, 'p99')} / max {fmt_latency(result, 'max')} ms; send lag p99 "
        f"{'inf' if lag is None else f'{lag:.2f}'} ms; {result['waited_for_connection']} "
        f"waited for a connection; connections {result['most_connections']} (opened "
        f"{result['connections_opened']}); generator CPU {result['cpu_seconds']:.2f} s"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True)
    parser.add_argument("-H", "--header", action="append", default=[], help="'Name: value'")
    parser.add_argument("--rate", type=float, default=1000.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds sent, not measured")
    parser.add_argument("--max-connections", type=int, default=512)
    parser.add_argument("--connections", type=int, default=16, help="opened before the start")
    parser.add_argument("--drain", type=float, default=None, help="seconds (max(10, duration))")
    parser.add_argument("--json", action="store_true", help="one JSON line on stdout")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0 or args.warmup < 0:
        parser.error("--rate and --duration must be positive, --warmup not negative")
    result = run(
        args.url,
        args.header,
        rate=args.rate,
        duration=args.duration,
        warmup=args.warmup,
        max_connections=args.max_connections,
        initial_connections=args.connections,
        drain=args.drain,
    )
    if args.json:
        sys.stdout.write("OPEN_LOOP_JSON " + json.dumps(result) + "\n")
    else:
        sys.stdout.write(describe(result) + "\n")


if __name__ == "__main__":
    main()
