"""BigQueryWarehouse against the local BigQuery emulator (set up with `bash scripts/bqemulator.sh`)."""

from __future__ import annotations

import datetime as dt
import uuid

import pandas as pd
import pytest

from sofar_assets.lib.warehouse import BigQueryWarehouse, TableNotFoundError, uploads_from_table

from conftest import prediction_rows as predictions

pytestmark = pytest.mark.bigquery

D1, D2, D3 = dt.date(2024, 3, 1), dt.date(2024, 3, 2), dt.date(2024, 3, 3)


@pytest.fixture()
def wh(emulator):
    # a fresh dataset per test: the emulator is shared by the module; runs never create datasets
    wh = BigQueryWarehouse(emulator.project, f"sofar_{uuid.uuid4().hex[:8]}", client=emulator.client(),
                           partition_decorator=False)
    wh.ensure_dataset()
    return wh


def test_replace_partition_is_idempotent_per_day(wh):
    client = wh.client
    assert not wh.table_exists("predictions")
    assert wh.replace_partition("predictions", predictions(D1, ["a", "b"]), "prediction_date", D1, D2) == 2
    assert client.get_dataset(f"{wh.project}.{wh.dataset}").dataset_id == wh.dataset
    assert (
        wh.replace_partition("predictions", predictions(D2, ["c", "d", "e"]), "prediction_date", D2, D3) == 3
    )

    # re-run day 1 with other rows
    assert (
        wh.replace_partition("predictions", predictions(D1, ["x"], prob=0.25), "prediction_date", D1, D2) == 1
    )
    day1 = wh.read_range("predictions", "prediction_date", D1, D2)
    assert day1["image_id"].tolist() == ["x"]
    assert day1["top1_prob"].tolist() == [0.25]
    assert day1["prediction_date"].tolist() == [D1] and type(day1["prediction_date"][0]) is dt.date
    day2 = wh.read_range("predictions", "prediction_date", D2, D3)
    assert sorted(day2["image_id"]) == ["c", "d", "e"]
    assert day2["top1_prob"].tolist() == [0.9, 0.9, 0.9]

    table = client.get_table(f"{wh.project}.{wh.dataset}.predictions")
    assert {f.name: f.field_type for f in table.schema}["prediction_date"] == "DATE"
    assert table.time_partitioning.field == "prediction_date"
    assert wh.table_columns("predictions")["prediction_date"] == "DATE"
    counts = wh.partition_counts("predictions", "prediction_date")
    assert counts["partition"].tolist() == [D1, D2] and counts["rows"].tolist() == [1, 3]
    # the staging tables are gone
    assert [t.table_id for t in client.list_tables(f"{wh.project}.{wh.dataset}")] == ["predictions"]


def test_wrong_day_is_refused_before_anything_is_deleted(wh):
    wh.replace_partition("predictions", predictions(D1, ["a"]), "prediction_date", D1, D2)
    with pytest.raises(ValueError, match="row 0 has prediction_date=2024-03-02"):
        wh.replace_partition("predictions", predictions(D2, ["b"]), "prediction_date", D1, D2)
    assert wh.read_table("predictions")["image_id"].tolist() == ["a"]
    swapped = predictions(D1, ["b"]).rename(columns={"error": "err"})
    with pytest.raises(ValueError, match="column 5 is 'error' but the frame has 'err'"):
        wh.replace_partition("predictions", swapped, "prediction_date", D1, D2)


def test_uploads_and_whole_table_writes(wh):
    uploads = pd.DataFrame(
        {
            "image_id": ["b", "a", "c"],
            "image_uri": ["gs://bkt/b.jpg", "gs://bkt/a.jpg", "gs://bkt/c.jpg"],
            "uploaded_at": pd.to_datetime(["2024-03-01 09:00", "2024-03-01 09:00", "2024-03-02 00:00"]),
        }
    )
    wh.write_table("uploads", uploads)
    assert wh.table_columns("uploads") == {
        "image_id": "STRING",
        "image_uri": "STRING",
        "uploaded_at": "TIMESTAMP",
    }
    got = uploads_from_table(wh, "uploads", D1, D2)
    assert got["image_id"].tolist() == ["a", "b"]
    assert got["uploaded_at"].tolist() == [pd.Timestamp("2024-03-01 09:00")] * 2
    assert wh.query("SELECT COUNT(*) AS n FROM {table:uploads}")["n"].item() == 3
    counts = wh.partition_counts("uploads", "uploaded_at")  # per UTC day of the timestamp
    assert counts["partition"].tolist() == [D1, D2] and counts["rows"].tolist() == [2, 1]

    # whole-table writes replace the rows; a dropped column is refused, never a delete-and-recreate
    with pytest.raises(ValueError, match="table 'uploads': column 'image_uri' \\(STRING\\) is in the warehouse"):
        wh.write_table("uploads", uploads[["image_id", "uploaded_at"]].iloc[:1])
    assert len(wh.read_table("uploads")) == 3
    wh.write_table("uploads", uploads.iloc[:1])
    assert wh.read_table("uploads")["image_id"].tolist() == ["b"]
    # (an added column is covered on DuckDB and by the recording client: the emulator's own
    # storage never gains a column, whatever the API says)
    wh.write_table("uploads_v0", uploads[["image_id", "uploaded_at"]])
    with pytest.raises(ValueError, match="uploads table 'uploads_v0' has no column 'image_uri'"):
        uploads_from_table(wh, "uploads_v0", D1, D2)
    with pytest.raises(TableNotFoundError, match="'missing'"):
        uploads_from_table(wh, "missing", D1, D2)
