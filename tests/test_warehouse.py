"""DuckDBWarehouse: types survive, partitions are replaced (not duplicated), bad writes are refused."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys

import duckdb
import pandas as pd
import pytest

from sofar_assets.lib.warehouse import (
    DuckDBWarehouse,
    TableNotFoundError,
    frame_types,
    uploads_from_table,
)

from conftest import prediction_rows as predictions

D1, D2, D3 = dt.date(2024, 3, 1), dt.date(2024, 3, 2), dt.date(2024, 3, 3)


@pytest.fixture()
def wh(tmp_path):
    return DuckDBWarehouse(tmp_path / "wh" / "sofar.duckdb")


def describe(wh: DuckDBWarehouse, table: str) -> dict[str, str]:
    with duckdb.connect(wh.path, read_only=True) as con:
        return {r[0]: r[1] for r in con.execute(f"DESCRIBE {wh.fully_qualified(table)}").fetchall()}


def test_rerunning_a_day_replaces_it_and_keeps_date_type(wh):
    assert wh.replace_partition("predictions", predictions(D1, ["a", "b"]), "prediction_date", D1, D2) == 2
    assert (
        wh.replace_partition("predictions", predictions(D2, ["c", "d", "e"]), "prediction_date", D2, D3) == 3
    )
    assert describe(wh, "predictions") == {
        "prediction_date": "DATE",
        "image_id": "VARCHAR",
        "top1_label": "VARCHAR",
        "top1_prob": "DOUBLE",
        "is_ood": "BOOLEAN",
        "error": "VARCHAR",
    }

    # re-run of day 1 with other rows: exactly the new rows, day 2 untouched
    assert (
        wh.replace_partition("predictions", predictions(D1, ["x"], prob=0.4), "prediction_date", D1, D2) == 1
    )
    got = wh.read_table("predictions").sort_values("image_id").reset_index(drop=True)
    assert got["image_id"].tolist() == ["c", "d", "e", "x"]
    assert got["prediction_date"].tolist() == [D2, D2, D2, D1]
    assert all(type(v) is dt.date for v in got["prediction_date"])
    assert got.loc[got.image_id == "x", "top1_prob"].item() == 0.4
    counts = wh.partition_counts("predictions", "prediction_date")
    assert counts["partition"].tolist() == [D1, D2]
    assert counts["rows"].tolist() == [1, 3]

    # the same re-run twice is idempotent
    wh.replace_partition("predictions", predictions(D1, ["x"], prob=0.4), "prediction_date", D1, D2)
    assert len(wh.read_table("predictions")) == 4


def test_string_dates_never_become_varchar(wh):
    df = predictions(D1, ["a"])
    df["prediction_date"] = ["2024-03-01"]
    with pytest.raises(ValueError, match="partition column 'prediction_date' holds strings"):
        wh.replace_partition("predictions", df, "prediction_date", D1, D2)
    assert not wh.table_exists("predictions")

    # a DATE column that is not the partition column: refused on an existing table as well
    base = predictions(D1, ["a"]).assign(taken_on=[D1])
    wh.replace_partition("predictions", base, "prediction_date", D1, D2)
    bad = base.assign(taken_on=["2024-03-01"])
    with pytest.raises(
        ValueError, match=r"column 'taken_on' is DATE but the frame holds STRING.*pd\.to_datetime"
    ):
        wh.replace_partition("predictions", bad, "prediction_date", D1, D2)
    assert describe(wh, "predictions")["taken_on"] == "DATE"


def test_rows_outside_the_partition_are_refused_and_nothing_changes(wh):
    wh.replace_partition("predictions", predictions(D1, ["a", "b"]), "prediction_date", D1, D2)
    wrong = pd.concat([predictions(D1, ["c"]), predictions(D2, ["d"])], ignore_index=True)
    with pytest.raises(ValueError, match=r"column 'prediction_date': row 1 has prediction_date=2024-03-02"):
        wh.replace_partition("predictions", wrong, "prediction_date", D1, D2)
    assert sorted(wh.read_table("predictions")["image_id"]) == ["a", "b"]

    nulls = predictions(D1, ["c"]).assign(prediction_date=[None])
    with pytest.raises(ValueError, match="prediction_date=null"):
        wh.replace_partition("predictions", nulls, "prediction_date", D1, D2)


def test_schema_changes_on_an_existing_table_name_the_column(wh):
    wh.replace_partition("predictions", predictions(D1, ["a"]), "prediction_date", D1, D2)
    swapped = predictions(D1, ["b"])[
        ["prediction_date", "top1_label", "image_id", "top1_prob", "is_ood", "error"]
    ]
    with pytest.raises(ValueError, match="column 1 is 'image_id' but the frame has 'top1_label'"):
        wh.replace_partition("predictions", swapped, "prediction_date", D1, D2)
    retyped = predictions(D1, ["b"]).assign(top1_prob=["high"])
    with pytest.raises(ValueError, match="column 'top1_prob' is FLOAT64 but the frame holds STRING"):
        wh.replace_partition("predictions", retyped, "prediction_date", D1, D2)
    extra = predictions(D1, ["b"]).assign(top2_label=["x"])
    with pytest.raises(ValueError, match="column 6 is '\\(no column\\)' but the frame has 'top2_label'"):
        wh.replace_partition("predictions", extra, "prediction_date", D1, D2)
    # ints into a FLOAT64 column are fine
    ints = predictions(D1, ["b"]).assign(top1_prob=[1])
    assert wh.replace_partition("predictions", ints, "prediction_date", D1, D2) == 1
    assert wh.read_table("predictions")["top1_prob"].tolist() == [1.0]


def test_empty_frame_clears_the_partition(wh):
    wh.replace_partition("predictions", predictions(D1, ["a"]), "prediction_date", D1, D2)
    wh.replace_partition("predictions", predictions(D2, ["b"]), "prediction_date", D2, D3)
    assert wh.replace_partition("predictions", predictions(D1, []), "prediction_date", D1, D2) == 0
    assert wh.read_table("predictions")["image_id"].tolist() == ["b"]


def test_timestamps_are_naive_utc_and_ranges_half_open(wh):
    seoul = dt.timezone(dt.timedelta(hours=9))
    uploads = pd.DataFrame(
        {
            "image_id": ["late", "midnight", "aware", "next"],
            "image_uri": ["/a.jpg", "/b.jpg", "/c.jpg", "/d.jpg"],
            # 2024-03-02 08:30 in Seoul is 2024-03-01 23:30 UTC: it belongs to day 1
            "uploaded_at": [
                pd.Timestamp("2024-03-01 23:59:59", tz="UTC"),
                pd.Timestamp("2024-03-01 00:00:00", tz="UTC"),
                pd.Timestamp(dt.datetime(2024, 3, 2, 8, 30, tzinfo=seoul)),
                pd.Timestamp("2024-03-02 00:00:00", tz="UTC"),
            ],
            "size": [10, 20, 30, 40],
        }
    )
    wh.write_table("uploads", uploads)
    assert describe(wh, "uploads")["uploaded_at"] == "TIMESTAMP"
    day1 = wh.read_range("uploads", "uploaded_at", D1, D2)
    assert day1["image_id"].tolist() == ["midnight", "aware", "late"]
    assert day1["uploaded_at"].dt.tz is None
    assert day1["uploaded_at"].iloc[1] == pd.Timestamp("2024-03-01 23:30:00")
    assert day1["size"].dtype == "Int64"

    got = uploads_from_table(wh, "uploads", "2024-03-01", "2024-03-02")
    assert got.columns.tolist() == ["image_id", "image_uri", "uploaded_at"]
    assert got["image_id"].tolist() == ["midnight", "aware", "late"]
    assert uploads_from_table(wh, "uploads", D2, D3)["image_uri"].tolist() == ["/d.jpg"]


def test_uploads_from_table_names_missing_column_and_table(wh):
    wh.write_table("uploads", pd.DataFrame({"image_id": ["a"], "uploaded_at": [pd.Timestamp("2024-03-01")]}))
    with pytest.raises(ValueError, match="uploads table 'uploads' has no column 'image_uri'"):
        uploads_from_table(wh, "uploads", D1, D2)
    with pytest.raises(TableNotFoundError, match="'nope'"):
        uploads_from_table(wh, "nope", D1, D2)


def test_partition_by_timestamp_and_bounds_checks(wh):
    df = pd.DataFrame({"ts": pd.to_datetime(["2024-03-01 05:00", "2024-03-01 23:00"]), "v": [1.0, 2.0]})
    assert wh.replace_partition("events", df, "ts", D1, D2) == 2
    assert wh.table_columns("events") == {"ts": "TIMESTAMP", "v": "FLOAT64"}
    late = pd.DataFrame({"ts": pd.to_datetime(["2024-03-02 00:00"]), "v": [3.0]})
    wh.replace_partition("events", late, "ts", D2, D3)
    counts = wh.partition_counts("events", "ts")
    assert counts["partition"].tolist() == [D1, D2] and counts["rows"].tolist() == [2, 1]
    with pytest.raises(ValueError, match="empty range"):
        wh.replace_partition("events", df, "ts", D2, D1)
    with pytest.raises(ValueError, match="has a time of day, but the column is a DATE"):
        wh.replace_partition(
            "predictions", predictions(D1, ["a"]), "prediction_date", dt.datetime(2024, 3, 1, 6), D2
        )


def test_read_query_and_names(wh):
    wh.write_table("labels", pd.DataFrame({"uri": ["/x.jpg", "/y.jpg"], "label": [0, 1]}))
    assert wh.table_exists("labels") and not wh.table_exists("other")
    assert wh.read_table("labels", columns=["label"]).columns.tolist() == ["label"]
    assert wh.query("SELECT SUM(label) AS s FROM {table:labels}")["s"].item() == 1
    with pytest.raises(ValueError, match="table 'labels' has no column 'nope'"):
        wh.read_table("labels", columns=["nope"])
    with pytest.raises(TableNotFoundError):
        wh.read_table("other")
    with pytest.raises(ValueError, match="invalid table name"):
        wh.write_table("labels; DROP TABLE x", pd.DataFrame({"a": [1]}))
    with pytest.raises(ValueError, match="column 'mixed' mixes value types"):
        wh.write_table("bad", pd.DataFrame({"mixed": ["a", 1]}))
    # write_table replaces the whole table's rows; schema changes are additive only
    with pytest.raises(ValueError, match="table 'labels': column 'label' \\(INT64\\) is in the warehouse but not in"):
        wh.write_table("labels", pd.DataFrame({"uri": ["/z.jpg"]}))
    assert wh.read_table("labels")["uri"].tolist() == ["/x.jpg", "/y.jpg"]  # untouched
    wh.write_table("labels", pd.DataFrame({"uri": ["/z.jpg"], "label": [2], "note": ["new"]}))
    assert wh.read_table("labels").to_dict("records") == [{"uri": "/z.jpg", "label": 2, "note": "new"}]


def test_frame_types():
    df = pd.DataFrame(
        {
            "d": [D1, None],
            "t": [pd.Timestamp("2024-01-01"), None],
            "s": ["x", None],
            "f": [1.0, None],
            "i": pd.array([1, None], dtype="Int64"),
            "b": [True, False],
            "n": [None, None],
        }
    )
    assert frame_types(df) == {
        "d": "DATE",
        "t": "TIMESTAMP",
        "s": "STRING",
        "f": "FLOAT64",
        "i": "INT64",
        "b": "BOOL",
        "n": None,
    }


def test_other_processes_can_open_the_file_between_calls(wh):
    wh.replace_partition("predictions", predictions(D1, ["a"]), "prediction_date", D1, D2)
    code = (
        "import duckdb, sys\n"
        "con = duckdb.connect(sys.argv[1])\n"
        "con.execute(\"INSERT INTO sofar.sofar.predictions VALUES ('2024-03-02', 'z', 'l', 0.1, true, NULL)\")\n"
    )
    subprocess.run([sys.executable, "-c", code, wh.path], check=True, timeout=60)
    assert sorted(wh.read_table("predictions")["image_id"]) == ["a", "z"]
