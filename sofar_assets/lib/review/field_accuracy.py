"""Real-world accuracy per day: the champion's predictions against the inspectors' verdicts.

Counted on the corrected rows of each day (``predictions`` JOIN the latest verdict per photo of
``label_corrections``, by the rule of ``corrections.latest_sql``, scored rows only), by ONE ``GROUP BY`` in the warehouse:

- ``accuracy``: top-1 equals the verdict, over the rows whose verdict is a class (not
  ``irrelevant``);
- ``coverage``: the verdict is in the row's conformal label set (``label_set``, labels joined by
  ``|``), over the same rows that have a set; ``None`` when the table has no ``label_set``
  column (a model before conformal sets) — unavailable, not zero;
- ``ood_precision``: of the rows flagged ``is_ood`` that have a verdict, the share judged
  ``irrelevant``; ``ood_recall``: of the rows judged ``irrelevant``, the share flagged.

Caveat: inspectors do not judge a random sample (they look at the review queue: OOD-flagged and
least confident photos first), so these figures describe the judged photos, and compare day
with day only while the review policy stays the same.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

import pandas as pd
from scipy.stats import fisher_exact

from sofar_assets.lib.data.dataset import IRRELEVANT
from sofar_assets.lib.review.corrections import latest_sql
from sofar_assets.lib.review.drift import TRAILING_DAYS, trailing_window
from sofar_assets.lib.warehouse import LABEL_CORRECTIONS, PREDICTIONS
from sofar_assets.lib.warehouse.predictions import PREDICTION_DATE

COUNT_COLUMNS = ["corrected", "in_vocabulary", "top1_correct", "with_label_set", "covered", "flagged",
                 "flagged_irrelevant", "irrelevant"]
RATES = {  # rate -> (numerator, denominator) among COUNT_COLUMNS
    "accuracy": ("top1_correct", "in_vocabulary"),
    "coverage": ("covered", "with_label_set"),
    "ood_precision": ("flagged_irrelevant", "flagged"),
    "ood_recall": ("flagged_irrelevant", "irrelevant"),
}
CHECKED = ("accuracy", "coverage", "ood_precision")

DROP_MARGIN = 0.10
"""A day's rate has dropped when it is more than 10 points below the trailing week's pooled rate
(one more photo in ten judged wrong: a change a person acts on) ..."""
DROP_ALPHA = 0.05
"""... AND a one-sided Fisher exact test of the day's right/wrong counts against the week's gives
p < 0.05. The test keeps a day of three judged photos from warning on one miss; the margin keeps
a week of thousands from warning on a one-point dip. Fisher (not a binomial against the week's
rate) because the week's rate is itself estimated from few verdicts: 10/10 last week and 2/3
today is p = 0.23, not a certainty."""


def _lit(day: dt.date) -> str:
    return f"DATE '{day.isoformat()}'"  # built from a date object, never from text


def daily_counts(wh, start: dt.date, end: dt.date, *, predictions: str = PREDICTIONS.name,
                 corrections: str = LABEL_CORRECTIONS.name) -> pd.DataFrame:
    """Per ``prediction_date`` in ``[start, end)``: :data:`COUNT_COLUMNS` over the corrected,
    scored rows (one query; the latest verdict per photo and day). ``with_label_set`` and
    ``covered`` are missing (NA) when the predictions table has no ``label_set`` column."""
    cols = [PREDICTION_DATE, *COUNT_COLUMNS]
    if not (wh.table_exists(predictions) and wh.table_exists(corrections)):
        return pd.DataFrame(columns=cols)
    has_sets = "label_set" in wh.table_columns(predictions)
    q = wh.quote
    lo, hi = _lit(start), _lit(end)
    irrelevant = f"'{IRRELEVANT}'"
    in_vocab = f"v.{q('label')} <> {irrelevant}"
    sets = (
        f", SUM(CASE WHEN {in_vocab} AND p.{q('label_set')} IS NOT NULL THEN 1 ELSE 0 END) AS {q('with_label_set')}"
        f", SUM(CASE WHEN {in_vocab} AND STRPOS(CONCAT('|', p.{q('label_set')}, '|'), "
        f"CONCAT('|', v.{q('label')}, '|')) > 0 THEN 1 ELSE 0 END) AS {q('covered')}"
    ) if has_sets else ""
    sql = (
        f"SELECT p.{q('prediction_date')} AS {q('prediction_date')}, COUNT(*) AS {q('corrected')}, "
        f"SUM(CASE WHEN {in_vocab} THEN 1 ELSE 0 END) AS {q('in_vocabulary')}, "
        f"SUM(CASE WHEN {in_vocab} AND p.{q('top1_label')} = v.{q('label')} THEN 1 ELSE 0 END) AS {q('top1_correct')}"
        f"{sets}, "
        f"SUM(CASE WHEN p.{q('is_ood')} THEN 1 ELSE 0 END) AS {q('flagged')}, "
        f"SUM(CASE WHEN p.{q('is_ood')} AND v.{q('label')} = {irrelevant} THEN 1 ELSE 0 END) AS {q('flagged_irrelevant')}, "
        f"SUM(CASE WHEN v.{q('label')} = {irrelevant} THEN 1 ELSE 0 END) AS {q('irrelevant')} "
        f"FROM {{table:{predictions}}} AS p JOIN ("
        + latest_sql(q, ["image_id", PREDICTION_DATE, "label"], per=["image_id", PREDICTION_DATE],
                     where=f"{q('prediction_date')} >= {lo} AND {q('prediction_date')} < {hi}", table=corrections)
        + ") AS v "
        f"ON p.{q('image_id')} = v.{q('image_id')} AND p.{q('prediction_date')} = v.{q('prediction_date')} "
        f"WHERE p.{q('prediction_date')} >= {lo} AND p.{q('prediction_date')} < {hi} AND p.{q('error')} IS NULL "
        f"GROUP BY p.{q('prediction_date')} ORDER BY p.{q('prediction_date')}"
    )
    out = wh.query(sql)
    for c in COUNT_COLUMNS:
        out[c] = out[c].astype("Int64") if c in out else pd.array([pd.NA] * len(out), dtype="Int64")
    out[PREDICTION_DATE] = [pd.Timestamp(d).date() for d in out[PREDICTION_DATE]]
    out = out[cols]
    out.attrs["label_sets"] = has_sets
    return out


def _rate(num, den) -> float | None:
    if pd.isna(num) or pd.isna(den) or not den:
        return None
    return float(num) / float(den)


def rates(counts: dict) -> dict:
    """The counts of one day (or a pooled window) with their rates; a rate without a denominator
    (no verdict of that kind, or no label sets) is None."""
    out = {c: (None if pd.isna(counts.get(c, pd.NA)) else int(counts[c])) for c in COUNT_COLUMNS}
    out.update({r: _rate(counts.get(n, pd.NA), counts.get(d, pd.NA)) for r, (n, d) in RATES.items()})
    return out


def per_day(counts: pd.DataFrame, days: Iterable[dt.date]) -> dict[dt.date, dict]:
    """:func:`rates` of each of ``days`` (a day without verdicts: zero counts, None rates)."""
    by_day = {d: row for d, row in zip(counts[PREDICTION_DATE], counts.to_dict("records"), strict=True)}
    zero = {c: 0 for c in COUNT_COLUMNS}
    if not counts.attrs.get("label_sets", True):
        zero.update(with_label_set=pd.NA, covered=pd.NA)
    return {d: rates(by_day.get(d, zero)) for d in days}


def _pooled(counts: pd.DataFrame, start: dt.date, end: dt.date) -> dict:
    window = counts[(counts[PREDICTION_DATE] >= start) & (counts[PREDICTION_DATE] < end)]
    return {c: (window[c].sum(min_count=1) if len(window) else 0) for c in COUNT_COLUMNS}


def dropped(day_num: int, day_den: int, past_num: int, past_den: int) -> tuple[bool, float | None]:
    """Whether a day's rate dropped against the trailing window (see DROP_MARGIN, DROP_ALPHA),
    and the test's p-value (None when either side has no verdicts)."""
    if not day_den or not past_den:
        return False, None
    p = float(fisher_exact([[day_num, day_den - day_num], [past_num, past_den - past_num]],
                           alternative="less").pvalue)
    return bool(day_num / day_den < past_num / past_den - DROP_MARGIN and p < DROP_ALPHA), p


def vs_trailing(counts: pd.DataFrame, days: Iterable[dt.date]) -> dict[dt.date, dict]:
    """Per day of ``days``, per checked rate: the day's and the trailing 7 days' pooled rate,
    the p-value and the drop verdict. ``counts`` (from :func:`daily_counts`) must cover each
    day's trailing window. A rate missing on either side is not compared."""
    out = {}
    for day in days:
        today = _pooled(counts, day, day + dt.timedelta(days=1))
        past = _pooled(counts, *trailing_window(day, TRAILING_DAYS))
        verdicts = {}
        for name in CHECKED:
            n, d = RATES[name]
            if any(pd.isna(x) for x in (today[n], today[d], past[n], past[d])):
                continue
            drop, p = dropped(int(today[n]), int(today[d]), int(past[n]), int(past[d]))
            if p is None:
                continue
            verdicts[name] = {"day": round(int(today[n]) / int(today[d]), 4),
                              "trailing": round(int(past[n]) / int(past[d]), 4),
                              "day_n": int(today[d]), "trailing_n": int(past[d]), "p_value": round(p, 4),
                              "dropped": drop}
        if verdicts:
            out[day] = verdicts
    return out
