"""OpenTelemetry traces across the API, database, Redis, HTTP clients and jobs.

Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` is set (or a test hands in an exporter). FastAPI's
native telemetry makes the request spans; the instrumentors add SQL, Redis and outgoing
HTTP spans as children. A job carries the W3C `traceparent` of the code that deferred it
(`koinonia.job_telemetry`), so its span — and the Telnyx/Stripe calls it makes — continue
the trace of the API request that asked for the work.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from sqlalchemy.ext.asyncio import AsyncEngine
from structlog.types import EventDict, WrappedLogger

from koinonia.settings import Settings

_PROPAGATOR = TraceContextTextMapPropagator()


def build_tracer_provider(
    settings: Settings, exporter: SpanExporter | None = None, *, service_name: str | None = None
) -> TracerProvider | None:
    if exporter is None and settings.otel_exporter_otlp_endpoint is None:
        return None
    provider = TracerProvider(
        resource=Resource.create(
            {
                "service.name": service_name or settings.otel_service_name,
                "deployment.environment": settings.env,
            }
        )
    )
    if exporter is None:
        endpoint = str(settings.otel_exporter_otlp_endpoint).rstrip("/") + "/v1/traces"
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def fastapi_telemetry(provider: TracerProvider | None) -> dict[str, Any]:
    """The `FastAPI(telemetry=...)` argument: spans only when a provider is configured.

    Prometheus owns metrics and structlog owns logs, so FastAPI's own are off.
    """
    if provider is None:
        return {
            "tracing": False,
            "metrics": False,
            "logs": False,
            "operation_spans": False,
            "auto_configure": False,
        }
    return {
        "tracer_provider": provider,
        "tracing": True,
        "metrics": False,
        "logs": False,
        "operation_spans": False,
        "auto_configure": False,
    }


def instrument_clients(provider: TracerProvider, engines: list[AsyncEngine]) -> None:
    for engine in engines:
        # Its declared range stops below SQLAlchemy 2.1; the engine event API it uses is unchanged.
        SQLAlchemyInstrumentor().instrument(
            engine=engine.sync_engine,
            tracer_provider=provider,
            skip_dep_check=True,
            enable_commenter=False,
        )
    if not RedisInstrumentor().is_instrumented_by_opentelemetry:
        RedisInstrumentor().instrument(tracer_provider=provider)
    if not HTTPXClientInstrumentor().is_instrumented_by_opentelemetry:
        HTTPXClientInstrumentor().instrument(tracer_provider=provider)


def instrument_engine(provider: TracerProvider, engine: AsyncEngine) -> None:
    """SQL spans for one more engine (the worker opens fresh engines on every attempt;
    the instrumentor itself can be switched on only once per process)."""
    tracer = trace.get_tracer("opentelemetry.instrumentation.sqlalchemy", tracer_provider=provider)
    usage = metrics.get_meter("koinonia.db").create_up_down_counter(
        "db.client.connections.usage", unit="connections"
    )
    EngineTracer(tracer, engine.sync_engine, usage)  # type: ignore[no-untyped-call]


def trace_headers() -> dict[str, str]:
    """The W3C `traceparent` (and `tracestate`) of the active span; empty without one."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier


def context_from_headers(carrier: Mapping[str, str]) -> Context:
    """The remote parent named by a `traceparent` carried with a job (or none)."""
    return _PROPAGATOR.extract({k: v for k, v in carrier.items() if isinstance(v, str)})


def add_trace_ids(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Log processor: correlate log lines with the active span."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event_dict.setdefault("trace_id", format(context.trace_id, "032x"))
        event_dict.setdefault("span_id", format(context.span_id, "016x"))
    return event_dict
