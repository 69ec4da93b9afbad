"""The BigQuery REST contract of a LOAD job, as the fake production client enforces it.

The production day write (one ``WRITE_TRUNCATE`` load job into ``table$YYYYMMDD``) cannot run
against the emulator (it takes the staging-table path) and has never met real BigQuery. So the
recording client builds the exact request body that google-cloud-bigquery would POST
(``LoadJob(...).to_api_repr()``: the library's own LoadJobConfig and REST field names) and checks
it against the rules of the REST reference (cloud.google.com/bigquery/docs/reference/rest/v2/Job
#JobConfigurationLoad, and "Loading data into partitioned tables"), failing like the API with a
400/404-style message. A typo in a field, a value, the decorator or the location fails a test.
"""

from __future__ import annotations

import datetime as dt
import re

# JobConfigurationLoad's fields (REST reference, v2)
LOAD_FIELDS = {
    "sourceUris", "fileSetSpecType", "schema", "destinationTable", "destinationTableProperties",
    "createDisposition", "writeDisposition", "nullMarker", "nullMarkers", "fieldDelimiter", "skipLeadingRows",
    "encoding", "quote", "maxBadRecords", "schemaInlineFormat", "schemaInline", "allowQuotedNewlines",
    "sourceFormat", "allowJaggedRows", "ignoreUnknownValues", "projectionFields", "autodetect",
    "schemaUpdateOptions", "timePartitioning", "rangePartitioning", "clustering",
    "destinationEncryptionConfiguration", "useAvroLogicalTypes", "referenceFileSchemaUri",
    "hivePartitioningOptions", "decimalTargetTypes", "jsonExtension", "parquetOptions",
    "preserveAsciiControlCharacters", "connectionProperties", "createSession", "columnNameCharacterMap",
    "copyFilesOnly", "timeZone", "dateFormat", "datetimeFormat", "timeFormat", "timestampFormat",
    "sourceColumnMatch",
}
JOB_CONFIGURATION_FIELDS = {"jobType", "query", "load", "copy", "extract", "dryRun", "jobTimeoutMs", "labels",
                            "reservation", "maxSlots"}
SOURCE_FORMATS = {"CSV", "NEWLINE_DELIMITED_JSON", "AVRO", "PARQUET", "ORC", "DATASTORE_BACKUP", "ICEBERG"}
WRITE_DISPOSITIONS = {"WRITE_TRUNCATE", "WRITE_TRUNCATE_DATA", "WRITE_APPEND", "WRITE_EMPTY"}
CREATE_DISPOSITIONS = {"CREATE_IF_NEEDED", "CREATE_NEVER"}
SCHEMA_UPDATE_OPTIONS = {"ALLOW_FIELD_ADDITION", "ALLOW_FIELD_RELAXATION"}
PARTITION_TYPES = {"DAY": "%Y%m%d", "HOUR": "%Y%m%d%H", "MONTH": "%Y%m", "YEAR": "%Y"}
FIELD_TYPES = {"STRING", "BYTES", "INTEGER", "INT64", "FLOAT", "FLOAT64", "NUMERIC", "BIGNUMERIC", "BOOLEAN",
               "BOOL", "TIMESTAMP", "DATE", "TIME", "DATETIME", "GEOGRAPHY", "JSON", "RECORD", "STRUCT",
               "RANGE", "INTERVAL"}
FIELD_MODES = {"NULLABLE", "REQUIRED", "REPEATED"}
_TABLE_ID = re.compile(r"^(?P<table>[\w-]{1,1024})(?:\$(?P<decorator>\d+))?$")
_GCS_URI = re.compile(r"^gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]/[^*]*\*?[^*]*$")


class BadRequest(AssertionError):
    """What BigQuery answers with 400 invalid / 404 notFound for this request."""


def _fail(reason: str, message: str):
    raise BadRequest(f"{reason}: {message}")


def check_load_job(body: dict, *, job_location: str | None, dataset_location: str | None,
                   table: dict | None) -> None:
    """Check the ``jobs.insert`` body of a load job. ``table`` is the destination table's resource
    as the fake stores it (``timePartitioning``, ``schema``), or None when it does not exist."""
    config = body.get("configuration", {})
    unknown = set(config) - JOB_CONFIGURATION_FIELDS
    if unknown:
        _fail("invalid", f"Invalid JSON payload received. Unknown name {sorted(unknown)[0]!r} "
                         "at 'job.configuration'")
    load = config.get("load")
    if load is None:
        _fail("invalid", "Required parameter is missing: configuration.load")
    unknown = set(load) - LOAD_FIELDS
    if unknown:
        _fail("invalid", f"Invalid JSON payload received. Unknown name {sorted(unknown)[0]!r} "
                         "at 'job.configuration.load'")
    if (job_location is not None and dataset_location is not None
            and job_location.lower() != dataset_location.lower()):
        dest = load.get("destinationTable", {})
        _fail("notFound", f"Not found: Dataset {dest.get('projectId')}:{dest.get('datasetId')} "
                          f"was not found in location {job_location}")

    fmt = load.get("sourceFormat", "CSV")
    if fmt not in SOURCE_FORMATS:
        _fail("invalid", f"Invalid value for sourceFormat: {fmt!r} is not a valid value")
    write = load.get("writeDisposition", "WRITE_APPEND")
    if write not in WRITE_DISPOSITIONS:
        _fail("invalid", f"Invalid value for writeDisposition: {write!r} is not a valid value")
    create = load.get("createDisposition", "CREATE_IF_NEEDED")
    if create not in CREATE_DISPOSITIONS:
        _fail("invalid", f"Invalid value for createDisposition: {create!r} is not a valid value")
    uris = load.get("sourceUris")
    if uris is not None:
        if not uris:
            _fail("invalid", "sourceUris: at least one URI is required")
        for uri in uris:
            if not _GCS_URI.match(uri):
                _fail("invalid", f"Source URI must be a Google Cloud Storage location: {uri}")

    dest = load.get("destinationTable")
    if not dest or not {"projectId", "datasetId", "tableId"} <= set(dest):
        _fail("invalid", "Required parameter is missing: destinationTable (projectId, datasetId, tableId)")
    match = _TABLE_ID.match(dest["tableId"])
    if match is None:
        _fail("invalid", f"Invalid table ID \"{dest['tableId']}\". Table IDs must be alphanumeric (plus "
                         "underscores) with an optional partition decorator $YYYYMMDD")

    fields = (load.get("schema") or {}).get("fields") or []
    names = set()
    for f in fields:
        if f.get("type") not in FIELD_TYPES:
            _fail("invalid", f"Invalid field type {f.get('type')!r} for field {f.get('name')!r}")
        if f.get("mode", "NULLABLE") not in FIELD_MODES:
            _fail("invalid", f"Invalid mode {f.get('mode')!r} for field {f.get('name')!r}")
        names.add(f.get("name"))
    partitioning = load.get("timePartitioning")
    if partitioning is not None:
        if partitioning.get("type") not in PARTITION_TYPES:
            _fail("invalid", f"Invalid timePartitioning.type {partitioning.get('type')!r}")
        if names and partitioning.get("field") not in names:
            _fail("invalid", "The field specified for time partitioning can only be of type TIMESTAMP, "
                             "DATE or DATETIME. The type found is: null "
                             f"(no field {partitioning.get('field')!r})")
    clustering = (load.get("clustering") or {}).get("fields") or []
    if len(clustering) > 4 or (names and not set(clustering) <= names):
        _fail("invalid", f"The clustering fields {clustering} must be at most 4 fields of the schema")

    decorator = match.group("decorator")
    table_partitioning = (table or {}).get("timePartitioning")
    if decorator is not None:
        if table is None:
            _fail("notFound", "Not found: Table "
                              f"{dest['projectId']}:{dest['datasetId']}.{match.group('table')} "
                              "(a partition decorator needs an existing partitioned table)")
        if table_partitioning is None:
            _fail("invalid", f"Cannot write to partition {dest['tableId']}: table is not partitioned")
        pattern = PARTITION_TYPES[table_partitioning.get("type", "DAY")]
        try:
            parsed = dt.datetime.strptime(decorator, pattern)
        except ValueError:
            parsed = None
        if parsed is None or parsed.strftime(pattern) != decorator:
            _fail("invalid", f"Invalid partition decorator ${decorator} "
                             f"for a {table_partitioning.get('type', 'DAY')}-partitioned table "
                             f"(expected {pattern.replace('%', '')})")
    if table_partitioning is not None and partitioning is not None and (
            partitioning.get("field") != table_partitioning.get("field")
            or partitioning.get("type") != table_partitioning.get("type", "DAY")):
        _fail("invalid", "Incompatible table partitioning specification. Expects partitioning specification "
                         f"{table_partitioning}, but input partitioning specification is {partitioning}")

    options = load.get("schemaUpdateOptions") or []
    for option in options:
        if option not in SCHEMA_UPDATE_OPTIONS:
            _fail("invalid", f"Invalid value for schemaUpdateOptions: {option!r} is not a valid value")
    if options and not (write == "WRITE_APPEND" or (write == "WRITE_TRUNCATE" and decorator is not None)):
        _fail("invalid", "Schema update options should only be specified with WRITE_APPEND disposition, "
                         "or with WRITE_TRUNCATE disposition on a table partition.")
