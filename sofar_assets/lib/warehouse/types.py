"""Logical column types and the one frame <-> Arrow conversion both engines share.

Every frame is converted once into an Arrow table with an explicit type per column (``DATE``,
``TIMESTAMP``, ``STRING``, ``FLOAT64``, ``INT64``, ``BOOL``; the BigQuery names are used as the
logical types of both engines). With a declared :class:`~.schemas.TableSchema` the types come
from the declaration; without one (:func:`frame_types`) they are inferred from the frame, which
still refuses a date column that holds strings instead of silently creating a ``VARCHAR``.

Reads come back through Arrow as well: ``DATE`` -> ``datetime.date`` objects, ``TIMESTAMP`` ->
tz-naive UTC ``datetime64``, ``INT64`` -> pandas' nullable ``Int64``.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pyarrow as pa

from sofar_assets.lib.warehouse.names import check_identifier

DATE, TIMESTAMP, STRING, FLOAT64, INT64, BOOL = "DATE", "TIMESTAMP", "STRING", "FLOAT64", "INT64", "BOOL"

ARROW_TYPES = {
    DATE: pa.date32(),
    TIMESTAMP: pa.timestamp("us"),
    STRING: pa.string(),
    FLOAT64: pa.float64(),
    INT64: pa.int64(),
    BOOL: pa.bool_(),
}
DUCKDB_TO_LOGICAL = {
    "DATE": DATE,
    "TIMESTAMP": TIMESTAMP,
    "TIMESTAMP_NS": TIMESTAMP,
    "TIMESTAMP_MS": TIMESTAMP,
    "TIMESTAMP_S": TIMESTAMP,
    "TIMESTAMP WITH TIME ZONE": TIMESTAMP,
    "VARCHAR": STRING,
    "DOUBLE": FLOAT64,
    "FLOAT": FLOAT64,
    "BIGINT": INT64,
    "INTEGER": INT64,
    "SMALLINT": INT64,
    "TINYINT": INT64,
    "HUGEINT": INT64,
    "BOOLEAN": BOOL,
}
BIGQUERY_TO_LOGICAL = {
    "DATE": DATE,
    "TIMESTAMP": TIMESTAMP,
    "STRING": STRING,
    "FLOAT": FLOAT64,
    "FLOAT64": FLOAT64,
    "INTEGER": INT64,
    "INT64": INT64,
    "BOOLEAN": BOOL,
    "BOOL": BOOL,
}



def _object_type(values: pd.Series, column: str) -> str | None:
    kinds = set()
    for t in set(map(type, values)):
        if issubclass(t, dt.datetime):  # before date: datetime subclasses date (pd.Timestamp too)
            kinds.add(TIMESTAMP)
        elif issubclass(t, dt.date):
            kinds.add(DATE)
        elif issubclass(t, str):
            kinds.add(STRING)
        elif issubclass(t, bool | np.bool_):
            kinds.add(BOOL)
        elif issubclass(t, int | np.integer):
            kinds.add(INT64)
        elif issubclass(t, float | np.floating):
            kinds.add(FLOAT64)
        else:
            raise ValueError(f"column {column!r} holds {t.__name__} values, which have no table type")
    if kinds == {INT64, FLOAT64}:
        return FLOAT64
    if len(kinds) > 1:
        raise ValueError(f"column {column!r} mixes value types {sorted(kinds)}; give it one type")
    return kinds.pop() if kinds else None


def infer_type(series: pd.Series, column: str = "?") -> str | None:
    """The logical type of a column, or None when it holds only nulls and has no typed dtype."""
    dtype = series.dtype
    if isinstance(dtype, pd.ArrowDtype):
        at = dtype.pyarrow_dtype
        for logical, check in (
            (DATE, pa.types.is_date),
            (TIMESTAMP, pa.types.is_timestamp),
            (STRING, lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)),
            (BOOL, pa.types.is_boolean),
            (INT64, pa.types.is_integer),
            (FLOAT64, pa.types.is_floating),
        ):
            if check(at):
                return logical
        raise ValueError(f"column {column!r} has Arrow type {at}, which has no table type")
    if getattr(dtype, "name", "") == "dbdate":  # db-dtypes, what BigQuery's own to_dataframe returns
        return DATE
    if pd.api.types.is_bool_dtype(dtype):
        return BOOL
    if pd.api.types.is_integer_dtype(dtype):
        return INT64
    if pd.api.types.is_float_dtype(dtype):
        return FLOAT64
    if pd.api.types.is_datetime64_any_dtype(dtype):
        return TIMESTAMP
    if isinstance(dtype, pd.StringDtype):
        return STRING
    if pd.api.types.is_object_dtype(dtype):
        return _object_type(series.dropna(), column)
    raise ValueError(f"column {column!r} has dtype {dtype}, which has no table type")


def frame_types(df: pd.DataFrame) -> dict[str, str | None]:
    """Logical type per column, in column order (None for an all-null object column)."""
    if df.columns.has_duplicates:
        dup = df.columns[df.columns.duplicated()][0]
        raise ValueError(f"column {dup!r} appears twice in the frame")
    return {check_identifier(str(c), "column name"): infer_type(df[c], str(c)) for c in df.columns}


def _nullable_objects(s: pd.Series) -> list:
    return s.astype(object).where(s.notna(), None).tolist()


def arrow_column(s: pd.Series, logical: str) -> pa.Array:
    if logical == TIMESTAMP:
        # utc=True localizes naive values as UTC and converts aware ones: the store is naive UTC
        ts = pd.to_datetime(s, utc=True).dt.tz_localize(None).astype("datetime64[us]")
        return pa.array(ts, type=pa.timestamp("us"), from_pandas=True)
    if logical in (FLOAT64, INT64):
        return pa.array(s, type=ARROW_TYPES[logical], from_pandas=True)
    if logical == DATE and pd.api.types.is_datetime64_any_dtype(s.dtype):
        return pa.array(_nullable_objects(s.dt.date.where(s.notna(), None)), type=pa.date32())
    return pa.array(_nullable_objects(s), type=ARROW_TYPES[logical])


def to_arrow(df: pd.DataFrame, types: dict[str, str]) -> pa.Table:
    """Convert ``df`` to Arrow with exactly the logical ``types`` (same column order)."""
    arrays = []
    for column, logical in types.items():
        try:
            arrays.append(arrow_column(df[column], logical))
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise ValueError(f"column {column!r} cannot be stored as {logical}: {exc}") from exc
    return pa.Table.from_arrays(arrays, names=list(types))


def arrow_to_pandas(table: pa.Table) -> pd.DataFrame:
    """Arrow -> pandas with DATE as ``datetime.date``, TIMESTAMP as naive UTC, INT64 as ``Int64``."""
    df = table.to_pandas(date_as_object=True, types_mapper={pa.int64(): pd.Int64Dtype()}.get)
    for column in df.columns:
        if isinstance(df[column].dtype, pd.DatetimeTZDtype):
            df[column] = df[column].dt.tz_convert("UTC").dt.tz_localize(None)
    return df


def create_types(types: dict[str, str | None]) -> dict[str, str]:
    return {c: t or STRING for c, t in types.items()}


def check_against_table(
    table: str, table_types: dict[str, str], types: dict[str, str | None], empty: bool = False
) -> None:
    names, frame_names = list(table_types), list(types)
    if names != frame_names:
        i = next((i for i, (a, b) in enumerate(zip(names, frame_names, strict=False)) if a != b), None)
        if i is None:
            i = min(len(names), len(frame_names))
        have = names[i] if i < len(names) else "(no column)"
        got = frame_names[i] if i < len(frame_names) else "(no column)"
        raise ValueError(
            f"table {table!r}: column {i} is {have!r} but the frame has {got!r} there "
            f"(table columns {names}, frame columns {frame_names}); write the table's columns in "
            "its order, or rebuild it with write_table()"
        )
    if empty:  # an empty column's dtype is whatever pandas defaulted to; there is no value to convert
        return
    for column, have in table_types.items():
        got = types[column]
        if got is None or got == have or (got == INT64 and have == FLOAT64):
            continue
        hint = ""
        if have in (DATE, TIMESTAMP) and got == STRING:
            hint = f"; convert the strings first, e.g. pd.to_datetime(df[{column!r}]).dt.date"
        raise ValueError(
            f"table {table!r}: column {column!r} is {have} but the frame holds {got} values{hint}"
        )


def _as_bound(value, kind: str, name: str):
    if isinstance(value, str):
        value = pd.Timestamp(value)
    if isinstance(value, pd.Timestamp):
        value = value.to_pydatetime()
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        if kind == DATE:
            if value.time() != dt.time(0):
                raise ValueError(f"{name}={value} has a time of day, but the column is a DATE")
            return value.date()
        return value
    if isinstance(value, dt.date):
        return value if kind == DATE else dt.datetime(value.year, value.month, value.day)
    raise TypeError(f"{name} must be a date or datetime, got {type(value).__name__}")


def range_bounds(start, end, kind: str) -> tuple:
    """Half-open ``[start, end)`` bounds as ``date`` (DATE column) or naive UTC ``datetime``."""
    if kind not in (DATE, TIMESTAMP):
        raise ValueError(f"a range needs a DATE or TIMESTAMP column, not {kind}")
    lo, hi = _as_bound(start, kind, "start"), _as_bound(end, kind, "end")
    if not lo < hi:
        raise ValueError(f"empty range: start={lo} is not before end={hi}")
    return lo, hi


def check_in_range(data: pa.Table, column: str, lo, hi) -> None:
    """Raise naming ``column`` and the first value outside ``[lo, hi)`` (nulls count as outside)."""
    if data.num_rows == 0:
        return
    values = data.column(column).to_numpy()
    unit = "D" if isinstance(lo, dt.date) and not isinstance(lo, dt.datetime) else "us"
    lo64, hi64 = np.datetime64(lo, unit), np.datetime64(hi, unit)
    bad = np.isnat(values) | (values < lo64) | (values >= hi64)
    if bad.any():
        i = int(bad.argmax())
        shown = "null" if np.isnat(values[i]) else str(values[i])
        raise ValueError(
            f"column {column!r}: row {i} has {column}={shown}, outside the partition [{lo}, {hi}) "
            f"({int(bad.sum())} of {len(values)} rows are outside); refusing to write the wrong partition"
        )


def _partition_kind(
    types: dict[str, str | None], table_types: dict[str, str] | None, column: str, start
) -> str:
    if column not in types:
        raise ValueError(f"partition column {column!r} is not in the frame (columns: {list(types)})")
    got = types[column]
    if got == STRING:
        raise ValueError(
            f"partition column {column!r} holds strings; it must hold datetime.date (DATE) or timestamps, "
            f"e.g. df[{column!r}] = pd.to_datetime(df[{column!r}]).dt.date, so the table column is not a VARCHAR"
        )
    kind = (table_types or {}).get(column) or got
    if kind is None:  # empty or all-null column on a new table: the bounds tell which it is
        kind = TIMESTAMP if isinstance(start, dt.datetime) else DATE
    if kind not in (DATE, TIMESTAMP):
        raise ValueError(f"partition column {column!r} is {kind}; it must be DATE or TIMESTAMP")
    return kind


def prepare_partition(table, df, column, start, end, table_types):
    """Validate a replace_partition call; return (arrow data, types to write, lo, hi)."""
    types = frame_types(df)
    if df.empty:
        types[column] = None
    kind = _partition_kind(types, table_types, column, start)
    if table_types is None:
        write_types = create_types(types)
        write_types[column] = kind
    else:
        check_against_table(table, table_types, types, empty=df.empty)
        write_types = dict(table_types)
    lo, hi = range_bounds(start, end, kind)
    data = to_arrow(df, write_types)
    check_in_range(data, column, lo, hi)
    return data, write_types, lo, hi

