"""A partition's day: its window in the partitions' timezone, and the days of a run."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo


def day_window(day: dt.date, timezone: str) -> tuple[dt.datetime, dt.datetime]:
    """``day`` as an aware [start, end) in ``timezone`` (the partitions' timezone, not UTC midnight)."""
    tz = ZoneInfo(timezone)
    start = dt.datetime.combine(day, dt.time(), tzinfo=tz)
    return start, dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tzinfo=tz)


def run_days(start: dt.date | dt.datetime, end: dt.date | dt.datetime) -> list[dt.date]:
    """The days of a run's partition window [start, end): one day, or a single-run range."""
    first = start.date() if isinstance(start, dt.datetime) else start
    last = end.date() if isinstance(end, dt.datetime) else end
    return [first + dt.timedelta(days=i) for i in range((last - first).days)]


def span(days: list[dt.date]) -> str:
    """``days`` as text: ``-``, one day, or ``first .. last``."""
    return "-" if not days else days[0].isoformat() if len(days) == 1 else f"{days[0]} .. {days[-1]}"
