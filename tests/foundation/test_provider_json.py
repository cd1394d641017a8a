"""`provider_json.loads`: the fast path (no cleaning walk) answers what the walk would."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from koinonia import provider_json

_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),  # includes NUL and lone surrogates, which json.dumps escapes as \\u…
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20,
)


def _walked(body: bytes) -> Any:
    return provider_json._clean(json.loads(body), 0)


@given(_json_values, st.booleans())
def test_loads_equals_the_cleaning_walk(value: Any, ascii_only: bool) -> None:
    body = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    try:
        expected = _walked(body)
    except (provider_json.MalformedJSONError, ValueError):
        with pytest.raises(provider_json.MalformedJSONError):
            provider_json.loads(body)
        return
    assert provider_json.loads(body) == expected


@pytest.mark.parametrize(
    ("body", "stored"),
    [
        (b'{"text": "a\\u0000b"}', {"text": "a\ufffdb"}),
        (b'{"text": "\\ud800"}', {"text": "\ufffd"}),
        (b'{"n": 1e5}', {"n": 100000.0}),
    ],
)
def test_escaped_characters_are_still_replaced(body: bytes, stored: Any) -> None:
    assert provider_json.loads(body) == stored


@pytest.mark.parametrize("body", [b'{"n": 1e999}', b"[" * 70 + b"]" * 70, b'{"n": NaN}'])
def test_what_jsonb_refuses_is_still_malformed(body: bytes) -> None:
    with pytest.raises(provider_json.MalformedJSONError):
        provider_json.loads(body)
