"""What a job carries from the code that deferred it, and what its run records.

Deferring (`koinonia.jobs.defer*`) adds one reserved argument, `_trace`, to the job's
arguments in `procrastinate_jobs.args`: the W3C `traceparent` (and `tracestate`) of the
active span and the request id of the API request being served (or of the job doing the
deferring). `job_middleware`, a procrastinate worker middleware every worker runs, takes it
out again before the task function is called, and runs the task:

- inside a span `job <task>` whose parent is the deferring span, so the API request, the
  batch job and the Telnyx/Stripe calls it makes share one trace id;
- with `request_id`, `job_id` and `task` bound in structlog's context variables, so every
  log line the job writes names the request that caused it;
- timed into `koinonia_job_duration_seconds{task,outcome}`.

A job deferred before this existed, or by code with nothing to carry, has no `_trace` and
runs the same way (a new trace, no request id).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog
from asgi_correlation_id import correlation_id
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from prometheus_client import Histogram

from koinonia.tracing import context_from_headers, trace_headers

TRACE_KWARG = "_trace"
JOB_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)

JOB_DURATION = Histogram(
    "koinonia_job_duration_seconds",
    "Job runs by task and outcome (succeeded; failed: raised, then retried or given up)",
    ["task", "outcome"],
    buckets=JOB_BUCKETS,
)

_tracer = trace.get_tracer("koinonia.jobs")


def carried_context() -> dict[str, str]:
    """What a job deferred now should carry: the trace headers and the request id."""
    carried = trace_headers()
    request_id = correlation_id.get() or structlog.contextvars.get_contextvars().get("request_id")
    if request_id:
        carried["request_id"] = str(request_id)
    return carried


def with_carried_context(
    task_kwargs: Mapping[str, Any], carried: dict[str, str] | None = None
) -> dict[str, Any]:
    """The task's arguments plus `_trace` when there is something to carry."""
    carried = carried_context() if carried is None else carried
    if not carried:
        return dict(task_kwargs)
    return {**task_kwargs, TRACE_KWARG: carried}


async def job_middleware(call_next: Callable[[], Awaitable[Any]], context: Any, worker: Any) -> Any:
    """procrastinate worker middleware: restore what the job carries, trace and time it."""
    job = context.job
    raw = job.task_kwargs.pop(TRACE_KWARG, None)  # the task function never sees it
    carried: dict[str, str] = (
        {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
    )
    bound: dict[str, Any] = {"job_id": job.id, "task": job.task_name}
    if carried.get("request_id"):
        bound["request_id"] = carried["request_id"]
    started = time.perf_counter()
    outcome = "failed"
    with (
        structlog.contextvars.bound_contextvars(**bound),
        _tracer.start_as_current_span(
            f"job {job.task_name}",
            context=context_from_headers(carried),
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "procrastinate",
                "messaging.destination.name": str(job.queue),
                "messaging.message.id": str(job.id),
                "koinonia.job.task": str(job.task_name),
                "koinonia.job.attempts": int(job.attempts or 0),
            },
        ),
    ):
        try:
            result = await call_next()
            outcome = "succeeded"
            return result
        finally:
            JOB_DURATION.labels(job.task_name, outcome).observe(time.perf_counter() - started)
