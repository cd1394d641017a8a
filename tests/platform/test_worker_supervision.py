"""A real `koinonia worker` process against a private PostgreSQL cluster that restarts and
goes away: the worker reconnects after a restart and runs jobs deferred afterwards, and
exits non-zero (for its supervisor) when the database stays away past its grace period.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest

from tests.support.pgcluster import PgCluster

pytestmark = [pytest.mark.slow, pytest.mark.nopgbouncer]

KOINONIA = Path(sys.executable).with_name("koinonia")  # .venv/bin/koinonia
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
PARTITIONS_TASK = "messaging:ensure_partitions"  # queue `maintenance`, needs no Telnyx

T = TypeVar("T")


def wait_until(condition: Callable[[], T], *, within: float, every: float = 0.1, what: str) -> T:
    """Poll `condition` until it returns something truthy; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within} s")
        time.sleep(every)


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    with PgCluster() as private:
        private.create_app_database()
        yield private


@pytest.fixture
def database_url(cluster: PgCluster) -> str:
    if not cluster.running:  # a test that stopped it failed before starting it again
        cluster.start()
    return cluster.url()


class WorkerProcess:
    """`koinonia worker` as a subprocess; its JSON log lines go to a file."""

    def __init__(self, database_url: str, log_path: Path, **env: str) -> None:
        self.log_path = log_path
        self._log = log_path.open("w")
        self.process = subprocess.Popen(
            [str(KOINONIA), "worker", "--concurrency", "2", "--queue", "maintenance"],
            env=os.environ
            | {
                "KOINONIA_ENV": "test",
                "DATABASE_URL": database_url,
                "REDIS_URL": REDIS_URL,
                "LOG_LEVEL": "INFO",
                "WORKER_POLL_SECONDS": "1",
                **env,
            },
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def events(self) -> list[str]:
        names = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                names.append(str(json.loads(line).get("event")))
            except (ValueError, AttributeError):
                continue
        return names

    def wait_running(self, times: int = 1, within: float = 20.0) -> None:
        wait_until(
            lambda: self.process.poll() is None and self.events().count("worker_running") >= times,
            within=within,
            what=f"worker_running #{times}\n{self.log_tail()}",
        )

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(database_url: str, **env: str) -> WorkerProcess:
        worker = WorkerProcess(database_url, tmp_path / f"worker-{len(started)}.log", **env)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def defer_partitions_job(database_url: str) -> int:
    """Defer the (cheap) partitions job through procrastinate from this process."""
    from koinonia.jobs import build_job_app, defer
    from koinonia.settings import load_settings

    settings = load_settings(KOINONIA_ENV="test", database_url=database_url, redis_url=REDIS_URL)

    async def run() -> int:
        job_app = build_job_app(settings)
        async with job_app.open_async():
            return await defer(
                job_app, PARTITIONS_TASK, queue="maintenance", timestamp=int(time.time())
            )

    return asyncio.run(run())


def job_status(cluster: PgCluster, job_id: int) -> Any:
    try:
        with psycopg.connect(cluster.conninfo("koinonia"), autocommit=True) as connection:
            row = connection.execute(
                "SELECT status FROM procrastinate_jobs WHERE id = %s", (job_id,)
            ).fetchone()
    except psycopg.OperationalError:
        return None
    return row[0] if row else None


def test_worker_reconnects_after_a_database_restart(
    cluster: PgCluster, database_url: str, start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker(database_url, WORKER_DB_GRACE_SECONDS="60")
    worker.wait_running()
    before = defer_partitions_job(database_url)
    wait_until(
        lambda: job_status(cluster, before) == "succeeded",
        within=15,
        what=f"job before the restart\n{worker.log_tail()}",
    )

    cluster.restart(down_seconds=3)

    after = defer_partitions_job(database_url)
    wait_until(
        lambda: job_status(cluster, after) == "succeeded",
        within=30,
        what=f"job deferred after the restart\n{worker.log_tail()}",
    )
    assert worker.process.poll() is None, worker.log_tail()
    events = worker.events()
    assert "worker_db_lost" in events, worker.log_tail()
    assert "worker_db_reconnected" in events, worker.log_tail()
    assert events.count("worker_running") >= 2
    assert worker.stop() == 0, worker.log_tail()


def test_worker_exits_non_zero_when_the_database_stays_away(
    cluster: PgCluster, database_url: str, start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker(database_url, WORKER_DB_GRACE_SECONDS="3")
    worker.wait_running()
    cluster.stop()
    try:
        wait_until(
            lambda: worker.process.poll() is not None,
            within=30,
            what=f"worker exit\n{worker.log_tail()}",
        )
    finally:
        cluster.start()
    code = worker.process.returncode
    assert code != 0, worker.log_tail()
    events = worker.events()
    assert "worker_db_lost" in events, worker.log_tail()
    assert "worker_giving_up" in events, worker.log_tail()


def test_dev_restarts_a_worker_that_exited(monkeypatch: pytest.MonkeyPatch) -> None:
    from koinonia.cli import dev

    monkeypatch.setattr(dev, "RESTART_FIRST_SECONDS", 0.1)
    slot = dev.WorkerSlot([sys.executable, "-c", "raise SystemExit(75)"], dict(os.environ))
    slot.start()
    first = slot.process
    assert first is not None

    def restarted() -> bool:
        slot.tick()
        return slot.process is not first

    wait_until(restarted, within=10, every=0.05, what="the worker slot restarted its process")
    assert first.returncode == 75
    assert slot.delay > 0.1  # the next restart waits longer
    assert slot.process is not None
    slot.process.wait(timeout=10)
