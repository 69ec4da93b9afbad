"""Tables in DuckDB (local) or BigQuery (production) behind one small interface.

- :mod:`.types`: logical column types and the one frame <-> Arrow conversion;
- :mod:`.schemas`: declared table schemas (:class:`TableSchema`, ...);
- :mod:`.predictions`: the prediction table (:data:`PREDICTIONS`): its columns and how a row is made;
- :mod:`.spool`: bounded-memory staging of rows as local Parquet (:class:`ParquetSpool`);
- :mod:`.base`: the :class:`Warehouse` interface; :mod:`.duckdb` and :mod:`.bigquery` its engines;
- :mod:`.uploads`: reading the uploads table.
"""

from sofar_assets.lib.warehouse.base import TableNotFoundError, Warehouse, check_day_files, evolve
from sofar_assets.lib.warehouse.bigquery import STAGING_PREFIX, BigQueryWarehouse, DatasetNotFoundError
from sofar_assets.lib.warehouse.duckdb import DuckDBWarehouse
from sofar_assets.lib.warehouse.names import check_dataset, check_identifier, check_project
from sofar_assets.lib.warehouse.predictions import (
    IMAGE_COLUMNS,
    LABEL_CORRECTIONS,
    PREDICTION_COLUMNS,
    PREDICTION_DATE,
    PREDICTIONS,
    RAW_CORRECTIONS,
    RUN_COLUMNS,
    prediction_frame,
    run_rows,
)
from sofar_assets.lib.warehouse.schemas import (
    IMAGE_UPLOADS,
    SOFAR_DATASET,
    TableSchema,
    raw_labels_schema,
    raw_labels_table,
)
from sofar_assets.lib.warehouse.spool import ParquetSpool, merge_parquet, write_parquet
from sofar_assets.lib.warehouse.types import (
    BOOL,
    DATE,
    FLOAT64,
    INT64,
    STRING,
    TIMESTAMP,
    arrow_to_pandas,
    check_in_range,
    frame_types,
    infer_type,
    range_bounds,
    to_arrow,
)
from sofar_assets.lib.warehouse.uploads import (
    UPLOAD_COLUMNS,
    check_uploads_table,
    iter_uploads,
    uploads_from_table,
)

__all__ = [
    "BOOL", "DATE", "FLOAT64", "IMAGE_COLUMNS", "IMAGE_UPLOADS", "INT64", "LABEL_CORRECTIONS",
    "PREDICTIONS", "PREDICTION_COLUMNS", "PREDICTION_DATE", "RAW_CORRECTIONS", "RUN_COLUMNS",
    "SOFAR_DATASET", "STAGING_PREFIX", "prediction_frame", "run_rows",
    "STRING", "TIMESTAMP", "UPLOAD_COLUMNS", "BigQueryWarehouse", "DatasetNotFoundError", "DuckDBWarehouse",
    "ParquetSpool", "TableNotFoundError", "TableSchema", "Warehouse", "arrow_to_pandas", "check_dataset",
    "check_day_files", "check_identifier", "check_in_range", "check_project", "check_uploads_table", "evolve",
    "frame_types", "infer_type", "iter_uploads", "merge_parquet", "range_bounds", "raw_labels_schema",
    "raw_labels_table", "to_arrow", "uploads_from_table", "write_parquet",
]  # fmt: skip
