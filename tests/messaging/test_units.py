"""Segment counting and keyword classification."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from koinonia.messaging.keywords import classify
from koinonia.messaging.segments import count, gsm_friendly


@pytest.mark.parametrize(
    ("text", "encoding", "segments"),
    [
        ("", "GSM-7", 0),
        ("a" * 160, "GSM-7", 1),
        ("a" * 161, "GSM-7", 2),
        ("a" * 306, "GSM-7", 2),
        ("a" * 307, "GSM-7", 3),
        ("€" * 80, "GSM-7", 1),
        ("€" * 81, "GSM-7", 2),
        ("é" * 71, "GSM-7", 1),
        ("é" * 70 + "ł", "UCS-2", 2),
        ("Praise 🙏", "UCS-2", 1),
        ("ł" * 70, "UCS-2", 1),
        ("ł" * 71, "UCS-2", 2),
        ("ł" * 134, "UCS-2", 2),
        ("ł" * 135, "UCS-2", 3),
        ("It’s Sunday", "UCS-2", 1),
    ],
)
def test_examples(text: str, encoding: str, segments: int) -> None:
    result = count(text)
    assert (result.encoding, result.segments) == (encoding, segments)


def test_units_and_pairs_never_straddle() -> None:
    assert count("Praise 🙏").units == 9
    # 152 septets then a two-septet '€': the escape pair moves to the next segment.
    assert count("a" * 152 + "€" + "a" * 10).segments == 2
    assert count("a" * 152 + "€" + "a" * 153).segments == 3
    # 66 units then an emoji (two units) does not fit in the first 67.
    assert count("ł" * 66 + "🙏" + "ł" * 65).segments == 2
    assert count("ł" * 66 + "🙏" + "ł" * 66).segments == 3


def test_gsm_friendly() -> None:
    assert gsm_friendly("It’s “great” – really…") == 'It\'s "great" - really...'
    assert count(gsm_friendly("It’s")).encoding == "GSM-7"


@given(st.text(max_size=500))
def test_segments_bound_units(text: str) -> None:
    result = count(text)
    per = 153 if result.encoding == "GSM-7" else 67
    if result.segments > 1:
        assert (result.segments - 1) * per < result.units + result.segments
    assert result.units >= len(text) or result.encoding == "UCS-2"


@pytest.mark.parametrize(
    ("text", "keyword"),
    [
        ("STOP", "opt_out"),
        (" stop ", "opt_out"),
        ("Stop all", "opt_out"),
        ("unsubscribe", "opt_out"),
        ("QUIT", "opt_out"),
        ("opt  out", "opt_out"),
        ("start", "opt_in"),
        ("Yes", "opt_in"),
        ("UNSTOP", "opt_in"),
        ("help", "help"),
        ("INFO", "help"),
        ("please stop texting me", None),
        ("stopping by later", None),
        ("", None),
    ],
)
def test_keywords(text: str, keyword: str | None) -> None:
    assert classify(text) == keyword


async def test_send_rates_hold_account_wide_and_per_number_and_keep_room_for_replies(
    redis: Any,
) -> None:
    from koinonia.messaging.throughput import ACCOUNT_BUCKET, COOL_DOWN_KEY, SendThroughput

    await redis.delete(
        ACCOUNT_BUCKET, COOL_DOWN_KEY, "sendrate:+12025550001", "sendrate:+12025550002"
    )
    rates = SendThroughput(
        redis,
        account_per_second=20,
        number_per_second=50,
        number_overrides={"+12025550002": 4},
    )
    # Bulk may take the account's burst (half a second's worth) less a tenth kept for
    # inbox texts.
    first, _ = await rates.take("+12025550001", 100)
    assert first == 9
    # Bulk gets nothing more now; the account's last token is there for a reply.
    second, wait = await rates.take("+12025550002", 100)
    assert second == 0 and wait > 0
    replies = [(await rates.take("+12025550002", 1, bulk=False))[0] for _ in range(2)]
    assert replies == [1, 0]
    # Segments count: a 3-part text takes 3 tokens, and one longer than the burst waits
    # for a full bucket, then goes alone.
    await redis.delete(ACCOUNT_BUCKET, "sendrate:+12025550002")
    assert (await rates.take("+12025550002", 5, segments=3))[0] == 1
    await redis.delete(ACCOUNT_BUCKET, "sendrate:+12025550002")
    assert (await rates.take("+12025550002", 5, segments=10))[0] == 1
    assert (await rates.take("+12025550002", 5, segments=1))[0] == 0  # in debt for 10
    # Telnyx asked us to slow down: nobody sends until the cool-down ends.
    await rates.cool_down(5)
    granted, wait = await rates.take("+12025550001", 1, bulk=False)
    assert granted == 0 and 4 < wait <= 5
    await redis.delete(ACCOUNT_BUCKET, COOL_DOWN_KEY)
