"""Day boundaries of the upload table follow the partitions' timezone."""

import datetime as dt
from pathlib import Path

import pandas as pd

from sofar_assets.config import parse_config
from sofar_assets.defs.predictions import uploads_of_day
from sofar_assets.lib.data.days import day_window
from sofar_assets.lib.warehouse import DuckDBWarehouse


def test_uploads_from_table_are_cut_at_local_midnight(tmp_path):
    cfg = parse_config({
        "tasks": {"defect": {"folder": "t", "labels": {"0": "normal", "1": "defect"}}},
        "uploads": {"table": "image_uploads", "allowed_roots": [str(tmp_path)]},
        "partitions": {"start_date": "2026-11-01", "timezone": "Asia/Seoul"},
    }, base_dir=Path(tmp_path))
    start, end = day_window(dt.date(2026, 11, 2), cfg.partitions.timezone)
    assert start.astimezone(dt.UTC) == dt.datetime(2026, 11, 1, 15, tzinfo=dt.UTC)
    assert end - start == dt.timedelta(days=1)
    wh = DuckDBWarehouse(tmp_path / "w.duckdb")
    wh.write_table("image_uploads", pd.DataFrame({
        "image_id": ["late-on-1st-kst", "early-on-2nd-kst", "late-on-2nd-kst", "3rd-kst"],
        "image_uri": [str(tmp_path / f) for f in ("a.jpg", "b.jpg", "c.jpg", "d.jpg")],
        # stored as naive UTC, as the warehouse keeps timestamps
        "uploaded_at": pd.to_datetime(["2026-11-01 14:59", "2026-11-01 15:00", "2026-11-02 14:59", "2026-11-02 15:00"]),
    }))
    ids = [u.image_id for u in uploads_of_day(cfg, dt.date(2026, 11, 2), wh)]
    assert ids == ["early-on-2nd-kst", "late-on-2nd-kst"]
