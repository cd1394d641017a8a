"""A running Koinonia for the operations tests: `koinonia api` and `koinonia worker` as
subprocesses (each with its own `/metrics`, tracing to an OTLP receiver in this process),
the sandbox in a thread, and a scratch database of their own.

Started once per test session on first use (both the alert and the trace tests read it)
and stopped at the end of the session. It touches nothing of the shared test database.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.conftest import (
    REDIS_URL,
    TELNYX_TEST_SEED,
    create_scratch_database,
    direct_database_url,
    drop_database,
    telnyx_test_public_key,
)
from tests.support.servers import LiveServer, free_port

START_WITHIN = 60.0  # seconds for the processes to answer (imports are slow on a busy box)


@dataclass(frozen=True)
class Span:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    service: str
    kind: int
    attributes: dict[str, Any]


class OtlpReceiver:
    """OTLP/HTTP (protobuf) on a free loopback port: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.add(request)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add(self, request: ExportTraceServiceRequest) -> None:
        spans = []
        for resource_spans in request.resource_spans:
            service = next(
                (
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                ),
                "",
            )
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append(
                        Span(
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            name=span.name,
                            service=service,
                            kind=span.kind,
                            attributes={a.key: _value(a.value) for a in span.attributes},
                        )
                    )
        with self.changed:
            self.spans.extend(spans)
            self.changed.notify_all()

    def wait_for(self, found: Callable[[list[Span]], Any], within: float) -> Any:
        """The first truthy `found(spans)` as spans arrive; fails after `within` seconds."""
        result: Any = None

        def check() -> bool:
            nonlocal result
            result = found(list(self.spans))
            return bool(result)

        with self.changed:
            if not self.changed.wait_for(check, timeout=within):
                names = sorted({(s.service, s.name) for s in self.spans})
                raise AssertionError(f"spans not seen within {within}s; got {names}")
        return result

    def __enter__(self) -> OtlpReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@dataclass
class Process:
    name: str
    command: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    _log: Any = None

    def start(self) -> None:
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            self.command, env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def events(self) -> Iterator[dict[str, Any]]:
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                yield event

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self._log is not None:
            self._log.close()


def wait_until(check: Callable[[], Any], *, within: float, what: str) -> Any:
    """Poll `check` (every 50 ms) until truthy; fail with `what()` after `within` s."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        time.sleep(0.05)


@dataclass
class Stack:
    database: str
    api_url: str
    sandbox_url: str
    otlp: OtlpReceiver
    api: Process
    worker: Process
    worker_metrics_url: str = ""
    stopped: bool = False
    _cleanups: list[Callable[[], None]] = field(default_factory=list)

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        for cleanup in reversed(self._cleanups):
            try:
                cleanup()
            except Exception as error:  # keep cleaning up
                print(f"ops stack cleanup failed: {error!r}", file=sys.stderr)  # noqa: T201


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def start_stack() -> Stack:
    from alembic import command

    from koinonia.cli.database import alembic_config
    from koinonia.sandbox.server import create_sandbox_app
    from koinonia.sandbox.state import SandboxConfig

    cleanups: list[Callable[[], None]] = []
    workdir = Path(tempfile.mkdtemp(prefix="koinonia-ops-"))
    cleanups.append(lambda: shutil.rmtree(workdir, ignore_errors=True))
    database = create_scratch_database("koinonia_ops")
    cleanups.append(lambda: drop_database(database))
    try:
        command.upgrade(alembic_config(direct_database_url(database)), "heads")
        otlp = OtlpReceiver().__enter__()
        cleanups.append(lambda: otlp.__exit__(None, None, None))
        api_port, sandbox_port, metrics_port = free_port(), free_port(), free_port()
        api_url = f"http://127.0.0.1:{api_port}"
        sandbox_url = f"http://127.0.0.1:{sandbox_port}"
        config = SandboxConfig(
            stripe_webhook_url=f"{api_url}/api/v1/webhooks/stripe",
            telnyx_webhook_url=f"{api_url}/api/v1/webhooks/telnyx",
            telnyx_private_key=TELNYX_TEST_SEED,
            public_base_url=sandbox_url,
        )
        sandbox = LiveServer(lambda: create_sandbox_app(config), port=sandbox_port).__enter__()
        cleanups.append(lambda: sandbox.__exit__(None, None, None))
        env = {
            **os.environ,
            "KOINONIA_ENV": "test",
            "DATABASE_URL": direct_database_url(database),
            "REDIS_URL": REDIS_URL,
            "LOG_LEVEL": "INFO",
            "TELNYX_BASE_URL": sandbox_url,
            "STRIPE_BASE_URL": sandbox_url,
            "TELNYX_PUBLIC_KEY": telnyx_test_public_key(),
            "PUBLIC_BASE_URL": api_url,
            "SENDS_PER_SECOND_PER_NUMBER": "2000",
            "TELNYX_ACCOUNT_SENDS_PER_SECOND": "2000",
            "RATE_LIMIT_LOGIN_PER_MINUTE": "100000",
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.url,
            "OTEL_BSP_SCHEDULE_DELAY": "100",  # export spans within 0.1 s
            "WORKER_METRICS_HOST": "127.0.0.1",
            "WORKER_METRICS_PORT": str(metrics_port),
        }
        koinonia = [sys.executable, "-m", "koinonia"]
        api = Process("api", [*koinonia, "api", "--port", str(api_port)], env, workdir / "api.log")
        worker = Process(
            "worker", [*koinonia, "worker", "--concurrency", "4"], env, workdir / "worker.log"
        )
        for process in (api, worker):
            process.start()
            cleanups.append(process.stop)
        stack = Stack(database, api_url, sandbox_url, otlp, api, worker, _cleanups=cleanups)

        def listening() -> int | None:
            assert worker.alive(), worker.tail()
            for event in worker.events():
                if event.get("event") == "worker_metrics_listening":
                    return int(event["port"])
            return None

        port = wait_until(listening, within=START_WITHIN, what=f"worker metrics\n{worker.tail()}")
        stack.worker_metrics_url = f"http://127.0.0.1:{port}/metrics"

        def api_up() -> bool:
            assert api.alive(), api.tail()
            return _http_ok(f"{api_url}/livez")

        wait_until(api_up, within=START_WITHIN, what=f"API /livez\n{api.tail()}")
        wait_until(
            lambda: any(e.get("event") == "worker_running" for e in worker.events()),
            within=START_WITHIN,
            what=f"worker_running\n{worker.tail()}",
        )
        return stack
    except BaseException:
        for cleanup in reversed(cleanups):
            cleanup()
        raise


_stack: Stack | None = None


@pytest.fixture(scope="session")
def ops_stack() -> Iterator[Stack]:
    """The running stack (started on first use; imported by each module that needs it)."""
    global _stack
    if _stack is None or _stack.stopped:
        _stack = start_stack()
    yield _stack
    _stack.stop()
