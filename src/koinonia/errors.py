"""The application error hierarchy and its RFC 9457 problem-details rendering.

Every error a client can see is an `AppError` with an HTTP status and a stable `code`.
Framework errors (validation, routing) and unexpected exceptions are turned into the same
shape by the handlers installed in `install_error_handlers`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import structlog
from asgi_correlation_id import correlation_id
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_JSON = "application/problem+json"
PROBLEM_BASE_URI = "https://koinonia.dev/problems/"

log = structlog.get_logger("koinonia.errors")


@dataclass(frozen=True, slots=True)
class FieldError:
    field: str
    message: str


class AppError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    title: ClassVar[str] = "Internal server error"

    def __init__(
        self,
        detail: str | None = None,
        *,
        errors: Sequence[FieldError] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.detail = detail or self.title
        self.errors = list(errors)
        self.headers = dict(headers or {})
        super().__init__(self.detail)


class ValidationError(AppError):
    status = 422
    code = "validation_error"
    title = "The request is not valid"


class BadRequestError(AppError):
    status = 400
    code = "bad_request"
    title = "Bad request"


class AuthenticationError(AppError):
    status = 401
    code = "unauthenticated"
    title = "Authentication required"

    def __init__(self, detail: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("headers", {"WWW-Authenticate": "Bearer"})
        super().__init__(detail, **kwargs)


class WebhookSignatureError(AppError):
    status = 401
    code = "invalid_signature"
    title = "Webhook signature is not valid"


class AuthorizationError(AppError):
    status = 403
    code = "forbidden"
    title = "Not allowed"


class PaymentRequiredError(AppError):
    status = 402
    code = "payment_required"
    title = "Payment required"


class QuotaExceededError(PaymentRequiredError):
    code = "quota_exceeded"
    title = "Message allowance exhausted"


class NotFoundError(AppError):
    status = 404
    code = "not_found"
    title = "Not found"


class MethodNotAllowedError(AppError):
    status = 405
    code = "method_not_allowed"
    title = "Method not allowed"


class ConflictError(AppError):
    status = 409
    code = "conflict"
    title = "Conflict"


class PayloadTooLargeError(AppError):
    status = 413
    code = "payload_too_large"
    title = "Payload too large"


class UriTooLongError(AppError):
    status = 414
    code = "uri_too_long"
    title = "URI too long"


class UnsupportedMediaTypeError(AppError):
    status = 415
    code = "unsupported_media_type"
    title = "Unsupported media type"


class RateLimitedError(AppError):
    status = 429
    code = "rate_limited"
    title = "Too many requests"


class DatabaseError(AppError):
    status = 500
    code = "database_error"
    title = "Database error"


class ExternalServiceError(AppError):
    status = 502
    code = "external_service_error"
    title = "An upstream service failed"


class ServiceUnavailableError(AppError):
    status = 503
    code = "service_unavailable"
    title = "Service unavailable"


_STATUS_ERRORS: dict[int, type[AppError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: AuthorizationError,
    404: NotFoundError,
    405: MethodNotAllowedError,
    409: ConflictError,
    413: PayloadTooLargeError,
    414: UriTooLongError,
    415: UnsupportedMediaTypeError,
    422: ValidationError,
    429: RateLimitedError,
    503: ServiceUnavailableError,
}


def problem_body(error: AppError) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": PROBLEM_BASE_URI + error.code.replace("_", "-"),
        "title": error.title,
        "status": error.status,
        "detail": error.detail,
        "code": error.code,
        "request_id": correlation_id.get(),
    }
    if error.errors:
        body["errors"] = [{"field": e.field, "message": e.message} for e in error.errors]
    return body


def problem_response(error: AppError) -> JSONResponse:
    # X-Request-ID is added by the request-id middleware around every answer.
    return JSONResponse(
        problem_body(error),
        status_code=error.status,
        headers=dict(error.headers),
        media_type=PROBLEM_JSON,
    )


def _field_path(loc: Sequence[int | str]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "cookie")]
    return ".".join(parts) or str(loc[0] if loc else "body")


def validation_error_from(exc: RequestValidationError) -> ValidationError:
    field_errors = []
    for item in exc.errors():
        message = str(item.get("msg", "invalid value")).removeprefix("Value error, ")
        if item.get("type") == "extra_forbidden":
            message = "unknown field"
        field_errors.append(FieldError(_field_path(item.get("loc", ())), message))
    return ValidationError(f"{len(field_errors)} field(s) failed validation", errors=field_errors)


def database_error_from(exc: DBAPIError | PoolTimeoutError) -> AppError:
    """Map driver errors onto what a client can act on; never leak SQL or parameters."""
    if isinstance(exc, PoolTimeoutError):
        return ServiceUnavailableError(
            "The database is busy; try again shortly", headers={"Retry-After": "1"}
        )
    sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None) or ""
    if isinstance(exc, IntegrityError) and sqlstate == "23505":
        return ConflictError("A resource with the same unique value already exists")
    if isinstance(exc, IntegrityError) and sqlstate == "23503":
        return ConflictError("The resource refers to, or is referred to by, another resource")
    if sqlstate in ("40001", "40P01"):
        return ConflictError("A concurrent change interfered; retry the request")
    if sqlstate == "57014":
        return ServiceUnavailableError("The database took too long to answer")
    if isinstance(exc, OperationalError) or exc.connection_invalidated or sqlstate.startswith("08"):
        return ServiceUnavailableError(
            "The database is unavailable; try again shortly", headers={"Retry-After": "5"}
        )
    return DatabaseError("The database could not complete the request")


async def _app_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AppError)
    if exc.status >= 500:
        log.error("request_failed", code=exc.code, detail=exc.detail)
    return problem_response(exc)


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return problem_response(validation_error_from(exc))


async def _http_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    error_type = _STATUS_ERRORS.get(exc.status_code)
    if error_type is None:
        error_type = AppError if exc.status_code >= 500 else BadRequestError
    detail = exc.detail if isinstance(exc.detail, str) else None
    if exc.status_code == 404 and detail == "Not Found":
        detail = "No such resource"
    error = error_type(detail, headers=exc.headers)
    return problem_response(error)


async def _database_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DBAPIError | PoolTimeoutError)
    error = database_error_from(exc)
    if error.status >= 500:
        log.error("database_error", exc_info=exc, code=error.code)
    return problem_response(error)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AppError, _app_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_exception_handler)
    app.add_exception_handler(DBAPIError, _database_handler)
    app.add_exception_handler(PoolTimeoutError, _database_handler)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting the problem answers of an endpoint."""
    documented = {}
    for status in sorted({*statuses, 422, 500}):
        error_type = _STATUS_ERRORS.get(status, AppError)
        documented[status] = {
            "description": f"{error_type.title} (`{error_type.code}`)",
            "content": {
                PROBLEM_JSON: {
                    "schema": {"$ref": "#/components/schemas/Problem"},
                    "example": {
                        "type": PROBLEM_BASE_URI + error_type.code.replace("_", "-"),
                        "title": error_type.title,
                        "status": status,
                        "detail": error_type.title,
                        "code": error_type.code,
                        "request_id": "6f1c2b7e0a9d4c3f8e2a1b0c9d8e7f6a",
                    },
                }
            },
        }
    return documented  # type: ignore[return-value]
