"""A run's days counted in ONE grouped query: the read-back, the review queue's size and the drift inputs.

After a run commits its days, three questions are asked of the predictions table: how many rows
each day holds now (the rows check), how many of them wait in its review queue per reason
(lib/review/queue.py), and how its OOD share and top-1 label mix compare with the trailing week
(lib/review/drift.py). They are all counts over the same rows, so one ``GROUP BY`` over the run's
days and their trailing weeks answers them (a few hundred rows of counts, never the rows).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import pandas as pd

from sofar_assets.lib.review import drift
from sofar_assets.lib.review.queue import AMBIGUOUS_SET, EMPTY_SET, OOD, QUEUE_REASON_SQL, QUEUE_WHERE_SQL
from sofar_assets.lib.warehouse.predictions import LABEL_CORRECTIONS, PREDICTION_DATE


@dataclass(frozen=True)
class RunCounts:
    """The grouped counts: one row per (day, top-1 label, OOD flag, scored, queue reason) with ``n``."""

    counts: pd.DataFrame
    days: tuple[dt.date, ...]

    def _day(self, day: dt.date) -> pd.DataFrame:
        return self.counts[self.counts[PREDICTION_DATE] == day]

    def rows(self, day: dt.date) -> int:
        """The rows ``day`` holds (the read-back of its commit)."""
        return int(self._day(day)["n"].sum())

    def queue(self, day: dt.date) -> dict[str, int]:
        """``day``'s review queue size per reason (photos with a verdict have left it)."""
        got = self._day(day).groupby("reason")["n"].sum()
        return {r: int(got.get(r, 0)) for r in (OOD, EMPTY_SET, AMBIGUOUS_SET)}

    def drift(self) -> tuple[dict, dict]:
        """:func:`drift.ood_vs_trailing` and :func:`drift.label_mix_vs_trailing` of the run's days."""
        scored = self.counts[self.counts["scored"]]
        return (drift.ood_vs_trailing(scored[[PREDICTION_DATE, "is_ood", "n"]], self.days),
                drift.label_mix_vs_trailing(scored[[PREDICTION_DATE, "top1_label", "n"]], self.days))


def run_counts(wh, table: str, days: list[dt.date]) -> RunCounts:
    """The counts of ``days`` and their trailing weeks in ONE query (DuckDB and BigQuery alike)."""
    start, end = drift.trailing_window(min(days))[0], max(days) + dt.timedelta(days=1)
    day = f"p.{PREDICTION_DATE}"
    judged, reason_if = "", ""
    if wh.table_exists(LABEL_CORRECTIONS.name):  # a photo with a verdict has left the queue
        judged = (f" LEFT JOIN (SELECT DISTINCT image_id, {PREDICTION_DATE} "
                  f"FROM {{table:{LABEL_CORRECTIONS.name}}} WHERE image_id IS NOT NULL) AS j "
                  f"ON j.image_id = p.image_id AND j.{PREDICTION_DATE} = {day}")
        reason_if = " AND j.image_id IS NULL"
    counts = wh.query(
        f"SELECT {day} AS {PREDICTION_DATE}, top1_label, is_ood, error IS NULL AS scored, "
        f"CASE WHEN {QUEUE_WHERE_SQL}{reason_if} THEN {QUEUE_REASON_SQL} END AS reason, count(*) AS n "
        f"FROM {{table:{table}}} AS p{judged} "
        f"WHERE {day} >= DATE '{start.isoformat()}' AND {day} < DATE '{end.isoformat()}' "
        "GROUP BY 1, 2, 3, 4, 5")
    counts[PREDICTION_DATE] = [pd.Timestamp(d).date() for d in counts[PREDICTION_DATE]]
    counts["scored"] = counts["scored"].astype(bool)
    counts["n"] = counts["n"].astype(int)
    return RunCounts(counts, tuple(days))
