"""Bounded-memory staging of rows on local disk, as Parquet files a warehouse loads in one go.

A day of predictions is produced batch by batch; :class:`ParquetSpool` appends each batch as
one row group, so memory holds one batch, not the day. The file is what
:meth:`~sofar_assets.lib.warehouse.base.Warehouse.replace_day` loads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sofar_assets.lib.warehouse.schemas import TableSchema


def file_schema(schema: TableSchema) -> pa.Schema:
    """The Parquet schema of staged files: TIMESTAMP columns are marked UTC-adjusted, which is
    what makes BigQuery load them as TIMESTAMP (not DATETIME); the values are the same."""
    return pa.schema(
        [pa.field(f.name, pa.timestamp("us", tz="UTC")) if pa.types.is_timestamp(f.type) else f
         for f in schema.arrow_schema()]
    )


def _for_file(table: pa.Table, target: pa.Schema) -> pa.Table:
    return table.cast(target) if table.schema != target else table


class ParquetSpool:
    """Rows of one table appended to a local Parquet file, one row group per :meth:`append`.

    Used as a context manager, an exception inside the block removes the partial file, so a
    failed batch never leaves a file that looks complete.
    """

    def __init__(self, schema: TableSchema, path: str | os.PathLike):
        self.schema = schema
        self.path = Path(path)
        self.rows = 0
        self._target = file_schema(schema)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(self.path, self._target)
        self._closed = False

    def __repr__(self) -> str:
        return f"ParquetSpool({self.schema.name!r}, {str(self.path)!r}, rows={self.rows})"

    def append(self, rows: pd.DataFrame | pa.Table) -> None:
        """Convert ``rows`` through the declared schema and write them as one row group."""
        if self._closed:
            raise ValueError(f"{self!r} is closed")
        data = self.schema.to_arrow(rows)
        if data.num_rows == 0:
            return
        self._writer.write_table(_for_file(data, self._target), row_group_size=data.num_rows)
        self.rows += data.num_rows

    def close(self) -> int:
        """Finish the file and return the rows written; calling it again changes nothing."""
        if not self._closed:
            self._closed = True
            self._writer.close()
            self._writer = None
        return self.rows

    def discard(self) -> None:
        """Close and remove the file (what an exception inside the ``with`` block does)."""
        if not self._closed:
            self._closed = True
            try:
                self._writer.close()
            finally:
                self._writer = None
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> ParquetSpool:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()


def write_parquet(schema: TableSchema, rows: pd.DataFrame | pa.Table, path: str | os.PathLike) -> int:
    """One frame as a staged Parquet file (one spool, one append); returns the rows written."""
    with ParquetSpool(schema, path) as spool:
        spool.append(rows)
    return spool.rows


def merge_parquet(schema: TableSchema, files: Sequence[str | os.PathLike], path: str | os.PathLike) -> int:
    """Concatenate local Parquet ``files`` into one file at ``path``, one row group at a time
    (bounded memory); each row group is converted through the declared schema."""
    with ParquetSpool(schema, path) as spool:
        for f in files:
            pf = pq.ParquetFile(f)
            for i in range(pf.num_row_groups):
                spool.append(pf.read_row_group(i))
    return spool.rows
