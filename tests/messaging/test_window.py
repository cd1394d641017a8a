"""The sending window (`messaging/window.py`): properties over random instants, zones and
windows (biased towards DST transitions), and worked DST examples."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from functools import cache
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from koinonia.messaging.window import closes_at, is_open, next_opening

ZONES = [
    "America/New_York",
    "Pacific/Auckland",
    "Asia/Kolkata",
    "UTC",
    "Australia/Lord_Howe",  # DST shifts by 30 minutes
    "Europe/London",
]
NY = "America/New_York"
SECOND = timedelta(seconds=1)
PROPERTIES = settings(
    max_examples=600,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def hm(value: str) -> time:
    hours, minutes = value.split(":")
    return time(int(hours), int(minutes))


@cache
def transitions(tz: str) -> tuple[datetime, ...]:
    """The instants (UTC) at which `tz` changes its offset, 2020-2040."""
    zone = ZoneInfo(tz)
    found: list[datetime] = []
    day = utc(2020, 1, 1)
    while day < utc(2040, 1, 1):
        following = day + timedelta(days=1)
        if day.astimezone(zone).utcoffset() != following.astimezone(zone).utcoffset():
            low, high = day, following
            while high - low > SECOND:
                middle = low + (high - low) / 2
                if middle.astimezone(zone).utcoffset() == low.astimezone(zone).utcoffset():
                    low = middle
                else:
                    high = middle
            found.append(high.replace(microsecond=0))
        day = following
    return tuple(found)


def test_transitions_are_found() -> None:
    assert utc(2025, 3, 9, 7) in transitions(NY)
    assert utc(2025, 11, 2, 6) in transitions(NY)
    assert transitions("UTC") == transitions("Asia/Kolkata") == ()


zones = st.sampled_from(ZONES)
times_of_day = st.one_of(
    st.builds(time, st.integers(0, 23), st.integers(0, 59)),
    # Around the hours clocks change (00:00-03:59 local), to hit gaps and repeats.
    st.builds(time, st.integers(0, 3), st.sampled_from([0, 1, 15, 29, 30, 31, 45, 59])),
)
any_instant = st.datetimes(
    min_value=datetime(2020, 1, 1), max_value=datetime(2039, 12, 31), timezones=st.just(UTC)
)


@st.composite
def cases(draw: st.DrawFn) -> tuple[datetime, str, time, time]:
    tz = draw(zones)
    start = draw(times_of_day)
    end = draw(times_of_day)
    near = transitions(tz)
    near_a_change: bool = draw(st.booleans())
    if near and near_a_change:
        pivot = draw(st.sampled_from(near))
        seconds = draw(st.integers(-30 * 3600, 30 * 3600))
        micros = draw(st.integers(0, 999_999))
        now = pivot + timedelta(seconds=seconds, microseconds=micros)
        if draw(st.booleans()):
            # Boundaries in or next to the skipped or repeated local times of this change.
            zone = ZoneInfo(tz)
            readings = [(pivot + d).astimezone(zone) for d in (-SECOND, timedelta(0))]
            base = min(r.replace(tzinfo=None) for r in readings).replace(second=0)
            minutes = st.integers(-20, 80).map(lambda m: (base + timedelta(minutes=m)).time())
            start, end = draw(minutes), draw(minutes)
    else:
        now = draw(any_instant)
    return now, tz, start, end


def wall_clock_open(now: datetime, tz: str, start: time, end: time) -> bool:
    local = now.astimezone(ZoneInfo(tz)).time().replace(tzinfo=None)
    if start == end:
        return True
    if start < end:
        return start <= local < end
    return local >= start or local < end


@PROPERTIES
@given(cases())
def test_next_opening_is_the_first_open_instant(case: tuple[datetime, str, time, time]) -> None:
    now, tz, start, end = case
    opening = next_opening(now, tz, start, end)
    if is_open(now, tz, start, end):
        assert opening is None
        return
    assert opening is not None
    assert opening.tzinfo is UTC
    assert now < opening <= now + timedelta(hours=48)
    assert is_open(opening, tz, start, end)
    assert not is_open(opening - SECOND, tz, start, end)
    # Nothing opens in between: the window stays closed up to the opening.
    assert not is_open(now + (opening - now) / 2, tz, start, end)
    assert closes_at(now, tz, start, end) is None


@PROPERTIES
@given(cases())
def test_closes_at_is_the_first_closed_instant(case: tuple[datetime, str, time, time]) -> None:
    now, tz, start, end = case
    closing = closes_at(now, tz, start, end)
    if not is_open(now, tz, start, end) or start == end:
        assert closing is None
        return
    assert closing is not None
    assert closing.tzinfo is UTC
    assert now < closing <= now + timedelta(hours=48)
    assert not is_open(closing, tz, start, end)
    assert is_open(max(now, closing - SECOND), tz, start, end)
    assert is_open(now + (closing - now) / 2, tz, start, end)
    assert next_opening(now, tz, start, end) is None
    # From the closing, the next opening is within 48 hours again.
    reopening = next_opening(closing, tz, start, end)
    assert reopening is not None
    assert closing < reopening <= closing + timedelta(hours=48)


@PROPERTIES
@given(cases())
def test_away_from_transitions_it_is_the_local_clock(
    case: tuple[datetime, str, time, time],
) -> None:
    now, tz, start, end = case
    zone = ZoneInfo(tz)
    offsets = {(now + timedelta(hours=h)).astimezone(zone).utcoffset() for h in (-49, 0, 49)}
    nearby = any(abs(t - now) < timedelta(hours=49) for t in transitions(tz))
    if len(offsets) == 1 and not nearby:
        assert is_open(now, tz, start, end) == wall_clock_open(now, tz, start, end)


@PROPERTIES
@given(any_instant, zones, times_of_day)
def test_start_equal_to_end_is_always_open(now: datetime, tz: str, clock: time) -> None:
    assert is_open(now, tz, clock, clock)
    assert next_opening(now, tz, clock, clock) is None
    assert closes_at(now, tz, clock, clock) is None


def test_ordinary_day_and_exclusive_end() -> None:
    start, end = hm("08:00"), hm("20:00")
    # 2025-06-02 in New York is EDT (UTC-4): the window is 12:00-24:00 UTC.
    assert not is_open(utc(2025, 6, 2, 11, 59, 59), NY, start, end)
    assert is_open(utc(2025, 6, 2, 12), NY, start, end)
    assert is_open(utc(2025, 6, 2, 23, 59, 59), NY, start, end)
    assert not is_open(utc(2025, 6, 3, 0), NY, start, end)
    assert next_opening(utc(2025, 6, 2, 3), NY, start, end) == utc(2025, 6, 2, 12)
    assert next_opening(utc(2025, 6, 3, 0), NY, start, end) == utc(2025, 6, 3, 12)
    assert closes_at(utc(2025, 6, 2, 12), NY, start, end) == utc(2025, 6, 3, 0)
    assert closes_at(utc(2025, 6, 2, 3), NY, start, end) is None


def test_window_wrapping_midnight() -> None:
    start, end = hm("22:00"), hm("06:00")
    assert is_open(utc(2025, 1, 1, 23), "UTC", start, end)
    assert is_open(utc(2025, 1, 2, 5, 59), "UTC", start, end)
    assert not is_open(utc(2025, 1, 2, 6), "UTC", start, end)
    assert not is_open(utc(2025, 1, 2, 12), "UTC", start, end)
    assert closes_at(utc(2025, 1, 1, 23), "UTC", start, end) == utc(2025, 1, 2, 6)
    assert closes_at(utc(2025, 1, 2, 1), "UTC", start, end) == utc(2025, 1, 2, 6)
    assert next_opening(utc(2025, 1, 2, 12), "UTC", start, end) == utc(2025, 1, 2, 22)
    # Kolkata is UTC+05:30 all year: 22:00 IST is 16:30 UTC.
    assert next_opening(utc(2025, 1, 2, 12), "Asia/Kolkata", start, end) == utc(2025, 1, 2, 16, 30)


def test_spring_forward_start_in_the_gap_opens_after_it() -> None:
    # 2025-03-09: New York clocks jump 02:00 EST -> 03:00 EDT at 07:00 UTC.
    start, end = hm("02:30"), hm("20:00")
    assert next_opening(utc(2025, 3, 9, 5), NY, start, end) == utc(2025, 3, 9, 7)
    assert not is_open(utc(2025, 3, 9, 6, 59, 59), NY, start, end)
    assert is_open(utc(2025, 3, 9, 7), NY, start, end)
    # The next day 02:30 exists again (EDT): 06:30 UTC.
    assert next_opening(utc(2025, 3, 10, 1), NY, start, end) == utc(2025, 3, 10, 6, 30)


def test_spring_forward_end_in_the_gap_closes_after_it() -> None:
    start, end = hm("22:00"), hm("02:30")
    assert closes_at(utc(2025, 3, 9, 4), NY, start, end) == utc(2025, 3, 9, 7)
    assert is_open(utc(2025, 3, 9, 6, 59, 59), NY, start, end)
    assert not is_open(utc(2025, 3, 9, 7), NY, start, end)


def test_a_window_inside_the_gap_skips_that_day() -> None:
    start, end = hm("02:00"), hm("02:30")
    assert next_opening(utc(2025, 3, 8, 8), NY, start, end) == utc(2025, 3, 10, 6)
    assert not is_open(utc(2025, 3, 9, 7), NY, start, end)


def test_fall_back_start_takes_the_first_occurrence() -> None:
    # 2025-11-02: New York clocks go back 02:00 EDT -> 01:00 EST at 06:00 UTC, so 01:30
    # happens at 05:30 UTC (EDT) and again at 06:30 UTC (EST).
    start, end = hm("01:30"), hm("20:00")
    assert next_opening(utc(2025, 11, 2, 4), NY, start, end) == utc(2025, 11, 2, 5, 30)
    # Open through the repeated hour, although the clock reads 01:15 again.
    assert is_open(utc(2025, 11, 2, 6, 15), NY, start, end)
    assert closes_at(utc(2025, 11, 2, 6, 15), NY, start, end) == utc(2025, 11, 3, 1)


def test_fall_back_end_takes_the_first_occurrence() -> None:
    start, end = hm("22:00"), hm("01:30")
    assert closes_at(utc(2025, 11, 2, 4), NY, start, end) == utc(2025, 11, 2, 5, 30)
    assert not is_open(utc(2025, 11, 2, 6, 15), NY, start, end)  # 01:15 EST, closed
    assert next_opening(utc(2025, 11, 2, 6, 15), NY, start, end) == utc(2025, 11, 3, 3)


def test_lord_howe_half_hour_shift() -> None:
    # 2025-10-05 02:00 LHST (+10:30) -> 02:30 LHDT (+11) at 2025-10-04 15:30 UTC.
    start, end = hm("02:15"), hm("05:00")
    assert next_opening(utc(2025, 10, 4, 12), "Australia/Lord_Howe", start, end) == utc(
        2025, 10, 4, 15, 30
    )
    # 2026-04-05 02:00 LHDT -> 01:30 LHST at 2026-04-04 15:00 UTC; 01:45 happens twice.
    start, end = hm("01:45"), hm("05:00")
    assert next_opening(utc(2026, 4, 4, 12), "Australia/Lord_Howe", start, end) == utc(
        2026, 4, 4, 14, 45
    )
    assert is_open(utc(2026, 4, 4, 15, 5), "Australia/Lord_Howe", start, end)


def test_auckland_fall_back() -> None:
    # 2025-04-06 03:00 NZDT (+13) -> 02:00 NZST (+12) at 2025-04-05 14:00 UTC.
    start, end = hm("02:30"), hm("09:00")
    assert next_opening(utc(2025, 4, 5, 10), "Pacific/Auckland", start, end) == utc(
        2025, 4, 5, 13, 30
    )
    assert closes_at(utc(2025, 4, 5, 13, 30), "Pacific/Auckland", start, end) == utc(2025, 4, 5, 21)


def test_a_window_touching_the_next_across_a_gap_closes_at_the_real_end() -> None:
    # 02:30-02:00 closes at 02:00 and reopens at 02:30: on the spring-forward day both are
    # the end of the gap, so the window stays open through it.
    start, end = hm("02:30"), hm("02:00")
    assert is_open(utc(2025, 3, 9, 7), NY, start, end)
    assert closes_at(utc(2025, 3, 9, 1), NY, start, end) == utc(2025, 3, 10, 6)


def test_instants_in_other_zones_are_compared_as_instants() -> None:
    start, end = hm("08:00"), hm("20:00")
    now = datetime(2025, 6, 2, 8, 30, tzinfo=ZoneInfo(NY))
    assert is_open(now, NY, start, end)
    assert closes_at(now, NY, start, end) == utc(2025, 6, 3, 0)


def test_naive_instants_and_zoned_times_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        is_open(datetime(2025, 1, 1), NY, hm("08:00"), hm("20:00"))
    with pytest.raises(ValueError, match="naive"):
        next_opening(utc(2025, 1, 1), NY, time(8, tzinfo=UTC), hm("20:00"))
