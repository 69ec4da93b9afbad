"""Declared table schemas: each warehouse table's columns and types, written down once.

A write with a :class:`TableSchema` never infers types from pandas dtypes: every column is
converted to its declared type, and a frame that does not fit (a missing or extra column, a
string in a FLOAT64 column, a fractional value in an INT64 column) is refused with the table,
the column and the first bad row named.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from sofar_assets.lib.warehouse.names import check_identifier
from sofar_assets.lib.warehouse.types import (
    ARROW_TYPES,
    BOOL,
    DATE,
    FLOAT64,
    INT64,
    STRING,
    TIMESTAMP,
    arrow_column,
)

# which Arrow source types may be cast to each logical type (a string is never parsed into a date)
_ARROW_SOURCES = {
    DATE: lambda t: pa.types.is_date(t) or pa.types.is_timestamp(t),
    TIMESTAMP: lambda t: pa.types.is_timestamp(t) or pa.types.is_date(t),
    STRING: lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
    FLOAT64: lambda t: pa.types.is_floating(t) or pa.types.is_integer(t),
    INT64: pa.types.is_integer,
    BOOL: pa.types.is_boolean,
}


@dataclass(frozen=True)
class TableSchema:
    """A warehouse table: column -> logical type (in order), day partitions and clustering.

    ``partition_column`` is a DATE column: BigQuery partitions the table by its day, and
    :meth:`~sofar_assets.lib.warehouse.base.Warehouse.replace_day` replaces one day at a time.
    ``clustering`` are BigQuery clustering columns (DuckDB ignores them).
    """

    name: str
    columns: dict[str, str]
    partition_column: str | None = None
    clustering: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        check_identifier(self.name, "table name")
        if not self.columns:
            raise ValueError(f"table {self.name!r}: a schema needs at least one column")
        for column, logical in self.columns.items():
            check_identifier(column, "column name")
            if logical not in ARROW_TYPES:
                raise ValueError(
                    f"table {self.name!r}: column {column!r} has type {logical!r}; "
                    f"use one of {', '.join(ARROW_TYPES)}"
                )
        if self.partition_column is not None and self.columns.get(self.partition_column) != DATE:
            raise ValueError(
                f"table {self.name!r}: partition column {self.partition_column!r} must be a DATE column"
            )
        for column in self.clustering:
            if column not in self.columns:
                raise ValueError(f"table {self.name!r}: clustering column {column!r} is not a column")
        object.__setattr__(self, "clustering", tuple(self.clustering))

    def __hash__(self) -> int:
        return hash((self.name, tuple(self.columns.items()), self.partition_column, self.clustering))

    def arrow_schema(self) -> pa.Schema:
        """The Arrow schema of :meth:`to_arrow`'s tables (TIMESTAMP: naive UTC microseconds)."""
        return pa.schema([pa.field(c, ARROW_TYPES[t]) for c, t in self.columns.items()])

    def _check_names(self, names: Iterable[str]) -> None:
        names = list(names)
        missing = [c for c in self.columns if c not in names]
        extra = [c for c in names if c not in self.columns]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing column(s) {missing}")
            if extra:
                parts.append(f"extra column(s) {extra}")
            raise ValueError(
                f"table {self.name!r}: the rows have {' and '.join(parts)} "
                f"(the table's columns are {list(self.columns)})"
            )
        if len(set(names)) != len(names):
            dup = next(c for c in names if names.count(c) > 1)
            raise ValueError(f"table {self.name!r}: column {dup!r} appears twice in the rows")

    def to_arrow(self, rows: pd.DataFrame | pa.Table) -> pa.Table:
        """``rows`` as an Arrow table with exactly the declared columns (in order) and types.

        No dtype inference: each column is converted to its declared type. A missing or extra
        column, or a value that does not convert, raises ``ValueError`` naming the table, the
        column and (for a value) the first bad row.
        """
        if isinstance(rows, pa.Table):
            self._check_names(rows.column_names)
            return pa.Table.from_arrays(
                [self._cast(rows.column(c), c, t) for c, t in self.columns.items()],
                schema=self.arrow_schema(),
            )
        if not isinstance(rows, pd.DataFrame):
            raise TypeError(f"table {self.name!r}: rows must be a DataFrame or an Arrow table, not {type(rows).__name__}")
        self._check_names([str(c) for c in rows.columns])
        arrays = []
        for column, logical in self.columns.items():
            arrays.append(self._convert(rows[column], column, logical))  # positions, not the index
        return pa.Table.from_arrays(arrays, schema=self.arrow_schema())

    def _bad(self, column: str, logical: str, row: int, value, why: str = "") -> ValueError:
        if isinstance(value, np.generic):
            value = value.item()
        return ValueError(
            f"table {self.name!r}: column {column!r} is {logical}, but row {row} holds "
            f"{value!r} ({type(value).__name__}){': ' + why if why else ''}"
        )

    def _convert(self, s: pd.Series, column: str, logical: str) -> pa.Array:
        if logical in (DATE, TIMESTAMP, FLOAT64, INT64, BOOL) and (
            pd.api.types.is_object_dtype(s.dtype) or isinstance(s.dtype, pd.StringDtype)
        ):
            is_str = s.map(lambda v: isinstance(v, str)).to_numpy(dtype=bool)
            if is_str.any():
                i = int(is_str.argmax())
                hint = "convert it first, e.g. pd.to_datetime(...)" if logical in (DATE, TIMESTAMP) else ""
                raise self._bad(column, logical, i, s.iloc[i], hint)
        if logical == INT64 and pd.api.types.is_float_dtype(s.dtype):
            frac = (s.notna() & (s % 1 != 0)).to_numpy(dtype=bool)
            if frac.any():
                i = int(frac.argmax())
                raise self._bad(column, logical, i, s.iloc[i], "not a whole number")
        try:
            return arrow_column(s, logical)
        except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
            for i, value in enumerate(s):  # the error path only: find the first value that fails
                try:
                    arrow_column(pd.Series([value], dtype=s.dtype), logical)
                except (pa.ArrowException, TypeError, ValueError, OverflowError) as one:
                    raise self._bad(column, logical, i, value, str(one)) from exc
            raise ValueError(f"table {self.name!r}: column {column!r} cannot be stored as {logical}: {exc}") from exc

    def _cast(self, values: pa.ChunkedArray, column: str, logical: str) -> pa.ChunkedArray:
        target = ARROW_TYPES[logical]
        if values.type == target:
            return values
        if not (pa.types.is_null(values.type) or _ARROW_SOURCES[logical](values.type)):
            raise ValueError(
                f"table {self.name!r}: column {column!r} is {logical}, but the rows hold Arrow {values.type}"
            )
        try:
            return values.cast(target, safe=True)
        except pa.ArrowException as exc:
            raise ValueError(f"table {self.name!r}: column {column!r} cannot be stored as {logical}: {exc}") from exc


IMAGE_UPLOADS = TableSchema(
    name="image_uploads",
    columns={"image_id": STRING, "image_uri": STRING, "uploaded_at": TIMESTAMP},
)

SOFAR_DATASET = TableSchema(
    name="sofar_dataset",
    columns={
        "sha256": STRING,
        "image_uri": STRING,
        "label": STRING,
        "labels": STRING,
        "tasks": STRING,
        "multi_label": BOOL,
        "split": STRING,
        "n_sources": INT64,
        "corrected_at": TIMESTAMP,
    },
)

RAW_LABELS_COLUMNS = {
    "task": STRING,
    "image_uri": STRING,
    "source_label": STRING,
    "label": STRING,
    "sha256": STRING,
    "n_bytes": INT64,
    "width": INT64,
    "height": INT64,
    "error": STRING,
}


def raw_labels_table(task: str) -> str:
    """The name of a task's raw label table."""
    return check_identifier(f"raw_labels_{task}", "table name")


def raw_labels_schema(task: str) -> TableSchema:
    """The raw label table of one task-centric dataset (one row per file)."""
    return TableSchema(name=raw_labels_table(task), columns=dict(RAW_LABELS_COLUMNS))


def day_of(value) -> dt.date:
    """A partition day from a ``date`` (a ``datetime`` is refused: it is not a day)."""
    if isinstance(value, dt.datetime) or not isinstance(value, dt.date):
        raise TypeError(f"a partition day must be a datetime.date, not {type(value).__name__} {value!r}")
    return value
