"""Reading the uploads table: which photos arrived in a time window."""

from __future__ import annotations

from collections.abc import Iterator

import pandas as pd

from sofar_assets.lib.warehouse.base import TableNotFoundError, Warehouse
from sofar_assets.lib.warehouse.types import DATE, TIMESTAMP

UPLOAD_COLUMNS = ("image_id", "image_uri", "uploaded_at")


def check_uploads_table(wh: Warehouse, table: str) -> None:
    """The uploads table exists and has (image_id, image_uri, uploaded_at TIMESTAMP)."""
    if not wh.table_exists(table):
        raise TableNotFoundError(f"uploads table {table!r} does not exist in {wh!r}")
    columns = wh.table_columns(table)
    for c in UPLOAD_COLUMNS:
        if c not in columns:
            raise ValueError(
                f"uploads table {table!r} has no column {c!r} "
                f"(it needs {', '.join(UPLOAD_COLUMNS)}; it has {', '.join(columns)})"
            )
    if columns["uploaded_at"] not in (DATE, TIMESTAMP):
        raise ValueError(
            f"uploads table {table!r}: column 'uploaded_at' is {columns['uploaded_at']}, not a TIMESTAMP"
        )


def iter_uploads(wh: Warehouse, table: str, start, end, *, batch_rows: int = 50_000) -> Iterator[pd.DataFrame]:
    """The uploads with ``start <= uploaded_at < end`` in batches (bounded memory), ordered by
    (uploaded_at, image_id) so that a day's inference always sees the same order."""
    check_uploads_table(wh, table)
    return wh.iter_range(table, "uploaded_at", start, end, columns=list(UPLOAD_COLUMNS),
                         batch_rows=batch_rows, order_by=["uploaded_at", "image_id"])


def uploads_from_table(wh: Warehouse, table: str, start, end) -> pd.DataFrame:
    """The uploads with ``start <= uploaded_at < end``: a frame (image_id, image_uri, uploaded_at).

    Ordered by (uploaded_at, image_id) so that a day's inference always sees the same order.
    All in memory: for a large day use :func:`iter_uploads`.
    """
    check_uploads_table(wh, table)
    df = wh.read_range(table, "uploaded_at", start, end, columns=list(UPLOAD_COLUMNS))
    return df.sort_values(["uploaded_at", "image_id"], kind="stable").reset_index(drop=True)
