"""The warehouse API the prediction asset builds on: declared schemas, the Parquet spool,
replace_day and the in-warehouse aggregates, on DuckDB and on the BigQuery emulator, plus the
exact BigQuery jobs of the production path (recorded by a fake client)."""

from __future__ import annotations

import datetime as dt
import re
import uuid

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sofar_assets.lib.warehouse import (
    PREDICTIONS,
    BigQueryWarehouse,
    DatasetNotFoundError,
    DuckDBWarehouse,
    ParquetSpool,
    TableSchema,
    iter_uploads,
)

D1, D2, D3 = dt.date(2026, 11, 1), dt.date(2026, 11, 2), dt.date(2026, 11, 3)
AT = pd.Timestamp("2026-11-02 03:00")


def rows(day: dt.date, ids: list[str], label: str = "dirt", error: str | None = None, ood: bool = False):
    """Rows of the predictions table, typed the way inference produces them."""
    n = len(ids)
    return pd.DataFrame({
        "prediction_date": [day] * n, "image_id": ids, "image_uri": [f"/u/{i}.jpg" for i in ids],
        "top1_label": [label] * n, "top1_prob": [0.9] * n, "top2_label": ["normal"] * n,
        "top2_prob": [0.1] * n, "label_set": [label] * n, "label_set_size": [1] * n,
        "ood_score": [1.5] * n, "is_ood": [ood] * n, "error": [error] * n, "model_name": ["sofar"] * n,
        "model_version": ["3"] * n, "predicted_at": [AT] * n,
    })  # fmt: skip


def spooled(tmp_path, day, *batches) -> str:
    path = tmp_path / f"{day}-{uuid.uuid4().hex[:6]}.parquet"
    with ParquetSpool(PREDICTIONS, path) as spool:
        for b in batches:
            spool.append(b)
    return str(path)


# -- TableSchema ----------------------------------------------------------------------------


def test_to_arrow_uses_the_declared_types_not_the_dtypes():
    df = rows(D1, ["a", "b"]).assign(error=[None, None], top1_prob=[1, 0])  # all-null object, ints
    t = PREDICTIONS.to_arrow(df[list(reversed(df.columns))])  # any column order in, declared order out
    assert t.schema == PREDICTIONS.arrow_schema()
    assert t.column("error").type == pa.string() and t.column("error").null_count == 2
    assert t.column("top1_prob").to_pylist() == [1.0, 0.0]
    assert t.column("prediction_date").to_pylist() == [D1, D1]
    aware = df.assign(predicted_at=[pd.Timestamp("2026-11-02 12:00", tz="Asia/Seoul")] * 2)
    assert PREDICTIONS.to_arrow(aware).column("predicted_at").to_pylist()[0] == dt.datetime(2026, 11, 2, 3)
    # an Arrow table goes through the same declaration
    assert PREDICTIONS.to_arrow(t).equals(t)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.drop(columns=["error"]),
         r"table 'predictions': the rows have missing column\(s\) \['error'\]"),
        (lambda d: d.assign(extra=1), r"extra column\(s\) \['extra'\]"),
        (lambda d: d.assign(top1_prob=[0.5, "high", 0.2]),
         r"table 'predictions': column 'top1_prob' is FLOAT64, but row 1 holds 'high'"),
        (lambda d: d.assign(prediction_date=[D1, D1, "2026-11-01"]),
         r"column 'prediction_date' is DATE, but row 2 holds '2026-11-01'.*pd.to_datetime"),
        (lambda d: d.assign(is_ood=[True, "no", False]), r"column 'is_ood' is BOOL, but row 1 holds 'no'"),
        (lambda d: d.assign(image_id=["a", 7, "c"]), r"column 'image_id' is STRING, but row 1 holds 7"),
    ],
)
def test_to_arrow_names_table_column_and_first_bad_row(change, message):
    with pytest.raises(ValueError, match=message):
        PREDICTIONS.to_arrow(change(rows(D1, ["a", "b", "c"])))


def test_to_arrow_refuses_lossy_ints_and_arrow_strings():
    counts = TableSchema("counts", {"day": "DATE", "n": "INT64"})
    with pytest.raises(ValueError, match=r"table 'counts': column 'n' is INT64, but row 1 holds 2.5"):
        counts.to_arrow(pd.DataFrame({"day": [D1, D1], "n": [1.0, 2.5]}))
    assert counts.to_arrow(pd.DataFrame({"day": [D1], "n": [3.0]})).column("n").to_pylist() == [3]
    with pytest.raises(ValueError, match=r"column 'day' is DATE, but the rows hold Arrow string"):
        counts.to_arrow(pa.table({"day": ["2026-11-01"], "n": [1]}))


def test_schema_declarations_are_checked():
    with pytest.raises(ValueError, match="partition column 'n' must be a DATE column"):
        TableSchema("t", {"n": "INT64"}, partition_column="n")
    with pytest.raises(ValueError, match="column 'n' has type 'INTEGER'"):
        TableSchema("t", {"n": "INTEGER"})
    with pytest.raises(ValueError, match="clustering column 'x' is not a column"):
        TableSchema("t", {"n": "INT64"}, clustering=("x",))
    with pytest.raises(ValueError, match="invalid table name"):
        TableSchema("t; drop", {"n": "INT64"})
    assert PREDICTIONS.partition_column == "prediction_date"
    assert PREDICTIONS.clustering == ("top1_label", "is_ood")


# -- ParquetSpool ---------------------------------------------------------------------------


def test_spool_writes_one_row_group_per_append(tmp_path):
    path = tmp_path / "day.parquet"
    spool = ParquetSpool(PREDICTIONS, path)
    spool.append(rows(D1, ["a", "b", "c"]))
    spool.append(rows(D1, []))  # nothing to write: no empty row group
    spool.append(rows(D1, ["d", "e"]))
    assert spool.rows == 5
    assert spool.close() == 5 and spool.close() == 5  # idempotent
    pf = pq.ParquetFile(path)
    assert [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)] == [3, 2]
    assert pf.read().column("image_id").to_pylist() == ["a", "b", "c", "d", "e"]
    # TIMESTAMP is stored UTC-adjusted (BigQuery loads it as TIMESTAMP, not DATETIME)
    assert pf.schema_arrow.field("predicted_at").type == pa.timestamp("us", tz="UTC")
    with pytest.raises(ValueError, match="closed"):
        spool.append(rows(D1, ["f"]))


def test_spool_removes_the_partial_file_on_error(tmp_path):
    path = tmp_path / "day.parquet"
    with pytest.raises(ValueError, match="column 'top1_prob' is FLOAT64, but row 0 holds 'x'"):
        with ParquetSpool(PREDICTIONS, path) as spool:
            spool.append(rows(D1, ["a"]))
            spool.append(rows(D1, ["b"]).assign(top1_prob=["x"]))
    assert not path.exists()
    with pytest.raises(RuntimeError):
        with ParquetSpool(PREDICTIONS, path) as spool:
            spool.append(rows(D1, ["a"]))
            raise RuntimeError("inference died")
    assert not path.exists()


# -- replace_day and the aggregates, on both engines -------------------------------------------


@pytest.fixture(params=["duckdb", pytest.param("bigquery", marks=pytest.mark.bigquery)])
def wh(request, tmp_path):
    if request.param == "duckdb":
        return DuckDBWarehouse(tmp_path / "wh.duckdb")
    emulator = request.getfixturevalue("emulator")
    bq = BigQueryWarehouse(emulator.project, f"sofar_{uuid.uuid4().hex[:8]}", client=emulator.client(),
                           partition_decorator=False)
    bq.ensure_dataset()
    return bq


def test_replace_day_replaces_exactly_the_day(wh, tmp_path):
    day1 = [spooled(tmp_path, D1, rows(D1, ["a", "b"])),
            spooled(tmp_path, D1, rows(D1, ["c"], "normal", error="bad"))]
    assert wh.replace_day(PREDICTIONS, D1, day1) == 3
    assert wh.replace_day(PREDICTIONS, D2, [spooled(tmp_path, D2, rows(D2, ["d"], ood=True))]) == 1
    assert wh.replace_day(PREDICTIONS, D1, day1) == 3  # a re-run: same count, no duplicates
    assert wh.count_range("predictions", "prediction_date", D1, D2) == 3
    assert wh.count_range("predictions", "prediction_date", D1, D3) == 4
    back = wh.read_range("predictions", "prediction_date", D1, D3)
    assert back.columns.tolist() == list(PREDICTIONS.columns)
    assert sorted(back["image_id"]) == ["a", "b", "c", "d"]
    assert all(type(v) is dt.date for v in back["prediction_date"])
    assert back["predicted_at"].tolist() == [AT] * 4  # naive UTC in, naive UTC out
    assert wh.table_columns("predictions") == PREDICTIONS.columns

    # an empty day, then a re-run of day 1 with other rows
    assert wh.replace_day(PREDICTIONS, D2, []) == 0
    assert wh.replace_day(PREDICTIONS, D1, [spooled(tmp_path, D1, rows(D1, ["x"]))]) == 1
    assert wh.read_table("predictions")["image_id"].tolist() == ["x"]


def test_replace_day_refuses_rows_of_another_day_before_writing(wh, tmp_path):
    wh.replace_day(PREDICTIONS, D1, [spooled(tmp_path, D1, rows(D1, ["a"]))])
    good, wrong = (spooled(tmp_path, D1, rows(D1, ["b"])),
                   spooled(tmp_path, D1, rows(D1, ["c"]), rows(D2, ["d"])))
    with pytest.raises(ValueError,
                       match=rf"{wrong}: row 1 has prediction_date=2026-11-02, but .* day 2026-11-01"):
        wh.replace_day(PREDICTIONS, D1, [good, wrong])
    assert wh.read_table("predictions")["image_id"].tolist() == ["a"]
    with pytest.raises(TypeError, match="datetime.date"):
        wh.replace_day(PREDICTIONS, dt.datetime(2026, 11, 1), [good])


def test_count_by_and_iter_range_run_in_the_warehouse(wh, tmp_path):
    wh.replace_day(PREDICTIONS, D1, [spooled(tmp_path, D1, rows(D1, ["a", "b"]), rows(D1, ["c"], "normal"),
                                             rows(D1, ["e"], "normal", error="unreadable"))])
    wh.replace_day(PREDICTIONS, D2, [spooled(tmp_path, D2, rows(D2, ["d"], ood=True))])
    by = wh.count_by("predictions", "prediction_date", D1, D3, ["prediction_date", "top1_label"])
    assert by.columns.tolist() == ["prediction_date", "top1_label", "n"]
    assert ([tuple(r) for r in by.itertuples(index=False)]
            == [(D1, "dirt", 2), (D1, "normal", 2), (D2, "dirt", 1)])
    ok = wh.count_by("predictions", "prediction_date", D1, D2, ["top1_label", "is_ood"], where_null=["error"])
    assert [tuple(r) for r in ok.itertuples(index=False)] == [("dirt", False, 2), ("normal", False, 1)]
    assert wh.count_by("predictions", "prediction_date", D3, D3 + dt.timedelta(days=1), ["top1_label"]).empty
    with pytest.raises(ValueError, match="table 'predictions' has no column 'nope'"):
        wh.count_by("predictions", "prediction_date", D1, D2, ["nope"])

    batches = list(wh.iter_range("predictions", "prediction_date", D1, D3, ["image_id", "prediction_date"],
                                 batch_rows=2, order_by=["prediction_date", "image_id"]))
    assert [len(b) for b in batches] == [2, 2, 1]
    assert pd.concat(batches)["image_id"].tolist() == ["a", "b", "c", "e", "d"]
    assert batches[0].columns.tolist() == ["image_id", "prediction_date"]


def test_iter_uploads_pages_a_day_in_order(wh):
    uploads = pd.DataFrame({
        "image_id": [f"img{i:03d}" for i in range(7)][::-1],
        "image_uri": [f"gs://b/{i}.jpg" for i in range(7)],
        "uploaded_at": [pd.Timestamp("2026-11-01 10:00")] * 6 + [pd.Timestamp("2026-11-02 00:00")],
    })  # fmt: skip
    wh.write_table("image_uploads", uploads)
    pages = list(iter_uploads(wh, "image_uploads", D1, D2, batch_rows=4))
    assert [len(p) for p in pages] == [4, 2]
    assert pd.concat(pages)["image_id"].tolist() == [f"img{i:03d}" for i in range(1, 7)]


# -- the production BigQuery path, recorded -----------------------------------------------------


class _Job:
    def __init__(self, rows: int | None):
        self.output_rows = rows

    def result(self, **kwargs):
        return self


class RecordingClient:
    """Records every BigQuery call the warehouse makes (no network). Load jobs are checked against
    the REST contract (tests/bq_contract.py) on the body the library itself would send."""

    project = "sofar-prod"

    def __init__(self, datasets=("sofar",), location: str | None = "asia-northeast3"):
        self.calls: list[tuple[str, object, object]] = []
        self.tables: dict[str, object] = {}
        self.datasets = set(datasets)
        self.location = location  # every dataset's location, as `bq show` would report it

    def _log(self, name, target, config=None):
        self.calls.append((name, target, config))

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def get_dataset(self, ref):
        from google.api_core.exceptions import NotFound

        self._log("get_dataset", ref)
        if ref.split(".")[-1] not in self.datasets:
            raise NotFound(ref)

    def create_dataset(self, *a, **k):
        self._log("create_dataset", a)

    def get_table(self, ref):
        from google.api_core.exceptions import NotFound

        self._log("get_table", ref)
        if ref not in self.tables:
            raise NotFound(ref)
        return self.tables[ref]

    def create_table(self, table, exists_ok=False):
        self._log("create_table", table)
        self.tables[f"{table.project}.{table.dataset_id}.{table.table_id}"] = table
        return table

    def update_table(self, table, fields):
        self._log("update_table", table, fields)
        return table

    def _check_load(self, source_uris, destination, job_config, location):
        """The ``jobs.insert`` body google-cloud-bigquery builds for this call, against the contract."""
        from bq_contract import check_load_job
        from google.cloud.bigquery import LoadJobConfig, TableReference
        from google.cloud.bigquery.job import LoadJob

        assert isinstance(job_config, LoadJobConfig), type(job_config)
        ref = TableReference.from_string(destination, default_project=self.project)
        body = LoadJob("job-1", source_uris, ref, client=self, job_config=job_config).to_api_repr()
        base = f"{ref.project}.{ref.dataset_id}.{ref.table_id.split('$')[0]}"
        table = self.tables.get(base)
        check_load_job(body, job_location=location, dataset_location=self.location,
                       table=table.to_api_repr() if table is not None else None)
        return body

    def load_table_from_file(self, fh, destination, job_config=None, location=None):
        self._check_load(None, destination, job_config, location)
        self._log("load_table_from_file", destination, job_config)
        return _Job(pq.ParquetFile(fh).metadata.num_rows)

    def load_table_from_uri(self, uris, destination, job_config=None, location=None):
        self._check_load(list(uris), destination, job_config, location)
        self._log("load_table_from_uri", (tuple(uris), destination), job_config)
        return _Job(42)

    def query(self, sql, *a, **k):
        self._log("query", sql)
        raise AssertionError(f"no query expected: {sql}")

    def delete_table(self, *a, **k):
        self._log("delete_table", a)


def test_production_day_is_one_truncating_load_job_into_the_partition(tmp_path):
    from google.cloud import bigquery

    client = RecordingClient()
    wh = BigQueryWarehouse("sofar-prod", "sofar", location="asia-northeast3", client=client)
    files = [spooled(tmp_path, D1, rows(D1, ["a", "b"])), spooled(tmp_path, D1, rows(D1, ["c"]))]
    assert wh.replace_day(PREDICTIONS, D1, files) == 3
    assert wh.replace_day(PREDICTIONS, D2, [spooled(tmp_path, D2, rows(D2, ["d"]))]) == 1

    loads = [c for c in client.calls if c[0].startswith("load_")]
    assert [c[1] for c in loads] == ["sofar-prod.sofar.predictions$20261101",
                                     "sofar-prod.sofar.predictions$20261102"]
    for _, _, config in loads:
        assert config.write_disposition == bigquery.WriteDisposition.WRITE_TRUNCATE
        assert config.source_format == bigquery.SourceFormat.PARQUET
        assert config.time_partitioning.field == "prediction_date"
        assert config.time_partitioning.type_ == "DAY"
        assert config.clustering_fields == ["top1_label", "is_ood"]
        assert config.schema_update_options == [bigquery.SchemaUpdateOption.ALLOW_FIELD_ADDITION]
        assert [(f.name, f.field_type) for f in config.schema] == list(PREDICTIONS.columns.items())
    assert "query" not in client.names() and "create_dataset" not in client.names()
    created = [c[1] for c in client.calls if c[0] == "create_table"]
    assert len(created) == 1  # once, then the table exists
    (table,) = created
    assert table.table_id == "predictions"
    assert (table.time_partitioning.field == "prediction_date"
            and table.time_partitioning.expiration_ms is None)
    assert table.clustering_fields == ["top1_label", "is_ood"]
    assert table.expires is None


def test_production_gcs_files_are_one_load_from_uri(tmp_path):
    client = RecordingClient()
    wh = BigQueryWarehouse("sofar-prod", "sofar", client=client)
    uris = ["gs://bkt/predictions/2026-11-01/part-0.parquet", "gs://bkt/predictions/2026-11-01/part-1.parquet"]
    assert wh.replace_day(PREDICTIONS, D1, uris) == 42
    (load,) = [c for c in client.calls if c[0].startswith("load_")]
    assert load[0] == "load_table_from_uri"
    assert load[1] == (tuple(uris), "sofar-prod.sofar.predictions$20261101")
    with pytest.raises(ValueError, match="not both"):
        wh.replace_day(PREDICTIONS, D1, [uris[0], spooled(tmp_path, D1, rows(D1, ["a"]))])


def _production_load(tmp_path):
    """The client and the (uris, destination, config) of one production day write into GCS files."""
    client = RecordingClient()
    wh = BigQueryWarehouse("sofar-prod", "sofar", location="asia-northeast3", client=client)
    uris = ["gs://sofar-ml/state/staging/predictions/2026-11-01/r/shard-0-of-1.parquet"]
    wh.replace_day(PREDICTIONS, D1, uris)
    (load,) = [c for c in client.calls if c[0] == "load_table_from_uri"]
    (_, (sent_uris, destination), config) = load
    return client, list(sent_uris), destination, config


def _retyped(config, **load_fields):
    from google.cloud import bigquery

    api = config.to_api_repr()
    api["load"].update(load_fields)
    return bigquery.LoadJobConfig.from_api_repr(api)


@pytest.mark.parametrize("change,error", [
    ({"writeDisposition": "WRITE_TRUNCATED"}, "writeDisposition: 'WRITE_TRUNCATED'"),
    ({"sourceFormat": "PARQET"}, "sourceFormat: 'PARQET'"),
    ({"schemaUpdateOptions": ["ALLOW_FIELD_ADITION"]}, "schemaUpdateOptions: 'ALLOW_FIELD_ADITION'"),
    ({"writeDisposition": "WRITE_EMPTY"}, "Schema update options should only be specified"),
    ({"timePartitioning": {"type": "DAY", "field": "uploaded_at"}}, "time partitioning"),
    ({"timePartitioning": {"type": "MONTH", "field": "prediction_date"}}, "Incompatible table partitioning"),
    ({"writeDispositon": "WRITE_TRUNCATE"}, "Unknown name 'writeDispositon'"),
    ({"clustering": {"fields": ["top1_labl"]}}, "clustering fields"),
])
def test_the_fake_refuses_what_bigquery_refuses_in_the_job_config(tmp_path, change, error):
    client, uris, destination, config = _production_load(tmp_path)
    # as sent: OK
    client.load_table_from_uri(uris, destination, job_config=config, location="asia-northeast3")
    with pytest.raises(AssertionError, match=re.escape(error)):
        client.load_table_from_uri(uris, destination, job_config=_retyped(config, **change),
                                   location="asia-northeast3")


@pytest.mark.parametrize("destination,uris,location,error", [
    ("sofar-prod.sofar.predictions$2026-11-01", None, "asia-northeast3", 'Invalid table ID "predictions$2026-11-01"'),
    ("sofar-prod.sofar.predictions$20261301", None, "asia-northeast3", "Invalid partition decorator $20261301"),
    ("sofar-prod.sofar.predictions$202611", None, "asia-northeast3", "Invalid partition decorator $202611"),
    ("sofar-prod.sofar.predictons$20261101", None, "asia-northeast3", "Not found: Table sofar-prod:sofar.predictons"),
    (None, ["gcs://sofar-ml/state/x.parquet"], "asia-northeast3", "must be a Google Cloud Storage location"),
    (None, None, "asia-northeast1", "was not found in location asia-northeast1"),
])
def test_the_fake_refuses_what_bigquery_refuses_in_the_call(tmp_path, destination, uris, location, error):
    client, sent_uris, sent_destination, config = _production_load(tmp_path)
    with pytest.raises(AssertionError, match=re.escape(error)):
        client.load_table_from_uri(uris or sent_uris, destination or sent_destination, job_config=config,
                                   location=location)


def test_the_production_load_body_is_the_documented_one(tmp_path):
    """The REST body of the day write, field by field (REST names: the library's to_api_repr)."""
    client, uris, destination, config = _production_load(tmp_path)
    body = client._check_load(uris, destination, config, "asia-northeast3")["configuration"]["load"]
    assert body["destinationTable"] == {"projectId": "sofar-prod", "datasetId": "sofar",
                                        "tableId": "predictions$20261101"}
    assert body["sourceUris"] == uris and body["sourceFormat"] == "PARQUET"
    assert (body["writeDisposition"] == "WRITE_TRUNCATE"
            and body["schemaUpdateOptions"] == ["ALLOW_FIELD_ADDITION"])
    assert body["timePartitioning"] == {"type": "DAY", "field": "prediction_date"}
    assert body["clustering"] == {"fields": ["top1_label", "is_ood"]}


def test_production_never_creates_the_dataset(tmp_path):
    client = RecordingClient(datasets=())
    wh = BigQueryWarehouse("example.com:sofar-prod", "sofar", location="EU", client=client)
    with pytest.raises(DatasetNotFoundError,
                       match=r"example.com:sofar-prod.sofar does not exist.*bq --location=EU mk --dataset"):
        wh.replace_day(PREDICTIONS, D1, [spooled(tmp_path, D1, rows(D1, ["a"]))])
    assert "create_dataset" not in client.names() and not any(n.startswith("load_") for n in client.names())


def test_schema_changes_are_additive(tmp_path):
    from google.cloud import bigquery

    v2 = TableSchema("predictions", {**PREDICTIONS.columns, "camera": "STRING"}, "prediction_date",
                     PREDICTIONS.clustering)
    client = RecordingClient()
    wh = BigQueryWarehouse("sofar-prod", "sofar", client=client)
    wh.replace_day(PREDICTIONS, D1, [spooled(tmp_path, D1, rows(D1, ["a"]))])
    path = tmp_path / "v2.parquet"
    with ParquetSpool(v2, path) as spool:
        spool.append(rows(D2, ["b"]).assign(camera="front"))
    wh.replace_day(v2, D2, [str(path)])
    config = [c for c in client.calls if c[0].startswith("load_")][-1][2]
    assert config.schema[-1].name == "camera"
    assert config.schema_update_options == [bigquery.SchemaUpdateOption.ALLOW_FIELD_ADDITION]
    assert "delete_table" not in client.names()
    retyped = TableSchema("predictions", {**PREDICTIONS.columns, "top1_prob": "STRING"}, "prediction_date")
    with pytest.raises(ValueError,
                       match="table 'predictions': column 'top1_prob' is FLOAT64 in the warehouse"):
        wh.replace_day(retyped, D1, [])
    dropped = TableSchema("predictions", {c: t for c, t in PREDICTIONS.columns.items() if c != "error"},
                          "prediction_date")
    with pytest.raises(ValueError,
                       match="table 'predictions': column 'error' \\(STRING\\) is in the warehouse"):
        wh.replace_day(dropped, D1, [])


def test_duckdb_schema_changes_are_additive(tmp_path):
    wh = DuckDBWarehouse(tmp_path / "wh.duckdb")
    wh.replace_day(PREDICTIONS, D1, [spooled(tmp_path, D1, rows(D1, ["a"]))])
    v2 = TableSchema("predictions", {**PREDICTIONS.columns, "camera": "STRING"}, "prediction_date")
    path = tmp_path / "v2.parquet"
    with ParquetSpool(v2, path) as spool:
        spool.append(rows(D2, ["b"]).assign(camera="front"))
    assert wh.replace_day(v2, D2, [str(path)]) == 1
    got = wh.read_table("predictions").set_index("image_id")["camera"].to_dict()
    assert got == {"a": None, "b": "front"}
    retyped = TableSchema("predictions", {**v2.columns, "camera": "INT64"}, "prediction_date")
    with pytest.raises(ValueError,
                       match="column 'camera' is STRING in the warehouse but the rows declare INT64"):
        wh.replace_day(retyped, D1, [])
    assert wh.count_range("predictions", "prediction_date", D1, D3) == 2


def test_production_whole_table_write_is_one_truncating_load(tmp_path):
    from google.cloud import bigquery

    from sofar_assets.lib.warehouse import SOFAR_DATASET

    data = pd.DataFrame({"sha256": ["h1"], "image_uri": ["/a.jpg"], "label": ["dirt"], "labels": ["dirt"],
                         "tasks": ["dirt"], "multi_label": [False], "split": ["train"], "n_sources": [1],
                         "corrected_at": [None]})
    client = RecordingClient()
    wh = BigQueryWarehouse("sofar-prod", "sofar", client=client)
    wh.write_table("sofar_dataset", data, schema=SOFAR_DATASET)
    wh.write_table("sofar_dataset", data, schema=SOFAR_DATASET)
    loads = [c for c in client.calls if c[0].startswith("load_")]
    assert [c[1] for c in loads] == ["sofar-prod.sofar.sofar_dataset"] * 2
    for _, _, config in loads:
        assert config.write_disposition == bigquery.WriteDisposition.WRITE_TRUNCATE
        # BigQuery refuses schema update options on a whole-table truncate: the added column is
        # added by an additive table update first (below)
        assert config.schema_update_options is None
    assert client.names().count("create_table") == 1
    v2 = TableSchema("sofar_dataset", {**SOFAR_DATASET.columns, "source": "STRING"})
    wh.write_table("sofar_dataset", data.assign(source="folder"), schema=v2)
    update = [c for c in client.calls if c[0] == "update_table"]
    assert [f.name for f in update[0][1].schema][-1] == "source" and update[0][2] == ["schema"]
    assert "delete_table" not in client.names() and "query" not in client.names()


def test_write_table_with_a_schema_does_not_infer(tmp_path):
    from sofar_assets.lib.warehouse import raw_labels_schema

    wh = DuckDBWarehouse(tmp_path / "wh.duckdb")
    raw = pd.DataFrame({"task": ["dirt"], "image_uri": ["/a.jpg"], "source_label": ["x"], "label": [None],
                        "sha256": [None], "n_bytes": [None], "width": [None], "height": [None],
                        "error": ["label 'x' is not mapped"]})  # all-null object columns
    wh.write_table("raw_labels_dirt", raw, schema=raw_labels_schema("dirt"))
    assert wh.table_columns("raw_labels_dirt")["n_bytes"] == "INT64"
    assert wh.table_columns("raw_labels_dirt")["label"] == "STRING"
    with pytest.raises(ValueError,
                       match="table 'raw_labels_dirt': column 'width' is INT64, but row 0 holds 'wide'"):
        wh.write_table("raw_labels_dirt", raw.assign(width=["wide"]), schema=raw_labels_schema("dirt"))
    assert len(wh.read_table("raw_labels_dirt")) == 1


def test_table_metadata_is_fetched_once_per_warehouse_instance(tmp_path, monkeypatch):
    """A run's steps fetch a table's metadata once (get_table was half of a day's BigQuery calls);
    a long-lived instance still sees another process's new table once METADATA_TTL_S is up."""
    from sofar_assets.lib.warehouse import bigquery as bq

    client = RecordingClient()
    wh = BigQueryWarehouse("sofar-prod", "sofar", client=client)
    wh.replace_day(PREDICTIONS, D1, [spooled(tmp_path, D1, rows(D1, ["a"]))])
    wh.replace_day(PREDICTIONS, D2, [spooled(tmp_path, D2, rows(D2, ["b"]))])
    assert list(wh.table_columns("predictions")) == list(PREDICTIONS.columns)
    assert client.names().count("get_table") == 1 and client.names().count("create_table") == 1
    assert not wh.table_exists("label_corrections") and not wh.table_exists("label_corrections")
    client.tables["sofar-prod.sofar.label_corrections"] = client.tables["sofar-prod.sofar.predictions"]
    assert not wh.table_exists("label_corrections")  # created elsewhere: not seen within the TTL
    assert client.names().count("get_table") == 2
    monkeypatch.setattr(bq, "METADATA_TTL_S", 0.0)
    assert wh.table_exists("label_corrections")
