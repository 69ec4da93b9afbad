"""The production warehouse: tables in one BigQuery dataset.

Writes, production (``partition_decorator=True``, the default):

- :meth:`BigQueryWarehouse.replace_day` is ONE load job into the partition ``table$YYYYMMDD``
  with ``WRITE_TRUNCATE``: BigQuery swaps the day's rows atomically, no DML, so runs writing
  different days never conflict, and a re-run replaces its day. The job also declares the
  table's day partitioning and clustering and ``ALLOW_FIELD_ADDITION`` (a new declared column is
  added, nothing is ever dropped).
- :meth:`BigQueryWarehouse.write_table` is ONE ``WRITE_TRUNCATE`` load job of the whole table.
- Tables are created once (day-partitioned on the partition column, clustered, no partition
  expiration). The dataset is never created by a run: it must exist
  (:meth:`BigQueryWarehouse.ensure_dataset` is for tests and the local stack).

Emulator only (``partition_decorator=False``): the BigQuery emulator rejects partition
decorators, so a day is loaded into a staging table ``_sofar_staging_<table>_<YYYYMMDD>_<hex>``
(1-hour expiration), then moved by ONE ``BEGIN TRANSACTION; DELETE day; INSERT; COMMIT``
script, and the staging table dropped. Each such write first drops staging leftovers older
than the expiration (what a killed write leaves behind).
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import requests

from sofar_assets.lib.data import storage
from sofar_assets.lib.data.storage import is_gcs
from sofar_assets.lib.warehouse import base
from sofar_assets.lib.warehouse.base import TableNotFoundError, Warehouse, check_day_files, evolve
from sofar_assets.lib.warehouse.names import check_dataset, check_identifier, check_project
from sofar_assets.lib.warehouse.schemas import TableSchema, day_of
from sofar_assets.lib.warehouse.spool import file_schema, merge_parquet, write_parquet
from sofar_assets.lib.warehouse.types import (
    BIGQUERY_TO_LOGICAL,
    DATE,
    TIMESTAMP,
    arrow_to_pandas,
    create_types,
    frame_types,
    prepare_partition,
    to_arrow,
)

STAGING_PREFIX = "_sofar_staging_"
METADATA_TTL_S = 300.0
"""How long an instance trusts the table metadata it fetched (a run's steps take one ``get_table``
per table; a long-lived review page sees another process's new table or column within minutes)."""


class DatasetNotFoundError(LookupError):
    """The BigQuery dataset does not exist (runs never create it)."""


class EmulatorHttp(requests.Session):
    """HTTP session for a BigQuery emulator endpoint (never for Google's API).

    Load-job uploads declare their media part as ``*/*`` (the client's generic content type);
    the emulator only accepts concrete media types, so the multipart media header and the
    resumable ``X-Upload-Content-Type`` become ``application/octet-stream``.
    """

    _GENERIC = b"\r\ncontent-type: */*\r\n"
    _OCTET = b"\r\ncontent-type: application/octet-stream\r\n"

    def request(self, method, url, data=None, headers=None, **kwargs):
        if "/upload/" in url:
            # The JSON part comes first and json.dumps never emits a raw CRLF, so the first
            # match is the media part's header.
            if isinstance(data, bytes):
                data = data.replace(self._GENERIC, self._OCTET, 1)
            if headers and headers.get("x-upload-content-type") == "*/*":
                headers = {**headers, "x-upload-content-type": "application/octet-stream"}
        return super().request(method, url, data=data, headers=headers, **kwargs)


def emulator_client(project: str, api_endpoint: str, location: str | None = None, http=None):
    """A BigQuery client for an emulator at ``api_endpoint`` (anonymous credentials)."""
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery

    return bigquery.Client(
        project=project,
        location=location,
        credentials=AnonymousCredentials(),
        client_options=ClientOptions(api_endpoint=api_endpoint),
        _http=http or EmulatorHttp(),
    )


def _bq_literal(value, kind: str) -> str:
    if kind == DATE:
        return f"DATE '{value.isoformat()}'"
    return f"TIMESTAMP '{value.isoformat(sep=' ')}+00:00'"



def _download(uri: str, folder: str, index: int) -> str:
    """A local copy of a gs:// object (streamed to disk, not into memory)."""
    bucket, _, key = uri[len("gs://"):].partition("/")
    path = str(Path(folder) / f"download-{index}.parquet")
    storage.gcs_client().bucket(bucket).blob(key).download_to_filename(path)
    return path

class BigQueryWarehouse(Warehouse):
    """Tables in the BigQuery dataset ``project.dataset`` (see the module docstring).

    ``partition_decorator=True`` is production; ``False`` is the emulator-only fallback.
    """

    def __init__(
        self, project: str, dataset: str, location: str | None = None, client=None, *,
        partition_decorator: bool = True, staging_ttl: dt.timedelta = dt.timedelta(hours=1),
    ):
        self.project = check_project(project)
        self.dataset = check_dataset(dataset)
        self.location = location
        self.partition_decorator = partition_decorator
        self.staging_ttl = staging_ttl
        self._client = client
        self._dataset_checked = False
        # table metadata, fetched ONCE per instance and kept for METADATA_TTL_S (None: absent): kept
        # current by this instance's own creates, schema updates and loads, dropped after any
        # statement that is not a read; the TTL lets a long-lived instance (the review page) see
        # what other processes create or add
        self._tables: dict[str, tuple[float, object | None]] = {}

    def __repr__(self) -> str:
        return f"BigQueryWarehouse({self.project!r}, {self.dataset!r})"

    @property
    def client(self):
        if self._client is None:
            from google.cloud import bigquery

            self._client = bigquery.Client(project=self.project, location=self.location)
        return self._client

    # -- names ------------------------------------------------------------------------
    def quote(self, identifier: str) -> str:
        return "`" + check_identifier(identifier, "column name") + "`"

    def _ref(self, table: str) -> str:
        return f"{self.project}.{self.dataset}.{check_identifier(table, 'table name')}"

    def fully_qualified(self, table: str) -> str:
        return f"`{self._ref(table)}`"  # project, dataset and table are validated: no backtick inside

    # -- dataset ----------------------------------------------------------------------
    def ensure_dataset(self) -> None:
        """Create the dataset if missing. For tests and the local stack's setup only: runs
        never create datasets (location, ACLs and expiry are decided once, by an admin)."""
        from google.cloud import bigquery

        ds = bigquery.Dataset(f"{self.project}.{self.dataset}")
        if self.location:
            ds.location = self.location
        self.client.create_dataset(ds, exists_ok=True)
        self._dataset_checked = True

    def _require_dataset(self) -> None:
        if self._dataset_checked:
            return
        from google.api_core.exceptions import NotFound

        try:
            self.client.get_dataset(f"{self.project}.{self.dataset}")
        except NotFound:
            loc = f"--location={self.location} " if self.location else ""
            raise DatasetNotFoundError(
                f"BigQuery dataset {self.project}.{self.dataset} does not exist; runs never create it. "
                f"Create it once: bq {loc}mk --dataset {self.project}:{self.dataset}"
            ) from None
        self._dataset_checked = True

    # -- tables -----------------------------------------------------------------------
    def _get_table(self, table: str):
        from google.api_core.exceptions import NotFound

        cached = self._tables.get(table)
        if cached is not None and time.monotonic() - cached[0] < METADATA_TTL_S:
            return cached[1]
        try:
            found = self.client.get_table(self._ref(table))
        except NotFound:
            found = None
        self._remember(table, found)
        return found

    def _remember(self, table: str, metadata) -> None:
        self._tables[table] = (time.monotonic(), metadata)

    @staticmethod
    def _types_of(t) -> dict[str, str]:
        return {f.name: BIGQUERY_TO_LOGICAL.get(f.field_type.upper(), f.field_type.upper()) for f in t.schema}

    def table_columns(self, table: str) -> dict[str, str]:
        t = self._get_table(table)
        if t is None:
            raise TableNotFoundError(f"table {table!r} does not exist in {self!r}")
        return self._types_of(t)

    def table_exists(self, table: str) -> bool:
        return self._get_table(table) is not None

    @staticmethod
    def _fields(types: dict[str, str]):
        from google.cloud import bigquery

        return [bigquery.SchemaField(name, t, mode="NULLABLE") for name, t in types.items()]

    @staticmethod
    def _day_partitioning(column: str):
        from google.cloud import bigquery

        # no expiration_ms: days are kept until someone decides otherwise
        return bigquery.TimePartitioning(type_=bigquery.TimePartitioningType.DAY, field=column)

    def _create_table(self, table: str, types: dict[str, str], partition_column: str | None,
                      clustering: Sequence[str] = ()) -> None:
        from google.cloud import bigquery

        self._require_dataset()
        t = bigquery.Table(self._ref(table), schema=self._fields(types))
        if partition_column is not None:
            t.time_partitioning = self._day_partitioning(partition_column)
        if clustering:
            t.clustering_fields = list(clustering)
        # a concurrent run may have created it: then that table's metadata is fetched when next needed
        created = self.client.create_table(t, exists_ok=True)
        if created is not None and getattr(created, "schema", None):
            self._remember(table, created)
        else:
            self._tables.pop(table, None)

    def _prepare_table(self, table: str, types: dict[str, str], partition_column: str | None = None,
                       clustering: Sequence[str] = (), *, add_columns: bool) -> dict[str, str]:
        """Create ``table`` if missing; else check the change is additive and return the added
        columns (added to the table here when ``add_columns``)."""
        existing = self._get_table(table)
        if existing is None:
            self._create_table(table, types, partition_column, clustering)
            return {}
        added = evolve(table, self._types_of(existing), types)
        if added and add_columns:
            existing.schema = [*existing.schema, *self._fields(added)]
            self._remember(table, self.client.update_table(existing, ["schema"]))
        return added

    # -- loads ------------------------------------------------------------------------
    def _load_files(self, files: Sequence[str], destination: str, job_config) -> int:
        """ONE load job: ``gs://`` URIs in one ``load_table_from_uri``, or one local file."""
        if files and all(is_gcs(f) for f in files):
            job = self.client.load_table_from_uri(list(files), destination, job_config=job_config,
                                                  location=self.location)
            job.result()
            return int(job.output_rows or 0)
        (path,) = files
        with open(path, "rb") as fh:
            job = self.client.load_table_from_file(fh, destination, job_config=job_config,
                                                   location=self.location)
            job.result()
        return int(job.output_rows) if job.output_rows is not None else pq.ParquetFile(path).metadata.num_rows

    def _one_local_file(self, schema: TableSchema, files: list[str], tmp: str) -> str:
        """The day's rows as ONE local Parquet file in the staged layout (no copy when the
        single file already is one; several files are merged row group by row group)."""
        if len(files) == 1 and pq.ParquetFile(files[0]).schema_arrow == file_schema(schema):
            return files[0]
        merged = str(Path(tmp) / f"{schema.name}.parquet")
        merge_parquet(schema, files, merged)
        return merged

    def replace_day(self, schema: TableSchema, day: dt.date, files: Sequence[str]) -> int:
        """Production: one ``WRITE_TRUNCATE`` load job into ``table$YYYYMMDD``. Emulator
        (``partition_decorator=False``): staging table + one transaction script."""
        from google.cloud import bigquery

        day = day_of(day)
        if schema.partition_column is None:
            raise ValueError(f"table {schema.name!r} has no partition_column: replace_day needs one")
        files = [os.fspath(f) for f in files]
        remote = [f for f in files if is_gcs(f)]
        if remote and len(remote) != len(files):
            raise ValueError("replace_day: give local files or gs:// URIs, not both")
        with tempfile.TemporaryDirectory(prefix="sofar-day-") as tmp:
            if remote and not self.partition_decorator:
                # Emulator only: it cannot read gs:// (a load job from URIs needs real GCS), so
                # its staged write loads local copies of the files.
                files, remote = [_download(uri, tmp, i) for i, uri in enumerate(remote)], []
            if not remote:
                check_day_files(schema, day, files)
                files = [self._one_local_file(schema, files, tmp) if files else self._empty_file(schema, tmp)]
            # gs:// files are not read here: BigQuery itself refuses rows outside the decorated day
            if not self.partition_decorator:
                return self._replace_day_staged(schema, day, files)
            added = self._prepare_table(schema.name, dict(schema.columns), schema.partition_column,
                                        schema.clustering, add_columns=False)
            config = bigquery.LoadJobConfig(
                source_format=bigquery.SourceFormat.PARQUET,
                schema=self._fields(schema.columns),
                write_disposition=bigquery.WriteDisposition.WRITE_TRUNCATE,
                time_partitioning=self._day_partitioning(schema.partition_column),
                clustering_fields=list(schema.clustering) or None,
                schema_update_options=[bigquery.SchemaUpdateOption.ALLOW_FIELD_ADDITION],
            )
            rows = self._load_files(files, f"{self._ref(schema.name)}${day:%Y%m%d}", config)
            if added:  # the load added columns (ALLOW_FIELD_ADDITION): fetch the new schema when needed
                self._tables.pop(schema.name, None)
        base.checkpoint("bigquery:loaded")
        return rows

    @staticmethod
    def _empty_file(schema: TableSchema, tmp: str) -> str:
        path = str(Path(tmp) / f"{schema.name}-empty.parquet")
        write_parquet(schema, schema.arrow_schema().empty_table(), path)
        return path

    def drop_stale_staging(self) -> list[str]:
        """Drop ``_sofar_staging_*`` tables older than ``staging_ttl`` (a killed write's
        leftovers; a running write's staging table is younger). Returns the dropped names."""
        now = dt.datetime.now(dt.UTC)
        dropped = []
        for t in self.client.list_tables(f"{self.project}.{self.dataset}"):
            if t.table_id.startswith(STAGING_PREFIX) and t.created is not None and now - t.created >= self.staging_ttl:
                self.client.delete_table(self._ref(t.table_id), not_found_ok=True)
                dropped.append(t.table_id)
        return dropped

    def _replace_day_staged(self, schema: TableSchema, day: dt.date, files: list[str]) -> int:
        """Emulator only: staging table, then ONE ``BEGIN; DELETE day; INSERT; COMMIT`` script."""
        from google.cloud import bigquery

        self._prepare_table(schema.name, dict(schema.columns), schema.partition_column,
                            schema.clustering, add_columns=True)
        self.drop_stale_staging()
        staging = f"{STAGING_PREFIX}{schema.name}_{day:%Y%m%d}_{uuid.uuid4().hex[:12]}"
        stage = bigquery.Table(self._ref(staging), schema=self._fields(schema.columns))
        stage.expires = dt.datetime.now(dt.UTC) + self.staging_ttl
        self.client.create_table(stage)
        try:
            config = bigquery.LoadJobConfig(
                source_format=bigquery.SourceFormat.PARQUET,
                schema=self._fields(schema.columns),
                write_disposition=bigquery.WriteDisposition.WRITE_TRUNCATE,
            )
            rows = self._load_files(files, self._ref(staging), config)
            base.checkpoint("bigquery:staged")
            c = self.quote(schema.partition_column)
            cols = ", ".join(self.quote(n) for n in schema.columns)
            target = self.fully_qualified(schema.name)
            script = (
                "BEGIN TRANSACTION;\n"
                f"DELETE FROM {target} WHERE {c} = {_bq_literal(day, DATE)};\n"
                f"INSERT INTO {target} ({cols}) SELECT {cols} FROM {self.fully_qualified(staging)};\n"
                "COMMIT TRANSACTION;"
            )
            job = self.client.query(script, location=self.location)
            base.checkpoint("bigquery:script_sent")
            job.result()
        finally:
            self.client.delete_table(self._ref(staging), not_found_ok=True)
        base.checkpoint("bigquery:committed")
        return rows

    def _load_frame(self, data: pa.Table, destination: str, types: dict[str, str], job_config) -> None:
        with tempfile.TemporaryDirectory(prefix="sofar-table-") as tmp:
            path = str(Path(tmp) / "rows.parquet")
            schema = TableSchema("rows", dict(types))
            write_parquet(schema, data, path)
            self._load_files([path], destination, job_config)

    def write_table(self, table: str, df: pd.DataFrame, schema: TableSchema | None = None) -> None:
        """ONE ``WRITE_TRUNCATE`` load job of the whole table (atomic for readers).

        A new column is added to the table first (an additive schema update); BigQuery accepts
        ``ALLOW_FIELD_ADDITION`` only on appends and partition loads, and a whole-table
        ``WRITE_TRUNCATE`` takes the load's schema, which here always keeps every column.
        """
        from google.cloud import bigquery

        if schema is not None:
            data, types = schema.to_arrow(df), dict(schema.columns)
            partition_column, clustering = schema.partition_column, schema.clustering
        else:
            inferred = frame_types(df)
            existing = self.table_columns(table) if self.table_exists(table) else {}
            types = create_types({c: t or existing.get(c) for c, t in inferred.items()})
            data = to_arrow(df, types)
            partition_column, clustering = None, ()
        self._prepare_table(table, types, partition_column, clustering, add_columns=True)
        config = bigquery.LoadJobConfig(
            source_format=bigquery.SourceFormat.PARQUET,
            schema=self._fields(types),
            write_disposition=bigquery.WriteDisposition.WRITE_TRUNCATE,
        )
        if partition_column is not None:
            config.time_partitioning = self._day_partitioning(partition_column)
            config.clustering_fields = list(clustering) or None
        self._load_frame(data, self._ref(table), types, config)
        self._tables.pop(table, None)  # the truncating load took the frame's schema

    def append_rows(self, schema: TableSchema, df: pd.DataFrame) -> int:
        """ONE ``WRITE_APPEND`` load job (a load job is atomic: every row lands or none; no DML,
        so appends never conflict with each other or with a day's partition load)."""
        from google.cloud import bigquery

        data, types = schema.to_arrow(df), dict(schema.columns)
        self._prepare_table(schema.name, types, schema.partition_column, schema.clustering, add_columns=True)
        config = bigquery.LoadJobConfig(
            source_format=bigquery.SourceFormat.PARQUET,
            schema=self._fields(types),
            write_disposition=bigquery.WriteDisposition.WRITE_APPEND,
        )
        if schema.partition_column is not None:
            config.time_partitioning = self._day_partitioning(schema.partition_column)
            config.clustering_fields = list(schema.clustering) or None
        if data.num_rows:
            self._load_frame(data, self._ref(schema.name), types, config)
        return data.num_rows

    def append_new(self, schema: TableSchema, df: pd.DataFrame, new_rows) -> int:
        """A staging table loaded with the rows, then ONE ``INSERT ... SELECT`` DML statement (the
        read of what the table holds and the append are one atomic statement)."""
        from google.cloud import bigquery

        data, types = schema.to_arrow(df), dict(schema.columns)
        self._prepare_table(schema.name, types, schema.partition_column, schema.clustering, add_columns=True)
        if not data.num_rows:
            return 0
        staging = f"{STAGING_PREFIX}{schema.name}_append_{uuid.uuid4().hex[:12]}"
        stage = bigquery.Table(self._ref(staging), schema=self._fields(types))
        stage.expires = dt.datetime.now(dt.UTC) + self.staging_ttl
        self.client.create_table(stage)
        try:
            config = bigquery.LoadJobConfig(source_format=bigquery.SourceFormat.PARQUET, schema=self._fields(types),
                                            write_disposition=bigquery.WriteDisposition.WRITE_TRUNCATE)
            self._load_frame(data, self._ref(staging), types, config)
            cols = ", ".join(self.quote(n) for n in schema.columns)
            sql = (f"INSERT INTO {self.fully_qualified(schema.name)} ({cols}) "
                   f"{self.expand(new_rows(self.fully_qualified(staging)))}")
            job = self.client.query(sql, location=self.location)
            job.result()
        finally:
            self.client.delete_table(self._ref(staging), not_found_ok=True)
        return int(job.num_dml_affected_rows or 0)

    def _in_values(self, values: list[str]) -> tuple[str, list]:
        from google.cloud import bigquery

        return "IN UNNEST(@values)", [bigquery.ArrayQueryParameter("values", "STRING", list(values))]

    def replace_partition(self, table: str, df: pd.DataFrame, partition_column: str, start, end) -> int:
        """A frame over any ``[start, end)`` range: staging table + one DML transaction script.
        For a day of a declared table, :meth:`replace_day` is the production path."""
        from google.cloud import bigquery

        existing = self._get_table(table)
        table_types = None if existing is None else self._types_of(existing)
        data, types, lo, hi = prepare_partition(table, df, partition_column, start, end, table_types)
        if existing is None:
            self._create_table(table, types, partition_column)
        kind = types[partition_column]
        staging = f"{STAGING_PREFIX}{table}_{lo:%Y%m%d}_{uuid.uuid4().hex[:12]}"
        stage = bigquery.Table(self._ref(staging), schema=self._fields(types))
        stage.expires = dt.datetime.now(dt.UTC) + self.staging_ttl
        self.client.create_table(stage)
        try:
            config = bigquery.LoadJobConfig(
                source_format=bigquery.SourceFormat.PARQUET, schema=self._fields(types),
                write_disposition=bigquery.WriteDisposition.WRITE_TRUNCATE,
            )
            self._load_frame(data, self._ref(staging), types, config)
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

    # -- reads ------------------------------------------------------------------------
    def _param(self, name: str, value, kind: str):
        from google.cloud import bigquery

        if kind == TIMESTAMP:
            value = value.replace(tzinfo=dt.UTC)
        return bigquery.ScalarQueryParameter(name, kind, value)

    def _bounds(self, lo, hi, kind: str) -> tuple[str, str, list]:
        return "@start", "@end", [self._param("start", lo, kind), self._param("end", hi, kind)]

    def _rows(self, sql: str, params: list | None, page_size: int | None = None):
        from google.cloud import bigquery

        config = bigquery.QueryJobConfig(query_parameters=params or [])
        return self.client.query(sql, job_config=config, location=self.location).result(page_size=page_size)

    def _select(self, sql: str, params: list | None = None) -> pd.DataFrame:
        # The REST path: the Storage API client is optional, and large reads use iter_range
        return arrow_to_pandas(self._rows(sql, params).to_arrow(create_bqstorage_client=False))

    def iter_range(self, table, column, start, end, columns=None, *, batch_rows=50_000, order_by=None):
        """Pages of ``batch_rows`` rows of one query's result (REST pages)."""
        if batch_rows < 1:
            raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
        sql, params = self._range_sql(table, column, start, end, columns, order_by)
        return self._iter(sql, params, batch_rows)

    def _iter(self, sql: str, params: list, batch_rows: int) -> Iterator[pd.DataFrame]:
        for batch in self._rows(sql, params, page_size=batch_rows).to_arrow_iterable():
            if batch.num_rows:
                yield arrow_to_pandas(pa.Table.from_batches([batch]))

    def _run_query(self, sql: str) -> pd.DataFrame:
        if not sql.lstrip().upper().startswith(("SELECT", "WITH")):
            self._tables.clear()  # DDL or DML may have created, altered or dropped a table
        return self._select(sql)
