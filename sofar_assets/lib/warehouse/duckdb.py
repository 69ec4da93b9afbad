"""The local warehouse: tables in one DuckDB file."""

from __future__ import annotations

import contextlib
import datetime as dt
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sofar_assets.lib.data.storage import is_gcs
from sofar_assets.lib.warehouse import base
from sofar_assets.lib.warehouse.base import TableNotFoundError, Warehouse, check_day_files, evolve
from sofar_assets.lib.warehouse.names import check_identifier
from sofar_assets.lib.warehouse.schemas import TableSchema, day_of
from sofar_assets.lib.warehouse.types import (
    BOOL,
    DATE,
    DUCKDB_TO_LOGICAL,
    FLOAT64,
    INT64,
    STRING,
    TIMESTAMP,
    arrow_to_pandas,
    create_types,
    frame_types,
    prepare_partition,
    to_arrow,
)

DUCKDB_TYPES = {DATE: "DATE", TIMESTAMP: "TIMESTAMP", STRING: "VARCHAR", FLOAT64: "DOUBLE", INT64: "BIGINT", BOOL: "BOOLEAN"}


def _sql_string(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


class DuckDBWarehouse(Warehouse):
    """Tables in schema ``schema`` of the DuckDB file ``path``.

    Each call opens and closes its own connection, so between calls other processes (the
    Dagster UI, a notebook, another run's day) can open the file; a call that finds the file
    locked by another process retries for up to ``lock_timeout_s``. Every write is one DuckDB
    transaction: a write killed half-way leaves the table as it was.
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
        return {name: DUCKDB_TO_LOGICAL.get(str(t).upper(), str(t).upper()) for name, t in rows}

    def table_columns(self, table: str) -> dict[str, str]:
        with self._connect() as con:
            columns = self._columns(con, table)
        if columns is None:
            raise TableNotFoundError(f"table {table!r} does not exist in {self!r}")
        return columns

    def table_exists(self, table: str) -> bool:
        with self._connect() as con:
            return self._columns(con, table) is not None

    def _ensure_table(self, con, table: str, types: dict[str, str]) -> dict[str, str] | None:
        """Inside the caller's transaction: create ``table`` with ``types`` or add the columns
        ``types`` adds (a removed or retyped column raises). Returns the columns it had."""
        fq = self.fully_qualified(table)
        existing = self._columns(con, table)
        if existing is None:
            con.execute(self._schema_sql())
            cols = ", ".join(f"{self.quote(c)} {DUCKDB_TYPES[t]}" for c, t in types.items())
            con.execute(f"CREATE TABLE {fq} ({cols})")
        else:
            for c, t in evolve(table, existing, types).items():
                con.execute(f"ALTER TABLE {fq} ADD COLUMN {self.quote(c)} {DUCKDB_TYPES[t]}")
        return existing

    @contextlib.contextmanager
    def _transaction(self):
        with self._connect() as con:
            con.execute("SET TimeZone = 'UTC'")  # TIMESTAMPTZ (staged Parquet) -> naive UTC TIMESTAMP
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(Exception):  # keep the original error if COMMIT itself failed
                    con.execute("ROLLBACK")
                raise

    def write_table(self, table: str, df: pd.DataFrame, schema: TableSchema | None = None) -> None:
        if schema is not None:
            data, types = schema.to_arrow(df), dict(schema.columns)
        else:
            inferred = frame_types(df)
            existing = self.table_columns(table) if self.table_exists(table) else {}
            types = create_types({c: t or existing.get(c) for c, t in inferred.items()})
            data = to_arrow(df, types)
        fq = self.fully_qualified(table)
        with self._transaction() as con:
            had = self._ensure_table(con, table, types)
            if had is not None:
                con.execute(f"DELETE FROM {fq}")
            con.register("_sofar_frame", data)
            cols = ", ".join(self.quote(c) for c in types)
            con.execute(f"INSERT INTO {fq} ({cols}) SELECT {cols} FROM _sofar_frame")

    def replace_day(self, schema: TableSchema, day: dt.date, files: Sequence[str]) -> int:
        """One transaction: create/extend the table, ``DELETE`` the day, ``INSERT`` the files'
        rows (``read_parquet``, cast to the table's types), ``COMMIT``."""
        day = day_of(day)
        if schema.partition_column is None:
            raise ValueError(f"table {schema.name!r} has no partition_column: replace_day needs one")
        files = [str(f) for f in files]
        remote = [f for f in files if is_gcs(f)]
        if remote:
            raise ValueError(f"DuckDBWarehouse reads local Parquet files, not {remote[0]}")
        expected = check_day_files(schema, day, files)
        fq = self.fully_qualified(schema.name)
        c = self.quote(schema.partition_column)
        with self._transaction() as con:
            self._ensure_table(con, schema.name, dict(schema.columns))
            base.checkpoint("duckdb:begun")
            con.execute(f"DELETE FROM {fq} WHERE {c} = ?", [day])
            base.checkpoint("duckdb:deleted")
            inserted = 0
            if files:
                cols = ", ".join(self.quote(n) for n in schema.columns)
                casts = ", ".join(
                    f"CAST({self.quote(n)} AS {DUCKDB_TYPES[t]})" for n, t in schema.columns.items()
                )
                sources = "[" + ", ".join(_sql_string(f) for f in files) + "]"
                inserted = con.execute(
                    f"INSERT INTO {fq} ({cols}) SELECT {casts} FROM read_parquet({sources})"
                ).fetchone()[0]
            base.checkpoint("duckdb:inserted")
            if inserted != expected:  # the files changed between the check and the load
                raise RuntimeError(f"{schema.name} {day}: loaded {inserted} rows, the files held {expected}")
        base.checkpoint("duckdb:committed")
        return int(inserted)

    def append_rows(self, schema: TableSchema, df: pd.DataFrame) -> int:
        """One transaction: create/extend the table, ``INSERT`` the rows, ``COMMIT``."""
        cols = ", ".join(self.quote(c) for c in schema.columns)
        return self.append_new(schema, df, lambda frame: f"SELECT {cols} FROM {frame}")

    def append_new(self, schema: TableSchema, df: pd.DataFrame, new_rows) -> int:
        """One transaction under the file's lock: create/extend the table, ``INSERT`` what
        ``new_rows`` selects from the frame, ``COMMIT``."""
        data = schema.to_arrow(df)
        fq = self.fully_qualified(schema.name)
        with self._transaction() as con:
            self._ensure_table(con, schema.name, dict(schema.columns))
            con.register("_sofar_frame", data)
            cols = ", ".join(self.quote(c) for c in schema.columns)
            inserted = con.execute(f"INSERT INTO {fq} ({cols}) {self.expand(new_rows('_sofar_frame'))}").fetchone()[0]
        return int(inserted)

    def _in_values(self, values: list[str]) -> tuple[str, list]:
        return "IN (SELECT unnest(CAST(? AS VARCHAR[])))", [list(values)]

    def replace_partition(self, table: str, df: pd.DataFrame, partition_column: str, start, end) -> int:
        fq = self.fully_qualified(table)
        with self._transaction() as con:
            table_types = self._columns(con, table)
            data, types, lo, hi = prepare_partition(table, df, partition_column, start, end, table_types)
            con.register("_sofar_frame", data)
            if table_types is None:
                con.execute(self._schema_sql())
                con.execute(f"CREATE TABLE {fq} AS SELECT * FROM _sofar_frame")
            else:
                c = self.quote(partition_column)
                con.execute(f"DELETE FROM {fq} WHERE {c} >= ? AND {c} < ?", [lo, hi])
                cols = ", ".join(self.quote(n) for n in types)
                con.execute(f"INSERT INTO {fq} ({cols}) SELECT {cols} FROM _sofar_frame")
        return data.num_rows

    def _bounds(self, lo, hi, kind: str) -> tuple[str, str, list]:
        return "?", "?", [lo, hi]

    def _select(self, sql: str, params: list | None = None) -> pd.DataFrame:
        with self._connect() as con:
            rel = con.sql(sql, params=params)
            return pd.DataFrame() if rel is None else arrow_to_pandas(rel.to_arrow_table())

    def iter_range(self, table, column, start, end, columns=None, *, batch_rows=50_000, order_by=None):
        """Batches of the range. The query's result is first written (streamed) to a temporary
        Parquet file and the connection closed, so a consumer that takes minutes per batch
        (inference) never holds the file's lock against other processes' writes."""
        if batch_rows < 1:
            raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
        sql, params = self._range_sql(table, column, start, end, columns, order_by)
        return self._iter(sql, params, batch_rows)

    def _iter(self, sql: str, params: list, batch_rows: int) -> Iterator[pd.DataFrame]:
        with tempfile.TemporaryDirectory(prefix="sofar-range-") as tmp:
            path = str(Path(tmp) / "range.parquet")
            with self._connect() as con:
                con.sql(sql, params=params).write_parquet(path, row_group_size=batch_rows)
            for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
                if batch.num_rows:
                    yield arrow_to_pandas(pa.Table.from_batches([batch]))

    def _run_query(self, sql: str) -> pd.DataFrame:
        return self._select(sql)
