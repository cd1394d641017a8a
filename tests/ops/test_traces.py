"""One trace from the API request to the Telnyx call, across processes.

`koinonia api` and `koinonia worker` run as subprocesses exporting OTLP/HTTP to a receiver
in this process. A broadcast posted to the API is sent by the worker: the request's span,
the batch job's span and the Telnyx call's span must share one trace id (the job carries
the request's `traceparent`), the job's log lines carry the request's id, and the send
shows on the worker's own `/metrics`.
"""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from koinonia.db import Database
from tests.conftest import direct_database_url, make_settings
from tests.messaging.conftest import give_number
from tests.ops.stack import Span, Stack, ops_stack, wait_until  # noqa: F401 (fixture)
from tests.support.api import add_member, register

# Nothing here goes through the database differently under PgBouncer: one pass is enough.
pytestmark = pytest.mark.nopgbouncer

SPAN_KIND_CLIENT = 3


def _sample(metrics: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in metrics.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        series, value = line.rsplit(" ", 1)
        metric, _, rest = series.partition("{")
        if metric != name:
            continue
        found = ",".join(sorted(p for p in rest.rstrip("}").split(",") if p))
        if found == wanted:
            return float(value)
    return 0.0


def _ancestors(span: Span, by_id: dict[str, Span]) -> set[str]:
    seen: set[str] = set()
    while span.parent_span_id and span.parent_span_id in by_id:
        span = by_id[span.parent_span_id]
        seen.add(span.span_id)
    return seen | ({span.parent_span_id} if span.parent_span_id else set())


async def test_request_job_and_telnyx_call_share_one_trace(ops_stack: Stack) -> None:  # noqa: F811
    stack = ops_stack
    settings = make_settings(database_url=direct_database_url(stack.database))
    database = Database(settings)
    try:
        async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as client:
            account = await register(client)
            await give_number(
                SimpleNamespace(state=SimpleNamespace(database=database)),  # type: ignore[arg-type]
                settings,
                account.church_id,
                100,
            )
            members = [await add_member(client, account) for _ in range(2)]
            request_id = f"ops-trace-{uuid.uuid4().hex}"
            sent = await client.post(
                "/api/v1/messages",
                json={"body": "Choir at 7pm", "member_ids": [m["id"] for m in members]},
                headers=account.headers
                | {"Idempotency-Key": str(uuid.uuid4()), "X-Request-ID": request_id},
            )
            assert sent.status_code == 202, sent.text
            assert sent.headers["X-Request-ID"] == request_id
    finally:
        await database.dispose()

    def chain(spans: list[Span]) -> tuple[Span, Span, Span] | None:
        requests = [
            s for s in spans if s.service == "koinonia" and s.name == "POST /api/v1/messages"
        ]
        for request in requests:
            same = [s for s in spans if s.trace_id == request.trace_id]
            job = next(
                (
                    s
                    for s in same
                    if s.service == "koinonia-worker" and s.name == "job messaging:send_batch"
                ),
                None,
            )
            call = next(
                (
                    s
                    for s in same
                    if s.service == "koinonia-worker"
                    and s.kind == SPAN_KIND_CLIENT
                    and "/v2/messages" in str(s.attributes.get("url.full", s.attributes))
                ),
                None,
            )
            if job and call:
                return request, job, call
        return None

    request, job, call = stack.otlp.wait_for(chain, within=30)
    assert request.trace_id == job.trace_id == call.trace_id
    by_id = {s.span_id: s for s in stack.otlp.spans}
    assert request.span_id in _ancestors(job, by_id)  # the job continues the request
    assert job.span_id in _ancestors(call, by_id)  # the Telnyx call is the job's
    assert job.attributes["messaging.system"] == "procrastinate"

    # The job's own log lines name the request that caused it.
    job_lines = wait_until(
        lambda: [
            e
            for e in stack.worker.events()
            if e.get("request_id") == request_id and e.get("event") == "batch_slice_done"
        ],
        within=10,
        what=f"a batch_slice_done line with request_id {request_id}\n{stack.worker.tail()}",
    )
    assert job_lines[0]["task"] == "messaging:send_batch"
    assert job_lines[0].get("trace_id") == request.trace_id

    # ... and the send is on the worker's /metrics.
    async with httpx.AsyncClient(timeout=5) as http:
        metrics = (await http.get(stack.worker_metrics_url)).text
    assert _sample(metrics, "koinonia_sms_sends_total", kind="broadcast", outcome="sent") >= 2
    assert (
        _sample(
            metrics,
            "koinonia_job_duration_seconds_count",
            task="messaging:send_batch",
            outcome="succeeded",
        )
        >= 1
    )


def test_worker_metrics_show_the_queues(ops_stack: Stack) -> None:  # noqa: F811
    """Database-derived gauges are set by the worker's refresher."""
    metrics: dict[str, Any] = {}

    def refreshed() -> bool:
        metrics["text"] = httpx.get(ops_stack.worker_metrics_url, timeout=5).text
        return _sample(metrics["text"], "koinonia_worker_metrics_refreshed_timestamp_seconds") > 0

    wait_until(refreshed, within=20, what="the worker's first gauge refresh")
    text = metrics["text"]
    assert 'koinonia_queue_jobs{queue="sms",state="ready"}' in text
    assert 'koinonia_queue_oldest_ready_age_seconds{queue="maintenance"}' in text
    assert _sample(text, "koinonia_partitions_months_ahead", table="message_recipients") >= 3
    assert 'koinonia_circuit_state{provider="telnyx"}' in text
    assert "koinonia_dlq_size" in text
