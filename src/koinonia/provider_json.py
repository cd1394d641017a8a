"""Parsing a provider's signed JSON into something PostgreSQL can store.

A correctly signed body can still hold what `jsonb` refuses — a NUL character (`\\u0000`),
a lone surrogate (`\\ud800`), `NaN` or `Infinity` — or nest deeper than the parser
recurses. Stored as is, it fails the INSERT: a 5xx the provider retries for days (and a
Telnyx event shares its INSERT with others). So: non-finite numbers and pathological
nesting make the body malformed (`MalformedJSONError`), and characters PostgreSQL cannot
hold are replaced with U+FFFD — the rest of the event (an inbound STOP, say) still counts.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

REPLACEMENT = "\ufffd"
MAX_DEPTH = 64


class MalformedJSONError(ValueError):
    """The body is not JSON PostgreSQL can store (non-finite number, too deep, not JSON)."""


def _refuse_constant(name: str) -> Any:
    raise MalformedJSONError(f"{name} is not JSON")


def _clean_text(value: str) -> str:
    if value.isascii() and "\x00" not in value:
        return value
    return "".join(
        REPLACEMENT if ch == "\x00" or "\ud800" <= ch <= "\udfff" else ch for ch in value
    )


def _clean(value: Any, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise MalformedJSONError("nested too deeply")
    if isinstance(value, str):
        return _clean_text(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise MalformedJSONError("a number is not finite")
    if isinstance(value, dict):
        return {_clean_text(k): _clean(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v, depth + 1) for v in value]
    return value


# A number that could parse to infinity: an exponent of three digits or more, or hundreds
# of digits in a row.
_HUGE_NUMBER = re.compile(rb"[eE][+-]?\d{3}|\d{300}")


def _surely_clean(body: bytes) -> bool:
    """True when the parsed body cannot need `_clean` (the usual receipt): NUL and lone
    surrogates only arrive as `\\u` escapes (raw control characters and invalid UTF-8 are
    not JSON), nesting is at most the number of openers, and no number can overflow."""
    return (
        b"\\u" not in body
        and body.count(b"{") + body.count(b"[") <= MAX_DEPTH
        and _HUGE_NUMBER.search(body) is None
    )


def loads(body: bytes) -> Any:
    """The parsed body, made storable; `MalformedJSONError` when it cannot be."""
    try:
        parsed = json.loads(body, parse_constant=_refuse_constant)
    except MalformedJSONError:
        raise
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise MalformedJSONError("not JSON") from None
    if _surely_clean(body):
        return parsed
    return _clean(parsed, 0)
