"""Every day's health: did each calendar day of the predictions land, and with which model?

``sofar status`` walks every day from ``partitions.start_date`` (or the last N) to yesterday in
the partitions' time zone and marks each one (:func:`day_health`):

- ``landed``:  rows in the predictions table, scored by the champion;
- ``empty``:   materialized (Dagster recorded it) but no uploads that day, so no rows;
- ``missing``: never materialized and no rows;
- ``failed``:  its last run failed (Dagster's partition status);
- ``stale``:   rows scored by a version that is no longer the champion.

Model versions are compared as numbers ("10" is newer than "9"). No Dagster import: the caller
passes what the Dagster instance knows (materialized and failed days) or None when it has no
instance to ask.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from zoneinfo import ZoneInfo

LANDED, EMPTY, MISSING, FAILED, STALE = "landed", "empty", "missing", "failed", "stale"
NEEDS_BACKFILL = (MISSING, FAILED)


def version_key(version) -> tuple:
    """Sort key for model versions: numbers by value, anything else after them, by text."""
    text = str(version)
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


def newest(versions: Iterable) -> str | None:
    """The newest of ``versions`` by :func:`version_key` (not ``max()`` over text)."""
    present = [str(v) for v in versions if v is not None and str(v) != ""]
    return max(present, key=version_key) if present else None


def yesterday(timezone: str, now: dt.datetime | None = None) -> dt.date:
    """The last complete day in the partitions' time zone."""
    now = now or dt.datetime.now(dt.UTC)
    return now.astimezone(ZoneInfo(timezone)).date() - dt.timedelta(days=1)


def day_range(start: dt.date, last: dt.date, days: int | None = None) -> list[dt.date]:
    """Every calendar day from ``start`` (or ``days`` back from ``last``, not before ``start``) to
    ``last`` inclusive."""
    first = start if days is None else max(start, last - dt.timedelta(days=days - 1))
    return [first + dt.timedelta(days=i) for i in range((last - first).days + 1)]


def day_health(days: list[dt.date], counts: dict[dt.date, dict[str, int]], champion: str | None, *,
               materialized: set[dt.date] | None, failed: set[dt.date] = frozenset()) -> list[dict]:
    """One record per day: ``day``, ``state``, ``rows`` and ``versions`` (rows per model version,
    newest first). ``counts[day][version]`` are the table's rows; ``materialized`` the days Dagster
    recorded (None: unknown, so a day without rows is ``missing``); ``failed`` the days whose
    last run failed."""
    out = []
    for day in days:
        per_version = counts.get(day, {})
        rows = int(sum(per_version.values()))
        versions = sorted(per_version, key=version_key, reverse=True)
        if day in failed:
            state = FAILED
        elif rows:
            state = STALE if champion is not None and any(v != str(champion) for v in versions) else LANDED
        elif materialized is not None and day in materialized:
            state = EMPTY
        else:
            state = MISSING
        out.append({"day": day.isoformat(), "state": state, "rows": rows,
                    "versions": {v: int(per_version[v]) for v in versions}})
    return out


def backfill_range(health: list[dict], states=NEEDS_BACKFILL) -> tuple[dt.date, dt.date] | None:
    """The smallest range of days that covers every day in one of ``states`` (None: none)."""
    days = [dt.date.fromisoformat(h["day"]) for h in health if h["state"] in states]
    return (min(days), max(days)) if days else None
