"""The warehouse interface both engines implement (DuckDB locally, BigQuery in production)."""

from __future__ import annotations

import datetime as dt
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sofar_assets.lib.warehouse.names import check_identifier
from sofar_assets.lib.warehouse.schemas import TableSchema
from sofar_assets.lib.warehouse.types import TIMESTAMP, range_bounds

_TABLE_PLACEHOLDER = re.compile(r"\{table:([^}]*)\}")


class TableNotFoundError(LookupError):
    """The named table does not exist in the warehouse."""


def checkpoint(phase: str) -> None:
    """Called at each phase boundary of a write (e.g. ``"duckdb:deleted"``). Does nothing.

    A test seam: the fault-injection tests replace it in a child process to stop there and
    be killed with SIGKILL, proving that a write killed at any phase leaves the old or the new
    rows, never a mix.
    """


def check_day_files(schema: TableSchema, day: dt.date, files: Sequence[str | os.PathLike]) -> int:
    """Check local Parquet ``files`` hold ``schema``'s columns and only rows of ``day``.

    Reads one column, one row group at a time. Returns the total rows; raises ``ValueError``
    naming the file, the row and the value that is not ``day``.
    """
    column = schema.partition_column
    total = 0
    for f in files:
        pf = pq.ParquetFile(f)
        try:
            schema._check_names(pf.schema_arrow.names)
        except ValueError as exc:
            raise ValueError(f"{f}: {exc}") from None
        offset = 0
        for i in range(pf.num_row_groups):
            values = pf.read_row_group(i, columns=[column]).column(column)
            days = values.cast("date32")  # a DATE column stays as it is; a timestamp gives its day
            bad = pc.invert(pc.fill_null(pc.equal(days, pa.scalar(day, type=pa.date32())), False))
            if pc.any(bad).as_py():
                j = int(np.argmax(bad.to_numpy(zero_copy_only=False)))
                shown = days[j].as_py()
                raise ValueError(
                    f"{f}: row {offset + j} has {column}={'null' if shown is None else shown}, "
                    f"but the file is written as the day {day} of table {schema.name!r}; "
                    "refusing to write the wrong partition"
                )
            offset += len(values)
        total += offset
    return total


class Warehouse(ABC):
    """Named tables: whole-table writes, atomic day replacement, and reads/aggregates in SQL."""

    @abstractmethod
    def fully_qualified(self, table: str) -> str:
        """The engine's quoted, fully-qualified name of ``table`` (what ``{table:NAME}`` expands to)."""

    @abstractmethod
    def quote(self, identifier: str) -> str:
        """Quote a column name for this engine's SQL."""

    @abstractmethod
    def write_table(self, table: str, df: pd.DataFrame, schema: TableSchema | None = None) -> None:
        """Replace the whole table's rows with ``df``, atomically.

        With ``schema`` the columns are converted to its declared types (no dtype inference);
        without, the types are inferred from ``df``. A new column is added to an existing
        table; a removed or retyped column is refused (schema changes are additive).
        """

    @abstractmethod
    def replace_day(self, schema: TableSchema, day: dt.date, files: Sequence[str]) -> int:
        """Atomically replace the ``day`` partition of ``schema.name`` with exactly the rows of
        the Parquet ``files``; return the rows loaded.

        ``files`` are local paths (or ``gs://`` URIs for BigQuery), e.g. written by
        :class:`~sofar_assets.lib.warehouse.spool.ParquetSpool`. No files, or files with no
        rows, leave the day empty. The table is created (day-partitioned on
        ``schema.partition_column``, clustered) when missing, and gains any column the schema
        adds. A row whose partition column is not ``day`` is refused (``ValueError`` naming the
        file and the value) before anything is written.
        """

    @abstractmethod
    def replace_partition(self, table: str, df: pd.DataFrame, partition_column: str, start, end) -> int:
        """Replace the rows with ``start <= partition_column < end`` by ``df``; return rows inserted.

        Every row of ``df`` must fall inside ``[start, end)``; the table is created from ``df``'s
        schema when missing, and an existing table's columns (names, order, types) must match.
        For a day of a declared table prefer :meth:`replace_day`.
        """

    @abstractmethod
    def append_rows(self, schema: TableSchema, df: pd.DataFrame) -> int:
        """Append ``df``'s rows to ``schema.name`` in ONE atomic write (every row or none);
        return the rows appended. Rows already in the table are never touched.

        The rows are converted to the declared types first (a frame that does not fit is
        refused before anything is written). The table is created when missing (day-partitioned
        and clustered as declared) and gains any column the schema adds.
        """

    @abstractmethod
    def append_new(self, schema: TableSchema, df: pd.DataFrame, new_rows: Callable[[str], str]) -> int:
        """Append those rows of ``df`` that ``new_rows`` selects, reading the table and appending
        in ONE statement (no check-then-append gap); return the rows appended.

        ``new_rows(staged)`` is a ``SELECT`` of ``schema``'s columns, in order, from the
        fully-qualified name ``staged`` (``df``'s rows), that leaves out what the table already
        holds (``{table:NAME}`` placeholders allowed). DuckDB runs it in one transaction under the
        file's lock, so two processes appending the same rows store them once. BigQuery runs one
        ``INSERT ... SELECT`` DML statement over a staging table: a re-run adds nothing; two
        statements at the very same moment can each see the other's rows as absent (BigQuery does
        not serialize INSERTs), which readers that take the latest row per key absorb.
        """

    @abstractmethod
    def _in_values(self, values: list[str]) -> tuple[str, list]:
        """SQL for ``IN <list of strings>`` with the list as ONE query parameter, and its parameters."""

    def rows_where_in(
        self, table: str, column: str, values, columns: Sequence[str] | None = None,
        *, within: tuple | None = None, chunk: int = 10_000,
    ) -> pd.DataFrame:
        """The rows whose STRING ``column`` is one of ``values``: a filter in the warehouse, the
        values passed as ONE query parameter per ``chunk`` of them, never spliced into the SQL.
        ``within=(range_column, start, end)`` also keeps ``start <= range_column < end`` (on a
        partition column, BigQuery then reads only those days)."""
        existing = self.table_columns(table)
        selected = self._selected_columns(table, columns, existing)
        self._selected_columns(table, [column], existing)
        cols = ", ".join(self.quote(c) for c in selected)
        where, range_params = "TRUE", []
        if within is not None:
            where, range_params, _ = self._range_where(table, *within)
        base_sql = f"SELECT {cols} FROM {self.fully_qualified(table)} WHERE {where}"
        values = sorted({str(v) for v in values})
        if not values:
            return self._select(f"{base_sql} AND FALSE", range_params)
        frames = []
        for i in range(0, len(values), chunk):
            in_sql, params = self._in_values(values[i:i + chunk])
            frames.append(self._select(f"{base_sql} AND {self.quote(column)} {in_sql}", range_params + params))
        return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]

    @abstractmethod
    def table_columns(self, table: str) -> dict[str, str]:
        """Column name -> logical type, in table order; raise :class:`TableNotFoundError` if absent."""

    @abstractmethod
    def table_exists(self, table: str) -> bool: ...

    @abstractmethod
    def _select(self, sql: str, params: list | None = None) -> pd.DataFrame: ...

    @abstractmethod
    def _bounds(self, lo, hi, kind: str) -> tuple[str, str, list]:
        """SQL placeholders for a range's two bounds, and the engine's parameters for them."""

    @abstractmethod
    def iter_range(
        self, table: str, column: str, start, end, columns: Sequence[str] | None = None, *,
        batch_rows: int = 50_000, order_by: Sequence[str] | None = None,
    ) -> Iterator[pd.DataFrame]:
        """Rows with ``start <= column < end`` as frames of at most ``batch_rows`` rows.

        Memory holds one batch, so a day of a million uploads streams through. Ordered by
        ``order_by`` (default: ``column``), so a re-run sees the same order.
        """

    def _range_where(self, table: str, column: str, start, end) -> tuple[str, list, dict[str, str]]:
        existing = self.table_columns(table)
        if column not in existing:
            raise ValueError(f"table {table!r} has no column {column!r} (columns: {list(existing)})")
        lo, hi = range_bounds(start, end, existing[column])
        lo_sql, hi_sql, params = self._bounds(lo, hi, existing[column])
        c = self.quote(column)
        return f"{c} >= {lo_sql} AND {c} < {hi_sql}", params, existing

    def _range_sql(self, table, column, start, end, columns, order_by) -> tuple[str, list]:
        where, params, existing = self._range_where(table, column, start, end)
        cols = ", ".join(self.quote(c) for c in self._selected_columns(table, columns, existing))
        order = [column] if order_by is None else list(order_by)
        self._selected_columns(table, order, existing)
        order_sql = ", ".join(self.quote(c) for c in order)
        return f"SELECT {cols} FROM {self.fully_qualified(table)} WHERE {where} ORDER BY {order_sql}", params

    def read_table(self, table: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """The whole table (or ``columns`` of it)."""
        cols = ", ".join(self.quote(c) for c in self._selected_columns(table, columns))
        return self._select(f"SELECT {cols} FROM {self.fully_qualified(table)}")

    def read_range(
        self, table: str, column: str, start, end, columns: Sequence[str] | None = None
    ) -> pd.DataFrame:
        """Rows with ``start <= column < end``, ordered by ``column`` (all in memory: for a
        large range use :meth:`iter_range`)."""
        sql, params = self._range_sql(table, column, start, end, columns, None)
        return self._select(sql, params)

    def count_range(self, table: str, column: str, start, end) -> int:
        """``COUNT(*)`` of the rows with ``start <= column < end``, computed in the warehouse."""
        where, params, _ = self._range_where(table, column, start, end)
        n = self._select(f"SELECT COUNT(*) AS n FROM {self.fully_qualified(table)} WHERE {where}", params)
        return int(n["n"].iloc[0])

    def count_by(
        self, table: str, column: str, start, end, by: Sequence[str], *, where_null: Sequence[str] = ()
    ) -> pd.DataFrame:
        """Rows per value of ``by`` with ``start <= column < end``: a ``GROUP BY`` in the warehouse.

        Returns a frame with columns ``[*by, "n"]`` ordered by ``by``. ``where_null=("error",)``
        counts only rows whose ``error`` is NULL.
        """
        if isinstance(by, str) or isinstance(where_null, str):
            raise TypeError("by and where_null are lists of column names, not a string")
        where, params, existing = self._range_where(table, column, start, end)
        self._selected_columns(table, [*by, *where_null], existing)
        for c in where_null:
            where += f" AND {self.quote(c)} IS NULL"
        n = self.quote("n")
        if not by:
            return self._select(f"SELECT COUNT(*) AS {n} FROM {self.fully_qualified(table)} WHERE {where}", params)
        keys = ", ".join(self.quote(c) for c in by)
        return self._select(
            f"SELECT {keys}, COUNT(*) AS {n} FROM {self.fully_qualified(table)} WHERE {where} "
            f"GROUP BY {keys} ORDER BY {keys}",
            params,
        )

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

    def _selected_columns(
        self, table: str, columns: Sequence[str] | None, existing: dict[str, str] | None = None
    ) -> dict[str, str]:
        existing = self.table_columns(table) if existing is None else existing
        if columns is None:
            return existing
        if isinstance(columns, str):
            raise TypeError("columns must be a list of names, not a string")
        for c in columns:
            if c not in existing:
                raise ValueError(f"table {table!r} has no column {c!r} (columns: {list(existing)})")
        return {c: existing[c] for c in columns}


def evolve(table: str, existing: dict[str, str], declared: dict[str, str]) -> dict[str, str]:
    """The columns ``declared`` adds to an ``existing`` table (schema changes are additive).

    A column the table has but the declaration lacks, or declares with another type, raises
    ``ValueError`` naming the table and the column: dropping or retyping a column is a
    migration done by hand, never silently by a write.
    """
    for column, have in existing.items():
        want = declared.get(column)
        if want is None:
            raise ValueError(
                f"table {table!r}: column {column!r} ({have}) is in the warehouse but not in the rows "
                f"being written (columns {list(declared)}); schema changes are additive: a column "
                "is never dropped by a write (drop it by hand if that is intended)"
            )
        if want != have:
            raise ValueError(
                f"table {table!r}: column {column!r} is {have} in the warehouse but the rows declare "
                f"{want}; schema changes are additive: retype it by hand (or write a new column)"
            )
    return {c: t for c, t in declared.items() if c not in existing}
