"""The worker process: procrastinate jobs plus the features' long-running loops, supervised.

procrastinate stops its worker when one of its side tasks fails — in practice the LISTEN
connection when PostgreSQL restarts ("listener failed … stopping worker") — and its
shutdown then waits on the dead pool (30 s per statement); the process used to exit, or to
stay alive running nothing. So `run_worker` runs the worker in *attempts*. Each attempt
opens everything that holds connections (a fresh procrastinate App — pool and LISTEN
connection —, the job resources, the Telnyx loops) and watches four things: the
procrastinate worker, the loops, its own database probe and a stop request. When any of
them ends, the attempt is torn down (a bounded graceful stop: running jobs get a few
seconds) and:

- the database does not answer → `worker_db_lost`; it is polled with backoff and, when it
  answers, `worker_db_reconnected` and a new attempt; still unreachable after
  `WORKER_DB_GRACE_SECONDS` → `worker_giving_up` and exit status 75 (EX_TEMPFAIL), so the
  supervisor (systemd `Restart=always`, `koinonia dev`) starts a fresh process;
- otherwise (a side task or a loop died, the worker returned by itself) →
  `worker_restarting` and a new attempt after a short backoff.

Every new attempt counts in `koinonia_worker_restarts_total{reason}`, served with the rest of
the worker's metrics on its own port (`koinonia.worker_metrics`), which outlives attempts;
with `OTEL_EXPORTER_OTLP_ENDPOINT` set, jobs and their SQL, Redis and HTTP calls are traced
(as service `<OTEL_SERVICE_NAME>-worker`). SIGTERM/SIGINT stop
the worker gracefully: no new jobs are claimed, broadcast slices end after writing back
the sends in flight (`koinonia.jobs.draining`), and running jobs get
`WORKER_SHUTDOWN_SECONDS` to finish before they are cancelled; a second signal cancels them
at once; a third one gets the default behaviour.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, NoReturn

import psycopg
import structlog
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from procrastinate.exceptions import ProcrastinateException
from prometheus_client import Counter
from redis.exceptions import RedisError
from sqlalchemy.exc import DBAPIError

from koinonia.jobs import build_job_app, open_resources, psycopg_conninfo, set_draining
from koinonia.logging import configure_logging
from koinonia.runtime import freeze_startup_objects
from koinonia.settings import Settings
from koinonia.tracing import build_tracer_provider, instrument_clients, instrument_engine
from koinonia.worker_metrics import WorkerMetrics

log = structlog.get_logger("koinonia.worker")

EXIT_DB_UNREACHABLE = 75  # EX_TEMPFAIL: "try again later" — for the supervisor
PROBE_EVERY_SECONDS = 1.0  # the running attempt's database probe
PROBE_TIMEOUT_SECONDS = 5.0  # a probe slower than this counts as a failure
PROBE_FAILURES_LOST = 3  # consecutive slow/failed probes on a live connection = lost
TEARDOWN_SECONDS = 5.0  # a failed attempt's running jobs get this long to finish
STABLE_AFTER_SECONDS = 30.0  # an attempt that ran this long resets the restart backoff
BACKOFF_FIRST_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 5.0
FORCED_EXIT_AFTER_SECONDS = 10.0  # when giving up, if the interpreter does not exit by then

# What opening or closing an attempt raises when the database (or Redis) is not there.
CONNECTION_ERRORS = (
    psycopg.Error,
    DBAPIError,
    ProcrastinateException,
    RedisError,
    OSError,
    TimeoutError,
)

WORKER_RESTARTS = Counter(
    "koinonia_worker_restarts_total",
    "Worker restarts (a new procrastinate App and loops) after a failure, by reason",
    ["reason"],
)


@dataclass(frozen=True)
class Outcome:
    """Why an attempt ended, and when (monotonic)."""

    reason: str  # stopped | db_lost | worker_failed | worker_stopped | loop_died | open_failed
    detail: str
    at: float


class StopRequest:
    """SIGTERM/SIGINT: the first stops gracefully, the second cancels the running jobs,
    a third gets the default behaviour (the handlers are removed)."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.hard = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals can only be handled on the main thread
        self._loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._loop.add_signal_handler(signum, self._on_signal, signum)

    def uninstall(self) -> None:
        if self._loop is not None:
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._loop.remove_signal_handler(signum)
            self._loop = None

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if not self.requested.is_set():
            log.info("worker_stop_requested", signal=name)
            set_draining(True)
            self.requested.set()
        else:
            log.warning("worker_stop_forced", signal=name)
            self.hard.set()
            self.uninstall()


async def run_worker(settings: Settings, *, concurrency: int, queues: list[str] | None) -> None:
    configure_logging(settings.log_level, settings.log_file, settings.log_file_backup_count)
    log.info(
        "worker_starting",
        concurrency=concurrency,
        queues=queues or "all",
        db_grace_seconds=settings.worker_db_grace_seconds,
    )
    options: dict[str, Any] = {
        "concurrency": concurrency,
        # Signals are ours (StopRequest): procrastinate's handlers are installed per run
        # and removed when it stops by itself, which would leave gaps between attempts.
        "install_signal_handlers": False,
        "fetch_job_polling_interval": settings.worker_poll_seconds,
    }
    if queues:  # procrastinate listens to every queue unless told otherwise
        options["queues"] = queues
    provider = build_tracer_provider(settings, service_name=f"{settings.otel_service_name}-worker")
    if provider is not None:
        trace.set_tracer_provider(provider)  # the job spans (koinonia.job_telemetry)
        instrument_clients(provider, [])  # Redis and httpx; engines per attempt
    metrics = WorkerMetrics(settings)
    await metrics.start()
    freeze_startup_objects()  # everything imported and built so far lives for good
    stop = StopRequest()
    stop.install()
    try:
        await supervise(settings, options, pool_max=concurrency + 2, stop=stop)
    finally:
        stop.uninstall()
        await metrics.stop()
        if provider is not None:
            provider.shutdown()  # flushes the spans still batched
    log.info("worker_stopped")


async def supervise(
    settings: Settings, options: dict[str, Any], *, pool_max: int, stop: StopRequest
) -> None:
    """Run attempts until a stop is requested; raise SystemExit(75) when the database
    stays unreachable longer than `settings.worker_db_grace_seconds`."""
    grace = settings.worker_db_grace_seconds
    lost_at: float | None = None  # the database is known to be unreachable since
    last: Outcome | None = None
    short_runs = 0  # consecutive attempts that ended before STABLE_AFTER_SECONDS
    while not stop.requested.is_set():
        if lost_at is None and not await database_answers(settings):
            lost_at = last.at if last else time.monotonic()  # an outage began by then
            log.warning(
                "worker_db_lost", after=last.reason if last else "start", grace_seconds=grace
            )
        if lost_at is not None:
            if not await wait_for_database(settings, stop, lost_at, grace):
                if stop.requested.is_set():
                    break
                give_up(lost_at, grace)
            log.info("worker_db_reconnected", down_seconds=round(time.monotonic() - lost_at, 1))
            lost_at = None
        elif last is not None:
            delay = min(BACKOFF_MAX_SECONDS, BACKOFF_FIRST_SECONDS * 2 ** max(0, short_runs - 1))
            log.warning("worker_restarting", reason=last.reason, in_seconds=delay)
            if await stopped_within(stop, delay):
                break
        if last is not None:
            WORKER_RESTARTS.labels(reason=last.reason).inc()
        started = time.monotonic()
        try:
            outcome = await run_attempt(settings, options, pool_max=pool_max, stop=stop)
        except CONNECTION_ERRORS as error:  # opening the App or the resources failed
            log.warning("worker_attempt_failed", error=repr(error))
            outcome = Outcome("open_failed", repr(error), time.monotonic())
        except Exception as error:  # a bug (an import, a setting): retrying will not help
            log.error("worker_giving_up", error=repr(error))
            raise
        if outcome.reason == "stopped":
            break
        short_runs = 0 if outcome.at - started >= STABLE_AFTER_SECONDS else short_runs + 1
        if outcome.reason == "db_lost":
            lost_at = outcome.at  # run_attempt logged worker_db_lost
        last = outcome


def give_up(lost_at: float, grace: float) -> NoReturn:
    """Exit non-zero for the supervisor. asyncio.run cancels what is left on the way out;
    should a task refuse to finish (a job stuck in a C call), the process still exits."""
    down = round(time.monotonic() - lost_at, 1)
    log.error("worker_giving_up", down_seconds=down, grace_seconds=grace)

    def force() -> None:
        logging.shutdown()
        os._exit(EXIT_DB_UNREACHABLE)

    timer = threading.Timer(FORCED_EXIT_AFTER_SECONDS, force)
    timer.daemon = True
    timer.start()
    raise SystemExit(EXIT_DB_UNREACHABLE)


async def stopped_within(stop: StopRequest, seconds: float) -> bool:
    """Wait `seconds` unless a stop is requested first; True if it was."""
    try:
        async with asyncio.timeout(seconds):
            await stop.requested.wait()
    except TimeoutError:
        return False
    return True


async def database_answers(settings: Settings) -> bool:
    """Whether a fresh connection to the database answers `SELECT 1`."""
    timeout = max(1.0, min(settings.database_connect_timeout, PROBE_TIMEOUT_SECONDS))
    try:
        async with asyncio.timeout(timeout + 1):
            connection = await psycopg.AsyncConnection.connect(
                psycopg_conninfo(settings.database_url),
                autocommit=True,
                connect_timeout=max(1, int(timeout)),
                prepare_threshold=None,
                application_name="koinonia-worker-probe",
            )
            async with connection:
                await connection.execute("SELECT 1")
    except (psycopg.Error, OSError, TimeoutError):
        return False
    return True


async def wait_for_database(
    settings: Settings, stop: StopRequest, lost_at: float, grace: float
) -> bool:
    """Poll the database with backoff until it answers (True) or the grace period since
    `lost_at` is over or a stop is requested (False)."""
    delay = BACKOFF_FIRST_SECONDS
    while True:
        if await database_answers(settings):
            return True
        remaining = grace - (time.monotonic() - lost_at)
        if remaining <= 0 or await stopped_within(stop, min(delay, remaining)):
            return False
        delay = min(BACKOFF_MAX_SECONDS, delay * 2)


async def watch_database(settings: Settings) -> str:
    """Hold one connection and query it every second; return (why) when the database is
    lost — the connection broke (a restart ends every session, LISTEN included) or it
    stopped answering. Raises if it cannot connect at all."""
    connection = await psycopg.AsyncConnection.connect(
        psycopg_conninfo(settings.database_url),
        autocommit=True,
        connect_timeout=max(1, int(min(settings.database_connect_timeout, PROBE_TIMEOUT_SECONDS))),
        prepare_threshold=None,
        application_name="koinonia-worker-probe",
    )
    async with connection:
        failures = 0
        while True:
            await asyncio.sleep(PROBE_EVERY_SECONDS)
            try:
                async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
                    await connection.execute("SELECT 1")
                failures = 0
            except (psycopg.Error, TimeoutError) as error:
                if connection.broken or connection.closed:
                    return f"probe connection lost: {error!r}"
                failures += 1
                if failures >= PROBE_FAILURES_LOST:
                    return f"{failures} probes failed: {error!r}"


async def run_attempt(
    settings: Settings, options: dict[str, Any], *, pool_max: int, stop: StopRequest
) -> Outcome:
    """One procrastinate worker with fresh connections, until something ends it."""
    from koinonia.telnyx.loops import running_loops

    grace = settings.worker_db_grace_seconds

    # The job queue's pool and its LISTEN go to DATABASE_DIRECT_URL (PostgreSQL itself);
    # the jobs' SQLAlchemy pool, the probe and the metrics follow DATABASE_URL.
    job_app = build_job_app(settings, pool_max=pool_max, direct=True)
    async with (
        job_app.open_async(),
        open_resources(settings, job_app) as job,
        running_loops(job) as loops,
    ):
        provider = trace.get_tracer_provider()
        if isinstance(provider, TracerProvider):
            instrument_engine(provider, job.database.engine)
        runner = asyncio.create_task(job_app.run_worker_async(**options), name="job-runner")
        probe = asyncio.create_task(watch_database(settings), name="database-probe")
        stopping = asyncio.create_task(stop.requested.wait(), name="stop-request")
        watched: set[asyncio.Task[Any]] = {runner, probe, stopping, *loops}
        log.info("worker_running")
        try:
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            outcome = classify(done, runner=runner, probe=probe, stopping=stopping)
            if outcome.reason == "db_lost":
                log.warning("worker_db_lost", detail=outcome.detail, grace_seconds=grace)
            elif outcome.reason != "stopped":
                log.warning("worker_attempt_ended", reason=outcome.reason, detail=outcome.detail)
        finally:
            for task in (probe, stopping):
                task.cancel()
            await asyncio.wait({probe, stopping})
            await stop_runner(runner, stop, shutdown_seconds=settings.worker_shutdown_seconds)
        return outcome


def _describe(task: asyncio.Task[Any]) -> str:
    if task.cancelled():
        return f"{task.get_name()} cancelled"
    error = task.exception()
    if error is not None:
        cause = error.__cause__
        return f"{task.get_name()} failed: {error!r}" + (f" ({cause!r})" if cause else "")
    return f"{task.get_name()} returned {task.result()!r}"


def classify(
    done: set[asyncio.Task[Any]],
    *,
    runner: asyncio.Task[Any],
    probe: asyncio.Task[Any],
    stopping: asyncio.Task[Any],
) -> Outcome:
    now = time.monotonic()
    if stopping in done:
        return Outcome("stopped", "stop requested", now)
    if probe in done:
        return Outcome("db_lost", _describe(probe), now)
    if runner in done:
        failed = runner.cancelled() or runner.exception() is not None
        return Outcome("worker_failed" if failed else "worker_stopped", _describe(runner), now)
    loop = next(iter(done))  # one of the feature loops: they are meant to run forever
    return Outcome("loop_died", _describe(loop), now)


async def stop_runner(
    runner: asyncio.Task[Any], stop: StopRequest, *, shutdown_seconds: float
) -> None:
    """Stop the procrastinate worker. Cancelling `run_worker_async` is its graceful stop
    (no new jobs, running ones finish); a second cancel aborts the running jobs.

    On a stop request the running jobs get `shutdown_seconds` (WORKER_SHUTDOWN_SECONDS)
    to finish, or until a second signal; after a failure they get TEARDOWN_SECONDS, as the
    worker's own shutdown would otherwise wait on a dead pool. A send cancelled mid-call
    stays `sending` and is settled by its receipt or the reconciler, never sent twice.
    """
    if not runner.done():
        runner.cancel()
        if stop.requested.is_set():
            hard = asyncio.create_task(stop.hard.wait())
            await asyncio.wait(
                {runner, hard}, timeout=shutdown_seconds, return_when=asyncio.FIRST_COMPLETED
            )
            hard.cancel()
            if not runner.done():
                log.warning("worker_shutdown_timeout", shutdown_seconds=shutdown_seconds)
        else:
            await asyncio.wait({runner}, timeout=TEARDOWN_SECONDS)
        if not runner.done():
            log.warning("worker_jobs_aborted")
            runner.cancel()
            await asyncio.wait({runner}, timeout=TEARDOWN_SECONDS)
        if not runner.done():
            log.error("worker_runner_abandoned")
            return
    if not runner.cancelled() and runner.exception() is not None:
        log.debug("worker_runner_error", error=repr(runner.exception()))
