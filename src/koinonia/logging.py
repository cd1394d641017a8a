"""Structured JSON logging with masking of personal data and secrets.

structlog renders every event, including those of libraries that use the standard
`logging` module (uvicorn, SQLAlchemy, procrastinate), through one processor chain. The
masking processor runs last, after exceptions were formatted, so phone numbers, emails and
secrets are also removed from tracebacks and exception messages.

Logs go to stdout (JSON lines) for the supervisor (systemd's journal) to collect. A
`LOG_FILE` is optional and must be safe with several processes writing (`koinonia api
--workers N`, several workers on one host): a path with `{pid}` is one file per process,
rotated at midnight UTC by that process; a path without it is shared, appended to with
`O_APPEND` (whole lines) and reopened when an external `logrotate` moves it
(`WatchedFileHandler`), never rotated by the processes themselves — a rotating handler
shared by several processes renames the file under the others and loses lines.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import re
import sys
from collections.abc import Mapping, MutableMapping
from datetime import UTC, datetime
from typing import Any

import structlog
from asgi_correlation_id import correlation_id
from structlog.types import EventDict, Processor, WrappedLogger

from koinonia.tracing import add_trace_ids

REDACTED = "[REDACTED]"

_SENSITIVE_KEY = re.compile(
    r"(authorization|cookie|passw(or)?d|secret|token|api[_-]?key|jwt|signature|"
    r"credential|private[_-]?key|hmac|encryption[_-]?key)",
    re.IGNORECASE,
)
_SECRET_PATTERNS = [
    re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"),
    re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"),  # JWT
    re.compile(r"\b(sk|rk|pk)_(test|live)_[A-Za-z0-9]+"),  # Stripe keys
    re.compile(r"\bwhsec_[A-Za-z0-9]+"),
    re.compile(r"\bkn_[A-Za-z0-9]+_[A-Za-z0-9_-]+"),  # Koinonia API keys
    re.compile(r"\bKEY[0-9A-F]{20,}[A-Za-z0-9_]*"),  # Telnyx API keys
    re.compile(r"(?i)(password|secret|token)=[^\s&,;]+"),
]
_EMAIL = re.compile(r"\b([A-Za-z0-9._%+-])[A-Za-z0-9._%+-]*@([A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b")
_PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{7,15}"  # E.164
    r"|\+?\d{1,3}[\s.-]?\(?\d{3}\)?[\s.-]?\d{3}[\s.-]?\d{4}"  # +1 (555) 123-4567
    r"|\(?\d{3}\)?[\s.-]\d{3}[\s.-]\d{4}"  # 555-123-4567
    r"|1?\d{10}"  # 15551234567
    r")(?![\w])"
)


def _mask_phone(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group(0))
    return "***" + digits[-4:]


def _mask_email(match: re.Match[str]) -> str:
    return f"{match.group(1)}***@***"


def mask_text(text: str) -> str:
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(REDACTED, text)
    text = _EMAIL.sub(_mask_email, text)
    return _PHONE.sub(_mask_phone, text)


def mask_value(value: Any, key: str | None = None) -> Any:
    if key is not None and _SENSITIVE_KEY.search(key) and value is not None:
        return REDACTED
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, Mapping):
        return {k: mask_value(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [mask_value(v) for v in value]
    if isinstance(value, bytes):
        return mask_text(value.decode("utf-8", "replace"))
    if isinstance(value, BaseException):
        return mask_text(repr(value))
    return value


# Fields whose values this code produces itself (never request input): not scanned. The
# access line has one per request, and scanning them was most of its cost. The request id
# can come from the client (`X-Request-ID`), so it is scanned like any other text.
_OWN_FIELDS = frozenset(
    {"level", "logger", "timestamp", "trace_id", "span_id", "method", "route", "status",
     "duration_ms", "church_id", "user_id"}
)


def mask_processor(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    return {
        k: v
        if k in _OWN_FIELDS and isinstance(v, int | float | str)
        else mask_value(v, k if k not in ("event", "exception") else None)
        for k, v in event_dict.items()
    }


def _add_request_id(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    request_id = correlation_id.get()
    if request_id and "request_id" not in event_dict:
        event_dict["request_id"] = request_id
    return event_dict


def _drop_color_message(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    event_dict.pop("color_message", None)  # uvicorn duplicates the message with ANSI codes
    return event_dict


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_request_id,
        add_trace_ids,
        _drop_color_message,
    ]


class _StdoutHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stdout` is at emit time (test capture swaps it)."""

    @property
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, _: Any) -> None:
        pass


def file_handler(log_file: str, backup_count: int) -> logging.Handler:
    """The handler for `LOG_FILE` (see the module docstring): rotation only per process."""
    if "{pid}" in log_file:
        return logging.handlers.TimedRotatingFileHandler(
            log_file.replace("{pid}", str(os.getpid())),
            when="midnight",
            backupCount=backup_count,
            utc=True,
            encoding="utf-8",
        )
    return logging.handlers.WatchedFileHandler(log_file, encoding="utf-8")


_RENDERED = "koinonia_rendered"


class _JsonFormatter(structlog.stdlib.ProcessorFormatter):
    """structlog's formatter, passing through lines `log_prerendered` already rendered."""

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, _RENDERED, False):
            return str(record.msg)
        return super().format(record)


def log_prerendered(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """One JSON line through `logger`'s handlers, rendered here in one pass.

    For the access line (one per request): the same fields, masking and sinks as any
    structlog line — timestamp, request and trace ids, context variables, then the masking
    processor and JSON — without building and copying two log records and running the
    processor chain twice (two thirds of a request's logging cost)."""
    if not logger.isEnabledFor(level):
        return
    event_dict: EventDict = {
        **structlog.contextvars.get_contextvars(),
        **fields,
        "event": event,
        "level": logging.getLevelName(level).lower(),
        "logger": logger.name,
        "timestamp": _utc_now_iso(),
    }
    _add_request_id(None, "", event_dict)
    add_trace_ids(None, "", event_dict)
    line = json.dumps(mask_processor(None, "", event_dict), default=repr)
    record = logger.makeRecord(logger.name, level, "(access)", 0, line, (), None)
    setattr(record, _RENDERED, True)
    logger.handle(record)


def _utc_now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def configure_logging(
    level: str = "INFO", log_file: str | None = None, backup_count: int = 30
) -> None:
    # The JSON lines carry none of the record's caller, thread or process fields, so the
    # stdlib does not compute them (the Logging HOWTO's "Optimization" switches): a third
    # of the cost of each access line.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    shared = _shared_processors()
    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = _JsonFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            mask_processor,
            structlog.processors.JSONRenderer(),
        ],
    )
    handlers: list[logging.Handler] = [_StdoutHandler()]
    if log_file:
        handlers.append(file_handler(log_file, backup_count))
    root = logging.getLogger()
    root.handlers.clear()
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # Our own access line replaces uvicorn's (it has the route template and request id).
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def bind_context(**values: Any) -> None:
    structlog.contextvars.bind_contextvars(**values)


def context_snapshot() -> MutableMapping[str, Any]:
    return dict(structlog.contextvars.get_contextvars())
