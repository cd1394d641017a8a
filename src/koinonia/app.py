"""The ASGI application factory."""

from __future__ import annotations

import importlib
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from asgi_correlation_id import CorrelationIdMiddleware
from fastapi import APIRouter, Depends, FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute, iter_route_contexts
from opentelemetry.sdk.trace.export import SpanExporter
from starlette.middleware import Middleware
from starlette.routing import BaseRoute

from koinonia import __doc__ as package_doc
from koinonia.accounts import mfa_routes
from koinonia.accounts import routes as accounts_routes
from koinonia.accounts.deps import get_principal
from koinonia.billing import routes as billing_routes
from koinonia.cache import Cache
from koinonia.conversations import routes as conversations_routes
from koinonia.db import Database
from koinonia.deadletters import routes as deadletters_routes
from koinonia.errors import install_error_handlers, problem_responses
from koinonia.groups import routes as groups_routes
from koinonia.health import routes as health_routes
from koinonia.health.checks import database_check, redis_check, replica_check
from koinonia.http.input import reject_unsafe_text
from koinonia.http.middleware import (
    MeteredGZipMiddleware,
    ObservabilityMiddleware,
    RequestLimitsMiddleware,
    SecurityHeadersMiddleware,
)
from koinonia.http.schemas import Problem
from koinonia.jobs import build_job_app
from koinonia.logging import configure_logging
from koinonia.members import routes as members_routes
from koinonia.messaging import routes as messaging_routes
from koinonia.observability import metrics_endpoint
from koinonia.operations import routes as operations_routes
from koinonia.ratelimit import RateLimiter
from koinonia.redis import create_redis
from koinonia.replicas import ReplicaRouter
from koinonia.runtime import freeze_startup_objects
from koinonia.settings import Settings, get_settings
from koinonia.telnyx import routes as telnyx_routes
from koinonia.templates import routes as templates_routes
from koinonia.tracing import build_tracer_provider, fastapi_telemetry, instrument_clients

API_PREFIX = "/api/v1"
UPLOAD_PATHS = (f"{API_PREFIX}/members/import",)
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{8,128}$")


def _request_id_is_sane(value: str) -> bool:
    return bool(_SANE_REQUEST_ID.match(value))


def feature_routers() -> list[APIRouter]:
    """Every feature router; each declares its full prefix (`/api/v1/...`)."""
    # Provider webhooks first: they are the busiest routes and routing tries in order.
    return [
        telnyx_routes.router,
        health_routes.router,
        *accounts_routes.routers,
        *mfa_routes.routers,
        *members_routes.routers,
        groups_routes.router,
        templates_routes.router,
        *billing_routes.routers,
        messaging_routes.router,
        conversations_routes.router,
        operations_routes.router,
        deadletters_routes.router,
    ]


# Features that own process-wide resources (HTTP clients, health checks) list a module
# exposing `lifespan(app) -> AsyncContextManager[None]` here; each runs after the core
# resources exist (app.state.database, .redis, .health_checks) and may append to them.
FEATURE_LIFESPANS: list[str] = [
    "koinonia.billing.gateway",
    "koinonia.telnyx.gateway",
    "koinonia.messaging.monitoring",
    "koinonia.backups.metrics",
    "koinonia.pgbouncer_metrics",
]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    database = Database(settings)
    redis = create_redis(settings)
    app.state.database = database
    app.state.redis = redis
    app.state.cache = Cache(redis)
    database.cache = app.state.cache  # unit_of_work / in_transaction invalidate after commit
    app.state.rate_limiter = RateLimiter(redis, settings.rate_limit_allowlist)
    # Used only to defer jobs inside request transactions (never opened: no pool needed).
    app.state.job_app = build_job_app(settings)
    replicas = ReplicaRouter(
        database,
        redis,
        max_lag=settings.replica_max_lag_seconds,
        ryw_seconds=settings.read_your_writes_seconds,
    )
    app.state.replicas = replicas
    await replicas.start()
    app.state.metrics_refreshers = []
    app.state.health_checks = [
        database_check(database),
        redis_check(redis),
        *(
            replica_check(i, replicas.lags, replicas.max_lag)
            for i in range(len(database.replica_engines))
        ),
    ]
    provider = app.state.tracer_provider
    if provider is not None:
        instrument_clients(provider, [database.engine, *database.replica_engines])
    try:
        async with AsyncExitStack() as features:
            for module_name in FEATURE_LIFESPANS:
                module = importlib.import_module(module_name)
                await features.enter_async_context(module.lifespan(app))
            freeze_startup_objects()
            yield
    finally:
        await replicas.stop()
        await redis.aclose()
        await database.dispose()


def create_app(
    settings: Settings | None = None, span_exporter: SpanExporter | None = None
) -> FastAPI:
    settings = settings or get_settings()
    tracer_provider = build_tracer_provider(settings, span_exporter)
    configure_logging(settings.log_level, settings.log_file, settings.log_file_backup_count)
    static_paths: set[str] = set()
    middleware = [
        Middleware(
            CorrelationIdMiddleware,
            header_name="X-Request-ID",
            generator=lambda: uuid.uuid4().hex,
            validator=_request_id_is_sane,
        ),
        Middleware(ObservabilityMiddleware, static_paths=static_paths),
        Middleware(SecurityHeadersMiddleware),
        Middleware(
            CORSMiddleware,
            allow_origins=settings.cors_allow_origins,
            allow_credentials=settings.cors_allow_credentials,
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "X-Request-ID"],
            expose_headers=[
                "X-Request-ID",
                "Retry-After",
                "RateLimit-Limit",
                "RateLimit-Remaining",
                "RateLimit-Reset",
            ],
            max_age=settings.cors_max_age,
        ),
        Middleware(
            MeteredGZipMiddleware,
            minimum_size=settings.gzip_minimum_size,
            compresslevel=settings.gzip_level,
        ),
        Middleware(
            RequestLimitsMiddleware,
            max_body=settings.max_json_body_bytes,
            max_upload=settings.max_import_bytes,
            max_url=settings.max_url_length,
            upload_paths=UPLOAD_PATHS,
        ),
    ]
    app = FastAPI(
        title="Koinonia API",
        version="1.0.0",
        summary=package_doc,
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
        lifespan=lifespan,
        middleware=middleware,
        generate_unique_id_function=operation_id,
        # Every route's query, path and body text is checked once, here (http/input.py).
        dependencies=[Depends(reject_unsafe_text)],
        telemetry=fastapi_telemetry(tracer_provider),  # type: ignore[arg-type]
    )
    app.state.settings = settings
    app.state.tracer_provider = tracer_provider
    install_error_handlers(app)
    for router in feature_routers():
        app.include_router(router)
    app.include_router(health_routes.probes)
    app.add_route("/metrics", metrics_endpoint, include_in_schema=False)
    static_paths.update(
        path for r in app.routes if isinstance(path := getattr(r, "path", None), str)
    )
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def operation_id(route: APIRoute) -> str:
    """`<tag>.<function name>` (`auth.register`, `members.list_members`): short, stable
    names for generated clients; `_openapi` checks they are unique across the spec."""
    return f"{route.tags[0]}.{route.name}" if route.tags else route.name


SECURITY_SCHEME = "bearerAuth"
# Routes that authenticate either with a bearer token or with a challenge in the body
# (they call `get_principal` themselves, so the dependency walk cannot see it).
_BEARER_OR_CHALLENGE = {"auth.mfa_enrol", "auth.mfa_confirm"}


def _depends_on(dependant: Dependant, call: Any) -> bool:
    return any(d.call is call or _depends_on(d, call) for d in dependant.dependencies)


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        routes=app.routes,
        description=_API_DESCRIPTION,
    )
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(schemas["Problem"].pop("$defs", {}))
    components["securitySchemes"] = {
        SECURITY_SCHEME: {
            "type": "http",
            "scheme": "bearer",
            "description": "An access token (`POST /auth/login`) or an API key (`kn_…`).",
        }
    }
    _document_cross_cutting(schema, app.routes)
    _add_links(schema)
    app.openapi_schema = schema
    return schema


def _document_cross_cutting(schema: dict[str, Any], routes: list[BaseRoute]) -> None:
    """Security and the answers every route can give besides its own, added here once so
    routes added later get them too: 400 (malformed JSON or form) and 413 (body over the
    limit) with a body, 414 (URL too long) and 422 (`reject_unsafe_text`, app-wide) and
    500/503 everywhere, 401 and 429 where a principal is needed."""
    seen: dict[str, str] = {}
    for route in iter_route_contexts(routes):
        if not isinstance(route.original_route, APIRoute) or not route.include_in_schema:
            continue
        path = str(route.path_format)
        for method in route.methods or ():
            operation = schema["paths"][path][method.lower()]
            op_id = operation["operationId"]
            if op_id in seen:
                raise RuntimeError(f"operationId {op_id} of {method} {path} is not unique")
            seen[op_id] = path
            statuses = {414, 422, 500, 503}
            if "requestBody" in operation:
                statuses |= {400, 413}
            elif method in ("POST", "PUT", "PATCH"):
                statuses.add(413)  # the body is read raw (webhooks), but still limited
            if op_id in _BEARER_OR_CHALLENGE:
                operation.setdefault("security", [{SECURITY_SCHEME: []}, {}])
                statuses |= {401, 429}
            elif _depends_on(route.dependant, get_principal):
                operation.setdefault("security", [{SECURITY_SCHEME: []}])
                statuses |= {401, 429}
            responses = operation.setdefault("responses", {})
            for status, documented in problem_responses(*statuses).items():
                responses.setdefault(str(status), documented)


_ITEM = re.compile(r"^/\{(\w+)\}(/.*)?$")
_SAMPLE_TEXT = "Hello from Koinonia"
# Links whose values come from the request or need a body (OpenAPI links, for clients
# and for the stateful contract fuzzing): (source operation, status) → target → link.
_EXTRA_LINKS: dict[tuple[str, str], dict[str, dict[str, Any]]] = {
    ("auth.register", "201"): {
        "auth.login": {
            "requestBody": {"email": "$request.body#/email", "password": "$request.body#/password"}
        },
        "auth.refresh": {"requestBody": {"refresh_token": "$response.body#/refresh_token"}},
    },
    ("members.create_member", "201"): {
        "messages.preview_message": {
            "requestBody": {"member_ids": ["$response.body#/id"], "body": _SAMPLE_TEXT}
        },
        "messages.send_message": {
            "requestBody": {"member_ids": ["$response.body#/id"], "body": _SAMPLE_TEXT}
        },
        "conversations.start_conversation": {"requestBody": {"member_id": "$response.body#/id"}},
    },
    ("groups.create_group", "201"): {
        "messages.preview_message": {
            "requestBody": {"group_ids": ["$response.body#/id"], "body": _SAMPLE_TEXT}
        },
    },
    ("operations.sending_pauses", "200"): {
        "operations.clear_sending_pause": {
            "parameters": {
                "scope": "$response.body#/data/0/scope",
                "key": "$response.body#/data/0/key",
            }
        }
    },
    ("members.import_members", "201"): {
        "members.get_import": {"parameters": {"import_id": "$response.body#/id"}}
    },
}


def _add_links(schema: dict[str, Any]) -> None:
    """OpenAPI links (FastAPI emits none): a create (`POST /things` answering an `id`)
    and a list (`GET /things`, a page of `data`) lead to every operation on
    `/things/{id}…`, plus the `_EXTRA_LINKS` that carry request values or bodies."""
    ids: dict[str, tuple[str, dict[str, Any]]] = {}
    for path, methods in schema["paths"].items():
        for operation in methods.values():
            ids[operation["operationId"]] = (path, operation)
    for path, methods in schema["paths"].items():
        sources = [
            (methods["post"], ("200", "201", "202"), "$response.body#/id")
            if "post" in methods
            else None,
            (methods["get"], ("200",), "$response.body#/data/0/id") if "get" in methods else None,
        ]
        for source in sources:
            if source is None:
                continue
            operation, statuses, expression = source
            for target_path, target_methods in schema["paths"].items():
                match = _ITEM.match(target_path.removeprefix(path)) if target_path != path else None
                if not target_path.startswith(path + "/") or match is None:
                    continue
                for target in target_methods.values():
                    for status in statuses:
                        if status in operation["responses"]:
                            links = operation["responses"][status].setdefault("links", {})
                            links[target["operationId"]] = {
                                "operationId": target["operationId"],
                                "parameters": {match.group(1): expression},
                            }
    for (source_id, status), targets in _EXTRA_LINKS.items():
        links = ids[source_id][1]["responses"][status].setdefault("links", {})
        for target_id, link in targets.items():
            links[target_id] = {"operationId": target_id, **link}


_API_DESCRIPTION = """
Koinonia's public HTTP API. JSON in and out, `snake_case`, RFC 3339 UTC timestamps.

* **Auth**: `Authorization: Bearer <access token or API key>`.
* **Errors**: RFC 9457 problem details (`application/problem+json`) with a stable `code`
  and the `request_id` of the call.
* **Lists**: cursor-paginated with `limit` (≤ 200) and `cursor`.
"""


def app_factory() -> FastAPI:
    """Entry point for `uvicorn --factory koinonia.app:app_factory`."""
    return create_app()
