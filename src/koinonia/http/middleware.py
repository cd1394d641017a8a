"""Pure ASGI middleware (no BaseHTTPMiddleware: it costs throughput and breaks streaming)."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import structlog
from prometheus_client import Counter, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.gzip import GZipMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from koinonia.errors import (
    PROBLEM_JSON,
    AppError,
    PayloadTooLargeError,
    UriTooLongError,
    problem_body,
)
from koinonia.logging import log_prerendered
from koinonia.observability import HTTP_IN_FLIGHT, HTTP_LATENCY, HTTP_REQUESTS

access_logger = logging.getLogger("koinonia.access")
error_log = structlog.get_logger("koinonia.errors")

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
    (b"strict-transport-security", b"max-age=63072000; includeSubDomains"),
]
# Swagger UI needs its own scripts and styles; everything else is JSON and may load nothing.
API_CSP = b"default-src 'none'; frame-ancestors 'none'"
DOCS_CSP = (
    b"default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    b"style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    b"img-src 'self' data: https://fastapi.tiangolo.com; frame-ancestors 'none'"
)


async def send_problem(
    send: Send, error: AppError, extra_headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps(problem_body(error)).encode()
    headers = [
        (b"content-type", PROBLEM_JSON.encode()),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in error.headers.items()),
        *(extra_headers or []),
    ]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(StarletteHTTPException):
    """Raised from `receive`; an HTTPException so FastAPI's body parsing re-raises it as is
    (it turns other exceptions into a 400) and the error handlers answer 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            413, f"The request body is larger than {limit} bytes", headers={"Connection": "close"}
        )


class RequestLimitsMiddleware:
    """Rejects over-long URLs (414) and bodies over the limit (413) while streaming.

    A declared `Content-Length` over the limit is refused before reading anything; chunked
    bodies and bodies longer than they declared are counted as they arrive and cut off at
    the limit, so the excess is never buffered.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body: int,
        max_upload: int,
        max_url: int,
        upload_paths: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.max_body = max_body
        self.max_upload = max_upload
        self.max_url = max_url
        self.upload_paths = upload_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        url_length = len(scope.get("raw_path") or scope["path"]) + len(scope["query_string"])
        if url_length > self.max_url:
            await send_problem(
                send, UriTooLongError(f"The URL is longer than {self.max_url} bytes")
            )
            return
        limit = self._limit_for(scope)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await send_problem(send, _too_large(limit), [(b"connection", b"close")])
            return

        received = 0
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not response_started:
                await send_problem(send, _too_large(limit), [(b"connection", b"close")])

    def _limit_for(self, scope: Scope) -> int:
        if scope["path"].startswith(self.upload_paths):
            return self.max_upload
        return self.max_body


def _too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"The request body is larger than {limit} bytes")


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


NO_STORE = (b"cache-control", b"no-store")


class SecurityHeadersMiddleware:
    """Security headers on every answer, and `Cache-Control: no-store` on every answer to
    an authenticated request (it carries `Authorization`, whatever the status) and under
    `no_store_prefixes` (token answers of login, registration and refresh), so no shared or
    browser cache keeps personal data or tokens."""

    def __init__(
        self,
        app: ASGIApp,
        docs_prefix: str = "/api/docs",
        no_store_prefixes: tuple[str, ...] = ("/api/v1/auth/",),
    ) -> None:
        self.app = app
        self.docs_prefix = docs_prefix
        self.no_store_prefixes = no_store_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        csp = DOCS_CSP if scope["path"].startswith(self.docs_prefix) else API_CSP
        no_store = scope["path"].startswith(self.no_store_prefixes) or any(
            name == b"authorization" for name, _ in scope["headers"]
        )

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name for name, _ in headers}
                headers.extend(h for h in SECURITY_HEADERS if h[0] not in present)
                if b"content-security-policy" not in present:
                    headers.append((b"content-security-policy", csp))
                if no_store:
                    # Replaces any weaker policy a handler set.
                    headers = [h for h in headers if h[0] != b"cache-control"]
                    headers.append(NO_STORE)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


class ObservabilityMiddleware:
    """Access log line, request metrics by route template, and the last-resort 500.

    Sits inside the request-id middleware so every line it writes carries the request id,
    and turns any exception that escaped the handlers into a problem answer without
    internals (the stack trace goes to the log only).
    """

    def __init__(self, app: ASGIApp, static_paths: frozenset[str] | set[str] = frozenset()) -> None:
        self.app = app
        # Plain (non-API) routes such as /metrics and /api/docs are labelled by their path.
        self.static_paths = static_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        response_started = False

        async def capture(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
            await send(message)

        HTTP_IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, capture)
        except Exception:
            error_log.exception(
                "unhandled_exception", method=scope["method"], route=self._route_template(scope)
            )
            status = 500
            if not response_started:
                await send_problem(send, AppError("An unexpected error occurred"))
        finally:
            HTTP_IN_FLIGHT.dec()
            elapsed = time.perf_counter() - started
            route = self._route_template(scope)
            method = scope["method"]
            HTTP_REQUESTS.labels(method, route, str(status)).inc()
            HTTP_LATENCY.labels(method, route).observe(elapsed)
            fields: dict[str, Any] = {
                "method": method,
                "route": route,
                "status": status,
                "duration_ms": round(elapsed * 1000, 2),
            }
            state = scope.get("state") or {}
            for key in ("church_id", "user_id"):
                if key in state:
                    fields[key] = state[key]
            log_prerendered(access_logger, logging.INFO, "request", **fields)

    def _route_template(self, scope: Scope) -> str:
        # Feature routers carry their full prefix (/api/v1/...), so the matched route's
        # path is the whole template.
        path = getattr(scope.get("route"), "path", None)
        if isinstance(path, str):
            return path
        if scope["path"] in self.static_paths:
            return str(scope["path"])
        # Unmatched paths share one label so random URLs cannot explode metric cardinality.
        return "<unmatched>"


GZIP_INPUT_BYTES = Counter(
    "koinonia_http_gzip_input_bytes_total",
    "Bytes of gzip-encoded responses before compression",
)
GZIP_OUTPUT_BYTES = Counter(
    "koinonia_http_gzip_output_bytes_total",
    "Bytes of gzip-encoded responses as sent (after compression)",
)
GZIP_RATIO = Histogram(
    "koinonia_http_gzip_compression_ratio",
    "Uncompressed / compressed size of each gzip-encoded response",
    buckets=(1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0),
)
_RAW_BYTES = "koinonia.gzip_raw_bytes"  # scope extension: bytes the app wrote


class MeteredGZipMiddleware:
    """Starlette's `GZipMiddleware`, counting what it saved.

    The app's bytes are counted inside the compressor and the sent bytes outside it; a
    response that went out gzip-encoded adds to `koinonia_http_gzip_input_bytes_total` /
    `..._output_bytes_total` (their rates' quotient is the overall ratio) and observes its
    own ratio in `koinonia_http_gzip_compression_ratio`.
    """

    def __init__(self, app: ASGIApp, *, minimum_size: int, compresslevel: int) -> None:
        self.app = app
        self.gzip = GZipMiddleware(
            self._count_raw, minimum_size=minimum_size, compresslevel=compresslevel
        )

    async def _count_raw(self, scope: Scope, receive: Receive, send: Send) -> None:
        counter: list[int] = scope[_RAW_BYTES]

        async def counting(message: Message) -> None:
            if message["type"] == "http.response.body":
                counter[0] += len(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, counting)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = [0]
        scope[_RAW_BYTES] = raw  # the same scope object: outer middleware read its updates
        sent = 0
        gzipped = False

        async def counting(message: Message) -> None:
            nonlocal sent, gzipped
            if message["type"] == "http.response.start":
                gzipped = (b"content-encoding", b"gzip") in message.get("headers", [])
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        await self.gzip(scope, receive, counting)
        if gzipped and sent and raw[0]:
            GZIP_INPUT_BYTES.inc(raw[0])
            GZIP_OUTPUT_BYTES.inc(sent)
            GZIP_RATIO.observe(raw[0] / sent)
