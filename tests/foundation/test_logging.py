from __future__ import annotations

import json
import logging

import pytest
import structlog

from koinonia.logging import REDACTED, configure_logging, mask_text, mask_value


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("call +15551234567 now", "call ***4567 now"),
        ("call (555) 123-4567", "call ***4567"),
        ("call +1 555-123-4567", "call ***4567"),
        ("15551234567", "***4567"),
        ("mail jane.doe@example.org", "mail j***@***"),
        ("Authorization: Bearer abc.def.ghi", f"Authorization: {REDACTED}"),
        ("key sk_test_51Habc123", f"key {REDACTED}"),
        ("password=hunter2&x=1", f"{REDACTED}&x=1"),
    ],
)
def test_mask_text(raw: str, expected: str) -> None:
    assert mask_text(raw) == expected


def test_timestamps_and_ids_are_left_alone() -> None:
    text = "at 2026-11-25T02:03:31.123Z id 6f1c2b7e0a9d4c3f8e2a1b0c9d8e7f6a took 12.5ms"
    assert mask_text(text) == text


def test_sensitive_keys_are_redacted_at_any_depth() -> None:
    value = {
        "headers": {"Authorization": "Bearer x", "cookie": "s=1"},
        "user": {"password": "p", "api_key": "k", "name": "Ann"},
        "items": [{"refresh_token": "r"}, "+15551234567"],
    }
    masked = mask_value(value)
    assert masked["headers"] == {"Authorization": REDACTED, "cookie": REDACTED}
    assert masked["user"] == {"password": REDACTED, "api_key": REDACTED, "name": "Ann"}
    assert masked["items"] == [{"refresh_token": REDACTED}, "***4567"]


def test_log_lines_are_json_and_masked_including_exceptions(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("INFO")
    log = structlog.get_logger("test")
    log.info("member_added", phone="+15551234567", email="ann@example.com", nested={"token": "abc"})
    try:
        raise ValueError("lookup failed for +15557654321 with Bearer eyJabc.def.ghi")
    except ValueError:
        log.exception("failed")
    logging.getLogger("some.library").warning("stdlib says %s", "+15550001111")
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    added, failed, stdlib = lines[-3], lines[-2], lines[-1]
    assert added["phone"] == "***4567"
    assert added["email"] == "a***@***"
    assert added["nested"] == {"token": REDACTED}
    assert "+15557654321" not in failed["exception"]
    assert "***4321" in failed["exception"]
    assert "eyJabc" not in failed["exception"]
    assert stdlib["event"] == "stdlib says ***1111"
    assert stdlib["logger"] == "some.library"


def test_prerendered_access_lines_carry_the_same_fields_and_masking(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from asgi_correlation_id import correlation_id

    from koinonia.logging import log_prerendered

    configure_logging("INFO")
    token = correlation_id.set("req-15551234567")  # a client-chosen id that looks like a phone
    structlog.contextvars.bind_contextvars(job="j1")
    try:
        logger = logging.getLogger("koinonia.access")
        log_prerendered(
            logger, logging.INFO, "request", route="/x", status=200, note="+15551234567"
        )
        log_prerendered(logger, logging.DEBUG, "request", route="/hidden")  # below the level
    finally:
        structlog.contextvars.unbind_contextvars("job")
        correlation_id.reset(token)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    assert len(lines) == 1
    line = lines[0]
    assert line["event"] == "request" and line["level"] == "info"
    assert line["logger"] == "koinonia.access" and line["timestamp"].endswith("Z")
    assert line["route"] == "/x" and line["status"] == 200 and line["job"] == "j1"
    assert line["note"] == "***4567" and "15551234567" not in line["request_id"]
