"""Reading the uploads table: which photos arrived in a time window."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence

import pandas as pd

from sofar_assets.lib.data.days import day_window
from sofar_assets.lib.data.uploads import Upload, iter_folder_day, iter_table_uploads
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


def day_uploads(day: dt.date, *, timezone: str, allowed_roots: Sequence[str], folder: str | None = None,
                table: str | None = None, warehouse: Warehouse | None = None) -> Iterator[Upload]:
    """One :class:`Upload` per photo uploaded on ``day`` (in ``timezone``), streamed from the day
    folder under ``folder`` or, without one, from the uploads ``table`` of ``warehouse``: readable,
    or an error record (bad link, pipe, URI outside ``allowed_roots``) that becomes an error row
    without being read. The table is read in pages (:func:`iter_uploads`): memory holds one page,
    whatever the day's size."""
    if folder is not None:
        return iter_folder_day(folder, day, allowed_roots=allowed_roots)
    if table is None or warehouse is None:
        raise ValueError("day_uploads needs an uploads folder, or an uploads table and its warehouse")
    pages = iter_uploads(warehouse, table, *day_window(day, timezone))
    return iter_table_uploads(((i, u) for page in pages for i, u in zip(page["image_id"], page["image_uri"],
                                                                        strict=True)), allowed_roots)
