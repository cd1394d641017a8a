"""A church's sending window: the local hours in which broadcasts may go out.

Pure functions over instants (no database, no clock of their own). The window is
`[start, end)` in the church's local wall-clock time (`tz`, an IANA zone name):

- `start < end`: open from `start` to `end` the same local day (08:00-20:00).
- `start > end`: the window wraps midnight (22:00-06:00 opens at 22:00 and closes at
  06:00 the next local day).
- `start == end`: always open (there is no empty window).
- `end` is exclusive: at `end` exactly the window is closed.

Daylight saving time: every boundary (a start or an end on a given local day) is the
*first instant that day at which the local clock reads that time or later*. So a time
skipped on a spring-forward day (02:30 in New York) falls on the first instant after the
gap (03:00 EDT), and a time that happens twice on a fall-back day (01:30 in New York)
takes its first occurrence (01:30 EDT): a window opened then stays open through the
repeated hour, and a window that ends then stays closed through it. A window lying wholly
inside a gap (02:00-02:30 in New York on the spring-forward day) does not open that day.

Instants given must be timezone-aware (any zone; they are compared in UTC) and instants
returned are in UTC. `start`/`end` are naive times of day. An unknown zone raises
`zoneinfo.ZoneInfoNotFoundError`; the church's zone is validated when it is set.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

__all__ = ["closes_at", "is_open", "next_opening"]

_ONE_DAY = timedelta(days=1)
_RESOLUTION = timedelta(microseconds=1)
# Local days around `now` whose windows are looked at: enough for a window that starts
# yesterday and closes today, and for the next opening when a whole day is skipped (a
# window lying in a spring-forward gap), which is always within 48 hours.
_DAYS_BEFORE = 2
_DAYS_AFTER = 3
# How many days a chain of windows touching end to start may be followed (touching only
# happens around a DST gap, so this is never reached in practice).
_MAX_CHAIN_DAYS = 14


def is_open(now_utc: datetime, tz: str, start: time, end: time) -> bool:
    """Whether broadcasts may go out at `now_utc` (start inclusive, end exclusive)."""
    now = _as_utc(now_utc)
    _check_times(start, end)
    if start == end:
        return True
    return any(
        opens <= now < closes for opens, closes in _windows(now, tz, start, end, _DAYS_AFTER)
    )


def next_opening(now_utc: datetime, tz: str, start: time, end: time) -> datetime | None:
    """None when the window is open at `now_utc`; otherwise the UTC instant it next opens."""
    now = _as_utc(now_utc)
    _check_times(start, end)
    if start == end:
        return None
    upcoming: list[datetime] = []
    for opens, closes in _windows(now, tz, start, end, _DAYS_AFTER):
        if opens <= now < closes:
            return None
        if opens > now:
            upcoming.append(opens)
    if not upcoming:  # pragma: no cover - every zone opens a minute-long window in 48 h
        raise RuntimeError("no opening of the sending window found within three days")
    return min(upcoming)


def closes_at(now_utc: datetime, tz: str, start: time, end: time) -> datetime | None:
    """When the window is open at `now_utc`, the UTC instant it next closes; None when it
    is closed, and None when it never closes (`start == end`, always open)."""
    now = _as_utc(now_utc)
    _check_times(start, end)
    if start == end:
        return None
    closing: datetime | None = None
    for opens, closes in _windows(now, tz, start, end, _MAX_CHAIN_DAYS):
        if closing is None:
            if opens <= now < closes:
                closing = closes
            elif opens > now:  # closed now
                return None
        elif opens <= closing:  # the next day's window starts as this one ends
            closing = max(closing, closes)
        else:
            break
    return closing


def _as_utc(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("now_utc must be a timezone-aware datetime")
    return value.astimezone(UTC)


def _check_times(start: time, end: time) -> None:
    if start.tzinfo is not None or end.tzinfo is not None:
        raise ValueError("start and end are local times of day and must be naive")


def _windows(
    now: datetime, tz: str, start: time, end: time, days_after: int
) -> Iterator[tuple[datetime, datetime]]:
    """The non-empty windows `[opens, closes)` in UTC of the local days around `now`, in
    order, from `_DAYS_BEFORE` days before `now`'s local date to `days_after` days after."""
    zone = ZoneInfo(tz)
    today = now.astimezone(zone).date()
    start = start.replace(fold=0)
    end = end.replace(fold=0)
    wraps = start > end
    for offset in range(-_DAYS_BEFORE, days_after + 1):
        day = today + offset * _ONE_DAY
        opens = _boundary(day, start, tz)
        closes = _boundary(day + _ONE_DAY if wraps else day, end, tz)
        if opens < closes:
            yield opens, closes


@lru_cache(maxsize=4096)
def _boundary(day: date, clock: time, tz: str) -> datetime:
    """The first instant (UTC) on local date `day` at which the clock reads `clock` or later.

    A normal local time maps to its one instant; an ambiguous one (fall-back) to its first
    occurrence; a skipped one (spring-forward gap) to the end of the gap."""
    zone = ZoneInfo(tz)
    local = datetime.combine(day, clock)
    candidates = [local.replace(tzinfo=zone, fold=fold).astimezone(UTC) for fold in (0, 1)]
    existing = [c for c in candidates if _wall(c, zone) == local]
    if existing:
        return min(existing)
    # In a gap: fold=0 maps it past the gap and fold=1 before it; bisect for the
    # transition, the first instant whose local clock reads `local` or later.
    before, after = min(candidates), max(candidates)
    while after - before > _RESOLUTION:
        middle = before + (after - before) // 2
        if _wall(middle, zone) >= local:
            after = middle
        else:
            before = middle
    return after


def _wall(instant: datetime, zone: ZoneInfo) -> datetime:
    """The local wall-clock reading of `instant` (naive, so comparisons ignore `fold`)."""
    return instant.astimezone(zone).replace(tzinfo=None)
