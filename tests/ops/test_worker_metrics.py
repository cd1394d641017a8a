"""What the worker's gauges mean (queue age, partitions ahead), and the gzip ratio metric."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
from fastapi import FastAPI
from prometheus_client import REGISTRY

from koinonia.jobs import psycopg_conninfo
from koinonia.settings import Settings
from koinonia.worker_metrics import QUEUE_AGE_SQL, QUEUE_SQL, months_ahead, serve
from tests.support.servers import free_port


def _job(cursor: Any, queue: str, status: str, **fields: Any) -> int:
    columns = ["queue_name", "task_name", "status", *fields]
    row = cursor.execute(
        f"INSERT INTO procrastinate_jobs ({', '.join(columns)}) "  # noqa: S608
        f"VALUES ({', '.join(['%s'] * len(columns))}) RETURNING id",
        [queue, "ops:probe", status, *fields.values()],
    ).fetchone()
    return int(row[0])


def _deferred_ago(cursor: Any, job_id: int, minutes: int) -> None:
    cursor.execute(
        "UPDATE procrastinate_events SET at = now() - make_interval(mins => %s) "
        "WHERE job_id = %s AND type = 'deferred'",
        [minutes, job_id],
    )


def test_queue_age_counts_only_jobs_that_could_run_now(settings: Settings) -> None:
    """Rows inserted in a transaction that is rolled back: no worker ever sees them."""
    with psycopg.connect(psycopg_conninfo(settings.database_url)) as connection:
        cursor = connection.cursor()
        waiting = _job(cursor, "ops_a", "todo")
        _deferred_ago(cursor, waiting, 10)
        # Behind a lock a running job holds (one church's batches): waiting by design.
        locked = _job(cursor, "ops_b", "todo", lock="ops-church")
        _deferred_ago(cursor, locked, 20)
        _job(cursor, "ops_b", "doing", lock="ops-church")
        # Due later: scheduled, not ready.
        _job(cursor, "ops_c", "todo", scheduled_at=datetime(2999, 1, 1, tzinfo=UTC))
        # A retry due five minutes ago waits since then, not since it was deferred.
        retried = _job(cursor, "ops_d", "todo")
        _deferred_ago(cursor, retried, 60)
        cursor.execute(
            "UPDATE procrastinate_jobs SET scheduled_at = now() - interval '5 minutes' "
            "WHERE id = %s",
            [retried],
        )
        ages = dict(cursor.execute(QUEUE_AGE_SQL).fetchall())
        depth = {row[0]: row[1:] for row in cursor.execute(QUEUE_SQL).fetchall()}
        connection.rollback()
    assert 590 <= ages["ops_a"] <= 660
    assert "ops_b" not in ages
    assert "ops_c" not in ages
    assert 290 <= ages["ops_d"] <= 360
    assert depth["ops_b"] == (1, 0, 1)  # ready, scheduled, running
    assert depth["ops_c"] == (0, 1, 0)


def test_months_ahead_counts_consecutive_future_partitions() -> None:
    today = datetime(2026, 11, 15, tzinfo=UTC)
    names = {f"message_recipients_p{m}" for m in ("202611", "202612", "202701", "202703")}
    assert months_ahead(names, "message_recipients", today) == 2  # a gap in March
    assert months_ahead(set(), "message_recipients", today) == -1
    assert months_ahead({"message_recipients_p202611"}, "message_recipients", today) == 0


def test_a_second_worker_on_the_host_takes_the_next_port() -> None:
    first_port = free_port()
    first = serve("127.0.0.1", first_port)
    assert first is not None
    second = serve("127.0.0.1", first_port)
    try:
        assert first[2] == first_port
        assert second is not None and second[2] > first_port
        answer = httpx.get(f"http://127.0.0.1:{second[2]}/metrics", timeout=5)
        assert "# HELP koinonia_queue_jobs " in answer.text
    finally:
        for served in (first, second):
            if served is not None:
                served[0].shutdown()
                served[0].server_close()


def _sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def test_gzip_compression_is_measured(client: httpx.AsyncClient, app: FastAPI) -> None:
    before_in = _sample("koinonia_http_gzip_input_bytes_total")
    before_out = _sample("koinonia_http_gzip_output_bytes_total")
    before_count = _sample("koinonia_http_gzip_compression_ratio_count")
    answer = await client.get("/api/openapi.json", headers={"Accept-Encoding": "gzip"})
    assert answer.status_code == 200
    assert answer.headers["content-encoding"] == "gzip"
    raw = len(answer.content)  # httpx decompressed it
    added_in = _sample("koinonia_http_gzip_input_bytes_total") - before_in
    added_out = _sample("koinonia_http_gzip_output_bytes_total") - before_out
    assert added_in == raw
    assert 0 < added_out < raw
    assert _sample("koinonia_http_gzip_compression_ratio_count") == before_count + 1
    # Not compressed when the client does not ask: nothing counted.
    plain = await client.get("/api/openapi.json", headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers
    assert _sample("koinonia_http_gzip_input_bytes_total") - before_in == raw
    # The route label still comes from the matched route (the scope is shared).
    assert (
        REGISTRY.get_sample_value(
            "koinonia_http_requests_total",
            {"method": "GET", "route": "/api/openapi.json", "status": "200"},
        )
        or 0
    ) >= 2
