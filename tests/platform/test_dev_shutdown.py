"""`koinonia dev` stopped with SIGTERM (a process manager, `timeout`) stops its API,
worker and sandbox as Ctrl-C does, instead of exiting alone and leaving them running."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

from tests.conftest import create_scratch_database, direct_database_url, drop_database
from tests.support.servers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.nopgbouncer]

KOINONIA = Path(sys.executable).with_name("koinonia")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
SANDBOX_PORT = 8010  # `koinonia dev` runs the sandbox there

T = TypeVar("T")


def wait_until(condition: Callable[[], T], *, within: float, what: str | Callable[[], str]) -> T:
    deadline = time.monotonic() + within
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what() if callable(what) else what}: not within {within} s")
        time.sleep(0.1)


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(part) for part in text.split()]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def port_taken(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def scratch_database() -> Iterator[str]:
    name = create_scratch_database("koinonia_dev")
    yield name
    drop_database(name)


def test_sigterm_stops_every_child(scratch_database: str, tmp_path: Path) -> None:
    # `koinonia dev` serves the sandbox on its fixed port: taken means it cannot run here,
    # which must fail, never pass unseen.
    assert not port_taken(SANDBOX_PORT), f"port {SANDBOX_PORT} is taken (another `koinonia dev`?)"
    api_port = free_port()
    log_path = tmp_path / "dev.log"
    with log_path.open("w") as log_file:
        dev = subprocess.Popen(
            [str(KOINONIA), "dev", "--no-seed"],
            env=os.environ
            | {
                "KOINONIA_ENV": "test",
                "DATABASE_URL": direct_database_url(scratch_database),
                "REDIS_URL": REDIS_URL,
                "API_PORT": str(api_port),
                "PUBLIC_BASE_URL": f"http://127.0.0.1:{api_port}",
                "WORKER_METRICS_PORT": "0",
                "WORKER_SHUTDOWN_SECONDS": "5",
                "LOG_LEVEL": "WARNING",
            },
            cwd=tmp_path,  # its dev key goes to tmp_path/var
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    kids: list[int] = []
    try:

        def api_up() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{api_port}/livez", timeout=1).is_success
            except httpx.HTTPError:
                return False

        wait_until(
            lambda: dev.poll() is None and api_up() and len(children(dev.pid)) >= 3,
            within=150,  # `koinonia dev` itself waits up to 120 s for its API
            what=lambda: f"koinonia dev up\n{log_path.read_text(errors='replace')[-3000:]}",
        )
        kids = children(dev.pid)
        dev.send_signal(signal.SIGTERM)
        code = dev.wait(timeout=60)
        assert code is not None
        left = [pid for pid in kids if alive(pid)]
        assert left == [], f"children still running after SIGTERM: {left}"
        assert not port_taken(api_port)
    finally:
        if dev.poll() is None:
            dev.kill()
            dev.wait()
        for pid in kids:  # a failed test leaves nothing behind
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
