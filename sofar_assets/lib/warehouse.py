"""Tables in DuckDB (local) or BigQuery (production) behind one small interface.

Every frame is converted once, by :func:`to_arrow`, into an Arrow table with an explicit type
per column (``DATE``, ``TIMESTAMP``, ``STRING``, ``FLOAT64``, ``INT64``, ``BOOL``; the
BigQuery names are used as the logical types of both engines). That single conversion is what
keeps a column of ``datetime.date`` objects a ``DATE`` in both engines, turns tz-aware
timestamps into tz-naive UTC, and refuses a date column that holds strings instead of silently
creating a ``VARCHAR`` partition column.

Reads come back through Arrow as well: ``DATE`` -> ``datetime.date`` objects, ``TIMESTAMP`` ->
tz-naive UTC ``datetime64``, ``INT64`` -> pandas' nullable ``Int64``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import re
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

DATE, TIMESTAMP, STRING, FLOAT64, INT64, BOOL = "DATE", "TIMESTAMP", "STRING", "FLOAT64", "INT64", "BOOL"

_ARROW_TYPES = {
    DATE: pa.date32(),
    TIMESTAMP: pa.timestamp("us"),
    STRING: pa.string(),
    FLOAT64: pa.float64(),
    INT64: pa.int64(),
    BOOL: pa.bool_(),
}
_DUCKDB_TO_LOGICAL = {
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
_BIGQUERY_TO_LOGICAL = {
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

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,299}")
_TABLE_PLACEHOLDER = re.compile(r"\{table:([^}]*)\}")


class TableNotFoundError(LookupError):
    """The named table does not exist in the warehouse."""


def check_identifier(name: str, what: str = "name") -> str:
    """Table and column names are plain identifiers, so they can be quoted into SQL safely."""
    if not isinstance(name, str) or not _IDENT.fullmatch(name):
        raise ValueError(
            f"invalid {what} {name!r}: use letters, digits and underscores, not starting with a digit"
        )
    return name


# ---------------------------------------------------------------------------------------------
# Frame <-> Arrow conversion (shared by both engines)
# ---------------------------------------------------------------------------------------------


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


def _arrow_column(s: pd.Series, logical: str) -> pa.Array:
    if logical == TIMESTAMP:
        # utc=True localizes naive values as UTC and converts aware ones: the store is naive UTC
        ts = pd.to_datetime(s, utc=True).dt.tz_localize(None).astype("datetime64[us]")
        return pa.array(ts, type=pa.timestamp("us"), from_pandas=True)
    if logical in (FLOAT64, INT64):
        return pa.array(s, type=_ARROW_TYPES[logical], from_pandas=True)
    if logical == DATE and pd.api.types.is_datetime64_any_dtype(s.dtype):
        return pa.array(_nullable_objects(s.dt.date.where(s.notna(), None)), type=pa.date32())
    return pa.array(_nullable_objects(s), type=_ARROW_TYPES[logical])


def to_arrow(df: pd.DataFrame, types: dict[str, str]) -> pa.Table:
    """Convert ``df`` to Arrow with exactly the logical ``types`` (same column order)."""
    arrays = []
    for column, logical in types.items():
        try:
            arrays.append(_arrow_column(df[column], logical))
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


def _create_types(types: dict[str, str | None]) -> dict[str, str]:
    return {c: t or STRING for c, t in types.items()}


def _check_against_table(
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


def _prepare_partition(table, df, column, start, end, table_types):
    """Validate a replace_partition call; return (arrow data, types to write, lo, hi)."""
    types = frame_types(df)
    if df.empty:
        types[column] = None
    kind = _partition_kind(types, table_types, column, start)
    if table_types is None:
        write_types = _create_types(types)
        write_types[column] = kind
    else:
        _check_against_table(table, table_types, types, empty=df.empty)
        write_types = dict(table_types)
    lo, hi = range_bounds(start, end, kind)
    data = to_arrow(df, write_types)
    check_in_range(data, column, lo, hi)
    return data, write_types, lo, hi


# ---------------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------------


class Warehouse(ABC):
    """Named tables with whole-table writes and idempotent half-open range replacement."""

    @abstractmethod
    def fully_qualified(self, table: str) -> str:
        """The engine's quoted, fully-qualified name of ``table`` (what ``{table:NAME}`` expands to)."""

    @abstractmethod
    def quote(self, identifier: str) -> str:
        """Quote a column name for this engine's SQL."""

    @abstractmethod
    def write_table(self, table: str, df: pd.DataFrame) -> None:
        """Create or replace the whole table with ``df`` (its schema follows ``df``)."""

    @abstractmethod
    def replace_partition(self, table: str, df: pd.DataFrame, partition_column: str, start, end) -> int:
        """Replace the rows with ``start <= partition_column < end`` by ``df``; return rows inserted.

        Every row of ``df`` must fall inside ``[start, end)``; the table is created from ``df``'s
        schema when missing, and an existing table's columns (names, order, types) must match.
        """

    @abstractmethod
    def table_columns(self, table: str) -> dict[str, str]:
        """Column name -> logical type, in table order; raise :class:`TableNotFoundError` if absent."""

    @abstractmethod
    def table_exists(self, table: str) -> bool: ...

    @abstractmethod
    def _select(self, sql: str, params: list | None = None) -> pd.DataFrame: ...

    def read_table(self, table: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """The whole table (or ``columns`` of it)."""
        cols = ", ".join(self.quote(c) for c in self._selected_columns(table, columns))
        return self._select(f"SELECT {cols} FROM {self.fully_qualified(table)}")

    @abstractmethod
    def read_range(
        self, table: str, column: str, start, end, columns: Sequence[str] | None = None
    ) -> pd.DataFrame:
        """Rows with ``start <= column < end``, ordered by ``column``."""

    @abstractmethod
    def _run_query(self, sql: str) -> pd.DataFrame: ...

    def expand(self, sql: str) -> str:
        """Replace each ``{table:NAME}`` with the engine's fully-qualified name of NAME."""
        return _TABLE_PLACEHOLDER.sub(
            lambda m: self.fully_qualified(check_identifier(m.group(1), "table")), sql
        )

    def query(self, sql: str) -> pd.DataFrame:
        """Run ``sql`` (``{table:NAME}`` placeholders allowed) and return its rows."""
        return self._run_query(self.expand(sql))

    def partition_counts(self, table: str, column: str) -> pd.DataFrame:
        """Rows per partition: a frame (partition, rows) ordered by partition.

        A DATE column counts per value; a TIMESTAMP column per UTC day (its date).
        """
        kind = self._selected_columns(table, [column])[column]
        c = self.quote(column)
        key = f"CAST({c} AS DATE)" if kind == TIMESTAMP else c
        return self.query(
            f"SELECT {key} AS {self.quote('partition')}, COUNT(*) AS {self.quote('rows')} "
            f"FROM {{table:{table}}} GROUP BY 1 ORDER BY 1"
        )

    def _selected_columns(self, table: str, columns: Sequence[str] | None) -> dict[str, str]:
        existing = self.table_columns(table)
        if columns is None:
            return existing
        if isinstance(columns, str):
            raise TypeError("columns must be a list of names, not a string")
        for c in columns:
            if c not in existing:
                raise ValueError(f"table {table!r} has no column {c!r} (columns: {list(existing)})")
        return {c: existing[c] for c in columns}


# ---------------------------------------------------------------------------------------------
# DuckDB
# ---------------------------------------------------------------------------------------------


class DuckDBWarehouse(Warehouse):
    """Tables in schema ``schema`` of the DuckDB file ``path``.

    Each call opens and closes its own connection, so between calls other processes (the
    Dagster UI, a notebook) can open the file; a call that finds the file locked by another
    process retries for up to ``lock_timeout_s``.
    """

    def __init__(self, path: str | Path, schema: str = "sofar", lock_timeout_s: float = 30.0):
        if str(path) == ":memory:":
            raise ValueError("DuckDBWarehouse needs a file path: each call opens a new connection")
        self.path = str(path)
        self.schema = check_identifier(schema, "schema")
        self.lock_timeout_s = lock_timeout_s
        self._catalog: str | None = None

    def __repr__(self) -> str:
        return f"DuckDBWarehouse({self.path!r}, schema={self.schema!r})"

    def _connect(self):
        import duckdb

        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.05
        while True:
            try:
                con = duckdb.connect(self.path)
                if self._catalog is None:
                    self._catalog = con.execute("SELECT current_database()").fetchone()[0]
                return con
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def quote(self, identifier: str) -> str:
        return '"' + check_identifier(identifier, "column name") + '"'

    def fully_qualified(self, table: str) -> str:
        # Three parts: a file named after the schema (sofar.duckdb) makes "sofar".t ambiguous
        if self._catalog is None:
            self._connect().close()
        catalog = self._catalog.replace('"', '""')
        return f'"{catalog}"."{self.schema}"."{check_identifier(table, "table name")}"'

    def _schema_sql(self) -> str:
        return f'CREATE SCHEMA IF NOT EXISTS "{self._catalog.replace(chr(34), chr(34) * 2)}"."{self.schema}"'

    def _columns(self, con, table: str) -> dict[str, str] | None:
        check_identifier(table, "table name")
        rows = con.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_catalog = ? AND table_schema = ? AND table_name = ? ORDER BY ordinal_position",
            [self._catalog, self.schema, table],
        ).fetchall()
        if not rows:
            return None
        return {name: _DUCKDB_TO_LOGICAL.get(str(t).upper(), str(t).upper()) for name, t in rows}

    def table_columns(self, table: str) -> dict[str, str]:
        with self._connect() as con:
            columns = self._columns(con, table)
        if columns is None:
            raise TableNotFoundError(f"table {table!r} does not exist in {self!r}")
        return columns

    def table_exists(self, table: str) -> bool:
        with self._connect() as con:
            return self._columns(con, table) is not None

    def write_table(self, table: str, df: pd.DataFrame) -> None:
        data = to_arrow(df, _create_types(frame_types(df)))
        fq = self.fully_qualified(table)
        with self._connect() as con:
            con.execute(self._schema_sql())
            con.register("_sofar_frame", data)
            con.execute(f"CREATE OR REPLACE TABLE {fq} AS SELECT * FROM _sofar_frame")

    def replace_partition(self, table: str, df: pd.DataFrame, partition_column: str, start, end) -> int:
        fq = self.fully_qualified(table)
        with self._connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                table_types = self._columns(con, table)
                data, types, lo, hi = _prepare_partition(table, df, partition_column, start, end, table_types)
                con.register("_sofar_frame", data)
                if table_types is None:
                    con.execute(self._schema_sql())
                    con.execute(f"CREATE TABLE {fq} AS SELECT * FROM _sofar_frame")
                else:
                    c = self.quote(partition_column)
                    con.execute(f"DELETE FROM {fq} WHERE {c} >= ? AND {c} < ?", [lo, hi])
                    cols = ", ".join(self.quote(n) for n in types)
                    con.execute(f"INSERT INTO {fq} ({cols}) SELECT {cols} FROM _sofar_frame")
                con.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(Exception):  # keep the original error if COMMIT itself failed
                    con.execute("ROLLBACK")
                raise
        return data.num_rows

    def _select(self, sql: str, params: list | None = None) -> pd.DataFrame:
        with self._connect() as con:
            rel = con.sql(sql, params=params)
            return pd.DataFrame() if rel is None else arrow_to_pandas(rel.to_arrow_table())

    def read_range(self, table, column, start, end, columns=None) -> pd.DataFrame:
        existing = self.table_columns(table)
        if column not in existing:
            raise ValueError(f"table {table!r} has no column {column!r} (columns: {list(existing)})")
        lo, hi = range_bounds(start, end, existing[column])
        cols = ", ".join(self.quote(c) for c in self._selected_columns(table, columns))
        c = self.quote(column)
        return self._select(
            f"SELECT {cols} FROM {self.fully_qualified(table)} WHERE {c} >= ? AND {c} < ? ORDER BY {c}",
            [lo, hi],
        )

    def _run_query(self, sql: str) -> pd.DataFrame:
        return self._select(sql)


# ---------------------------------------------------------------------------------------------
# BigQuery
# ---------------------------------------------------------------------------------------------


def _bq_literal(value, kind: str) -> str:
    if kind == DATE:
        return f"DATE '{value.isoformat()}'"
    return f"TIMESTAMP '{value.isoformat(sep=' ')}+00:00'"


class BigQueryWarehouse(Warehouse):
    """Tables in BigQuery dataset ``project.dataset`` (created on first write if missing).

    ``replace_partition`` is atomic for readers: the rows are first loaded into a short-lived
    staging table (a load job cannot join a transaction), then one multi-statement transaction
    deletes the range from the target and inserts the staged rows. A failure before the commit
    leaves the target untouched; a re-run repeats the same delete + insert, so it never
    duplicates rows. The staging table is dropped afterwards and expires after a day anyway.
    New tables are day-partitioned on the partition column, which keeps the DELETE cheap.
    """

    STAGING_TTL = dt.timedelta(days=1)

    def __init__(self, project: str, dataset: str, location: str | None = None, client=None):
        self.project = project
        self.dataset = check_identifier(dataset, "dataset")
        self.location = location
        self._client = client
        self._dataset_ready = False

    def __repr__(self) -> str:
        return f"BigQueryWarehouse({self.project!r}, {self.dataset!r})"

    @property
    def client(self):
        if self._client is None:
            from google.cloud import bigquery

            self._client = bigquery.Client(project=self.project, location=self.location)
        return self._client

    def quote(self, identifier: str) -> str:
        return "`" + check_identifier(identifier, "column name") + "`"

    def _ref(self, table: str) -> str:
        return f"{self.project}.{self.dataset}.{check_identifier(table, 'table name')}"

    def fully_qualified(self, table: str) -> str:
        return f"`{self._ref(table)}`"

    def _ensure_dataset(self) -> None:
        if self._dataset_ready:
            return
        from google.cloud import bigquery

        ds = bigquery.Dataset(f"{self.project}.{self.dataset}")
        if self.location:
            ds.location = self.location
        self.client.create_dataset(ds, exists_ok=True)
        self._dataset_ready = True

    def _get_table(self, table: str):
        from google.api_core.exceptions import NotFound

        try:
            return self.client.get_table(self._ref(table))
        except NotFound:
            return None

    @staticmethod
    def _types_of(t) -> dict[str, str]:
        return {
            f.name: _BIGQUERY_TO_LOGICAL.get(f.field_type.upper(), f.field_type.upper()) for f in t.schema
        }

    def table_columns(self, table: str) -> dict[str, str]:
        t = self._get_table(table)
        if t is None:
            raise TableNotFoundError(f"table {table!r} does not exist in {self!r}")
        return self._types_of(t)

    def table_exists(self, table: str) -> bool:
        return self._get_table(table) is not None

    @staticmethod
    def _schema(types: dict[str, str]):
        from google.cloud import bigquery

        return [bigquery.SchemaField(name, t, mode="NULLABLE") for name, t in types.items()]

    def _load(self, data: pa.Table, ref: str, types: dict[str, str], disposition: str) -> None:
        import pyarrow.parquet as pq
        from google.cloud import bigquery

        # Parquet TIMESTAMP marked UTC-adjusted loads as TIMESTAMP, never as DATETIME
        for i, field in enumerate(data.schema):
            if pa.types.is_timestamp(field.type):
                data = data.set_column(i, field.name, data.column(i).cast(pa.timestamp("us", tz="UTC")))
        buf = io.BytesIO()
        pq.write_table(data, buf)
        buf.seek(0)
        config = bigquery.LoadJobConfig(
            source_format=bigquery.SourceFormat.PARQUET,
            schema=self._schema(types),
            write_disposition=disposition,
        )
        self.client.load_table_from_file(buf, ref, job_config=config, location=self.location).result()

    def write_table(self, table: str, df: pd.DataFrame) -> None:
        types = _create_types(frame_types(df))
        data = to_arrow(df, types)
        self._ensure_dataset()
        existing = self._get_table(table)
        if existing is not None and self._types_of(existing) != types:
            # BigQuery's WRITE_TRUNCATE would take the new schema, but not every implementation
            # of the API does (the emulator keeps the old one); a schema change is rare enough
            # to afford the non-atomic drop + load.
            self.client.delete_table(self._ref(table), not_found_ok=True)
        self._load(data, self._ref(table), types, "WRITE_TRUNCATE")

    def _create_partitioned(self, table: str, types: dict[str, str], column: str) -> None:
        from google.cloud import bigquery

        t = bigquery.Table(self._ref(table), schema=self._schema(types))
        t.time_partitioning = bigquery.TimePartitioning(type_=bigquery.TimePartitioningType.DAY, field=column)
        self.client.create_table(t, exists_ok=True)

    def _param(self, name: str, value, kind: str):
        from google.cloud import bigquery

        if kind == TIMESTAMP:
            value = value.replace(tzinfo=dt.UTC)
        return bigquery.ScalarQueryParameter(name, kind, value)

    def replace_partition(self, table: str, df: pd.DataFrame, partition_column: str, start, end) -> int:
        from google.cloud import bigquery

        self._ensure_dataset()
        existing = self._get_table(table)
        table_types = None if existing is None else self._types_of(existing)
        data, types, lo, hi = _prepare_partition(table, df, partition_column, start, end, table_types)
        if existing is None:
            self._create_partitioned(table, types, partition_column)
        kind = types[partition_column]

        staging = f"_staging_{table}_{uuid.uuid4().hex[:12]}"
        stage = bigquery.Table(self._ref(staging), schema=self._schema(types))
        stage.expires = dt.datetime.now(dt.UTC) + self.STAGING_TTL
        self.client.create_table(stage)
        try:
            self._load(data, self._ref(staging), types, "WRITE_APPEND")
            c = self.quote(partition_column)
            cols = ", ".join(self.quote(n) for n in types)
            # Bounds as literals (built from date/datetime objects, never from user text): query
            # parameters inside a script are not supported everywhere (the emulator drops them).
            lo_sql, hi_sql = _bq_literal(lo, kind), _bq_literal(hi, kind)
            script = (
                "BEGIN TRANSACTION;\n"
                f"DELETE FROM {self.fully_qualified(table)} WHERE {c} >= {lo_sql} AND {c} < {hi_sql};\n"
                f"INSERT INTO {self.fully_qualified(table)} ({cols}) "
                f"SELECT {cols} FROM {self.fully_qualified(staging)};\n"
                "COMMIT TRANSACTION;"
            )
            self.client.query(script, location=self.location).result()
        finally:
            self.client.delete_table(self._ref(staging), not_found_ok=True)
        return data.num_rows

    def _select(self, sql: str, params: list | None = None) -> pd.DataFrame:
        from google.cloud import bigquery

        config = bigquery.QueryJobConfig(query_parameters=params or [])
        rows = self.client.query(sql, job_config=config, location=self.location).result()
        # The REST path: reads here are one day of rows, and the Storage API client is optional
        return arrow_to_pandas(rows.to_arrow(create_bqstorage_client=False))

    def read_range(self, table, column, start, end, columns=None) -> pd.DataFrame:
        existing = self.table_columns(table)
        if column not in existing:
            raise ValueError(f"table {table!r} has no column {column!r} (columns: {list(existing)})")
        kind = existing[column]
        lo, hi = range_bounds(start, end, kind)
        cols = ", ".join(self.quote(c) for c in self._selected_columns(table, columns))
        c = self.quote(column)
        return self._select(
            f"SELECT {cols} FROM {self.fully_qualified(table)} WHERE {c} >= @start AND {c} < @end ORDER BY {c}",
            [self._param("start", lo, kind), self._param("end", hi, kind)],
        )

    def _run_query(self, sql: str) -> pd.DataFrame:
        return self._select(sql)


# ---------------------------------------------------------------------------------------------


UPLOAD_COLUMNS = ("image_id", "image_uri", "uploaded_at")


def uploads_from_table(wh: Warehouse, table: str, start, end) -> pd.DataFrame:
    """The uploads with ``start <= uploaded_at < end``: a frame (image_id, image_uri, uploaded_at).

    Ordered by (uploaded_at, image_id) so that a day's inference always sees the same order.
    """
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
    df = wh.read_range(table, "uploaded_at", start, end, columns=list(UPLOAD_COLUMNS))
    return df.sort_values(["uploaded_at", "image_id"], kind="stable").reset_index(drop=True)
