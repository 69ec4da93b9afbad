"""Drift of a day's predictions against the trailing week, from counts the warehouse computed.

The inputs are ``GROUP BY`` results (the run's one grouped query, lib/review/run_counts.py, or
``Warehouse.count_by``: one row per day and value with its count ``n``), never rows: a week at a million photos a day is 7M rows, its counts a few dozen.
Only scored rows count (``error IS NULL``): an unreadable photo says nothing about the fleet.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping

import pandas as pd

from sofar_assets.lib.warehouse.predictions import PREDICTION_DATE

TRAILING_DAYS = 7
"""The baseline is the 7 days before a day: a whole week, so weekday/weekend mixes cancel."""

OOD_SPIKE_FACTOR = 2.0
OOD_SPIKE_MARGIN = 0.15
"""A day's OOD share spikes when it exceeds BOTH twice the trailing share and the trailing share
plus 15 points. The factor catches a jump from a low base (2% -> 5% is noise, 2% -> 20% is not:
the margin decides); the margin keeps a high base from flagging ordinary noise (30% -> 40%)."""

LABEL_TV_MAX = 0.5
"""Total variation distance above which a day's top-1 label mix has drifted: at 0.5, half of the
day's probability mass sits on different labels than in the trailing week (e.g. a camera or
upload-flow change, or a model serving the wrong task). Seasonal mix shifts stay well below."""


def trailing_window(day: dt.date, days: int = TRAILING_DAYS) -> tuple[dt.date, dt.date]:
    """``[day - days, day)``: the days a day is compared against (the day itself excluded)."""
    return day - dt.timedelta(days=days), day


def ood_spike(day_rate: float, trailing_rate: float) -> bool:
    """Whether a day's OOD share is a spike against its trailing share (see OOD_SPIKE_*)."""
    return day_rate > max(OOD_SPIKE_FACTOR * trailing_rate, trailing_rate + OOD_SPIKE_MARGIN)


def total_variation(p: Mapping[str, float], q: Mapping[str, float]) -> float:
    """Total variation distance ``0.5 * sum |p - q|`` of two label COUNT mappings (normalized
    here); 0 for the same mix, 1 for disjoint labels."""
    sp, sq = float(sum(p.values())), float(sum(q.values()))
    if sp <= 0 or sq <= 0:
        raise ValueError("total_variation needs two non-empty distributions")
    labels = set(p) | set(q)
    return 0.5 * sum(abs(p.get(k, 0) / sp - q.get(k, 0) / sq) for k in labels)


def label_drift(tv: float) -> bool:
    """Whether a total variation distance is drift (see LABEL_TV_MAX)."""
    return tv > LABEL_TV_MAX


def _by_day(counts: pd.DataFrame, date_column: str, value_column: str) -> dict[dt.date, dict]:
    out: dict[dt.date, dict] = {}
    for d, v, n in zip(counts[date_column], counts[value_column], counts["n"], strict=True):
        d = pd.Timestamp(d).date()
        out.setdefault(d, {})
        out[d][v] = out[d].get(v, 0) + int(n)
    return out


def _trailing_sum(per_day: dict[dt.date, dict], day: dt.date) -> dict:
    start, end = trailing_window(day)
    total: dict = {}
    for d, values in per_day.items():
        if start <= d < end:
            for v, n in values.items():
                total[v] = total.get(v, 0) + n
    return total


def ood_vs_trailing(counts: pd.DataFrame, days: Iterable[dt.date],
                    date_column: str = PREDICTION_DATE) -> dict:
    """Per day of ``days``: its OOD share, the trailing week's share (weighted by rows) and the
    spike verdict. ``counts`` has columns ``[date_column, "is_ood", "n"]`` covering the trailing
    window of every day. A day without scored rows, or without a trailing week, is not compared."""
    per_day = _by_day(counts, date_column, "is_ood")
    out = {}
    for day in days:
        today, past = per_day.get(day, {}), _trailing_sum(per_day, day)
        n_today, n_past = sum(today.values()), sum(past.values())
        if not n_today or not n_past:
            continue
        rate = today.get(True, 0) / n_today
        base = past.get(True, 0) / n_past
        out[day] = {"ood_rate": round(rate, 4), "trailing": round(base, 4), "spike": ood_spike(rate, base)}
    return out



def label_mix_vs_trailing(counts: pd.DataFrame, days: Iterable[dt.date],
                          date_column: str = PREDICTION_DATE) -> dict:
    """Per day of ``days``: the total variation distance between its top-1 label mix and the
    trailing week's, and the drift verdict. ``counts`` has columns ``[date_column, "top1_label",
    "n"]``; days without scored rows or without a trailing week are not compared."""
    per_day = _by_day(counts, date_column, "top1_label")
    out = {}
    for day in days:
        today, past = per_day.get(day, {}), _trailing_sum(per_day, day)
        if not sum(today.values()) or not sum(past.values()):
            continue
        tv = total_variation(past, today)
        out[day] = {"total_variation": round(tv, 4), "drift": label_drift(tv)}
    return out
