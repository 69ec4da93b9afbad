"""The prediction table, owned here: its columns, its day column, and how a row is made.

Every other module imports these names: the scoring core (lib/serving/predictor.py) hands its
per-photo values to :func:`prediction_frame`, the daily path adds the run's columns with
:func:`run_rows`, and readers name the day column :data:`PREDICTION_DATE`. The tables keyed by a
prediction's day (the inspectors' verdicts) are declared here too, so the column name is written once.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import pyarrow as pa

from sofar_assets.lib.warehouse.schemas import RAW_LABELS_COLUMNS, TableSchema, raw_labels_table
from sofar_assets.lib.warehouse.types import BOOL, DATE, FLOAT64, INT64, STRING, TIMESTAMP

PREDICTION_DATE = "prediction_date"
"""The day a photo was uploaded (the partitions' day): the predictions table's DATE partition column."""

IMAGE_COLUMNS = {
    "image_id": STRING,
    "image_uri": STRING,
    "top1_label": STRING,
    "top1_prob": FLOAT64,
    "top2_label": STRING,
    "top2_prob": FLOAT64,
    "label_set": STRING,  # conformal label set (lib/model/conformal.py): "a|b", "" when empty
    "label_set_size": INT64,
    "ood_score": FLOAT64,
    "is_ood": BOOL,
    "error": STRING,
}
"""What the model says of one photo (the served model's rows hold these too)."""

RUN_COLUMNS = {"model_name": STRING, "model_version": STRING, "predicted_at": TIMESTAMP}
"""What a run adds to each of its rows: the version that scored it and when."""

PREDICTION_COLUMNS = (PREDICTION_DATE, *IMAGE_COLUMNS)
"""The columns of a scored frame (``predict_images``): the photo's day, then :data:`IMAGE_COLUMNS`."""

PREDICTIONS = TableSchema(
    name="predictions",
    columns={PREDICTION_DATE: DATE, **IMAGE_COLUMNS, **RUN_COLUMNS},
    partition_column=PREDICTION_DATE,
    clustering=("top1_label", "is_ood"),
)

LABEL_CORRECTIONS = TableSchema(
    name="label_corrections",
    columns={
        "image_id": STRING,
        "image_uri": STRING,
        "label": STRING,
        "inspector": STRING,
        "corrected_at": TIMESTAMP,
        PREDICTION_DATE: DATE,
    },
    partition_column=PREDICTION_DATE,
    clustering=("image_id",),
)
"""Inspectors' verdicts on predicted photos (``sofar correct``, a CSV import, or any other writer):
one row per verdict, appended, never rewritten; ``prediction_date`` is the predictions partition
of the photo it judges (see lib/review/corrections.py)."""

RAW_CORRECTIONS = TableSchema(
    name=raw_labels_table("label_corrections"),
    columns={**RAW_LABELS_COLUMNS, "image_id": STRING, "inspector": STRING, "corrected_at": TIMESTAMP,
             PREDICTION_DATE: DATE},
)
"""The corrections task source scanned like a task (``raw_labels/label_corrections``): the latest
verdict per photo with its content hash, or an ``error`` naming why the row was rejected."""


def prediction_frame(days: Sequence, ids: Sequence, uris: Sequence, values: dict) -> pd.DataFrame:
    """A batch's rows in :data:`PREDICTION_COLUMNS` order: each photo's day (None when it has
    none, e.g. a served request), id and URI, and the model's ``values`` (the other
    :data:`IMAGE_COLUMNS`, one array each)."""
    data = {PREDICTION_DATE: pd.Series(list(days), dtype=object), "image_id": ids, "image_uri": uris,
            **values}
    return pd.DataFrame(data, columns=list(PREDICTION_COLUMNS))


def run_rows(frame: pd.DataFrame, run: dict,
             schema: TableSchema | None = PREDICTIONS) -> pa.Table | pd.DataFrame:
    """A scored frame plus the run's constant columns (:data:`RUN_COLUMNS`, given in ``run``): an
    Arrow table of ``schema`` (Arrow's own conversion, then the schema's checked casts: ~10x
    cheaper per batch than converting each pandas column), or a pandas frame when ``schema`` is None."""
    if schema is None:
        return frame.assign(**run).reset_index(drop=True)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    for name, value in run.items():
        table = table.append_column(name, pa.array([value] * len(frame)))
    return schema.to_arrow(table)
