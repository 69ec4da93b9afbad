"""SOCAR's business day (Asia/Seoul) and the late-upload policy (defs/late_uploads.py)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from zoneinfo import ZoneInfo

import dagster as dg
import pandas as pd
import yaml

from sofar_assets.config import load_config, parse_config
from sofar_assets.defs.late_uploads import PREDICTIONS_KEY, build_late_upload_sensor
from sofar_assets.defs.resources import DuckDBWarehouseResource
from sofar_assets.lib.data.days import day_window
from sofar_assets.lib.warehouse import IMAGE_UPLOADS, DuckDBWarehouse

ROOT = Path(__file__).resolve().parents[1]
SEOUL = ZoneInfo("Asia/Seoul")


def test_production_partitions_are_seoul_days_run_at_two_in_the_morning():
    from sofar_assets.definitions import build_definitions

    cfg = load_config(ROOT / "config" / "prod.yaml", check_paths=False)
    assert cfg.partitions.timezone == "Asia/Seoul" and cfg.partitions.late_upload_days >= 1
    start, end = day_window(dt.date(2026, 3, 1), cfg.partitions.timezone)
    assert start.astimezone(dt.UTC) == dt.datetime(2026, 2, 28, 15, tzinfo=dt.UTC)  # 00:00 KST
    assert end - start == dt.timedelta(days=1)
    defs = build_definitions(cfg)
    schedule = defs.resolve_schedule_def("daily_predictions_job_schedule")
    assert schedule.execution_timezone == "Asia/Seoul" and schedule.cron_schedule == "0 2 * * *"
    assert defs.resolve_job_def("daily_predictions_job").partitions_def.timezone == "Asia/Seoul"
    assert defs.resolve_sensor_def("late_uploads").minimum_interval_seconds == 3600


def _cfg(tmp_path: Path):
    raw = {"tasks": {"t": {"folder": "gs://b/t", "labels": {"a": "a"}}},
           "uploads": {"table": "image_uploads", "allowed_roots": ["gs://b/uploads"]},
           "partitions": {"start_date": dt.date(2026, 2, 1), "timezone": "Asia/Seoul", "late_upload_days": 3},
           "storage": {"root": str(tmp_path)}}
    return parse_config(yaml.safe_load(yaml.safe_dump(raw)), base_dir=tmp_path)


def _upload(wh, rows: list[tuple[str, dt.datetime]]):
    wh.write_table("image_uploads", pd.DataFrame(
        {"image_id": [i for i, _ in rows], "image_uri": [f"gs://b/uploads/{i}.jpg" for i, _ in rows],
         "uploaded_at": [at.astimezone(dt.UTC) for _, at in rows]}), IMAGE_UPLOADS)


def test_a_committed_day_that_gains_uploads_is_predicted_again(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    resource = DuckDBWarehouseResource(path=str(tmp_path / "wh.duckdb"))
    wh: DuckDBWarehouse = resource.get()
    day = dt.date(2026, 3, 1)
    committed = [("a", dt.datetime(2026, 3, 1, 9, tzinfo=SEOUL)), ("b", dt.datetime(2026, 3, 1, 23, 30, tzinfo=SEOUL))]
    next_day = [("c", dt.datetime(2026, 3, 2, 0, 30, tzinfo=SEOUL))]  # 2026-03-01 15:30 UTC: a Seoul 2 March photo
    _upload(wh, committed + next_day)
    instance = dg.DagsterInstance.ephemeral()
    for d, n in ((day, 2), (dt.date(2026, 3, 2), 1)):
        instance.report_runless_asset_event(dg.AssetMaterialization(PREDICTIONS_KEY, partition=d.isoformat(),
                                                                    metadata={"uploads": n}))
    job = dg.define_asset_job("daily_predictions_job", selection=[PREDICTIONS_KEY])
    sensor = build_late_upload_sensor(cfg, job)
    monkeypatch.setattr("sofar_assets.defs.late_uploads.dt.datetime",
                        type("Now", (dt.datetime,), {"now": classmethod(lambda c, tz=None: dt.datetime(
                            2026, 3, 3, 10, tzinfo=tz))}))

    def evaluate():
        with dg.build_sensor_context(instance=instance, resources={"warehouse": resource}) as ctx:
            return list(sensor(ctx) or [])

    (skip,) = evaluate()  # both days were committed with every upload they have
    assert isinstance(skip, dg.SkipReason)
    # a photo taken on 1 March (Seoul) arrives after the day's run committed it
    _upload(wh, committed + next_day + [("late", dt.datetime(2026, 3, 1, 22, tzinfo=SEOUL))])
    (request,) = evaluate()
    assert isinstance(request, dg.RunRequest) and request.partition_key == "2026-03-01"
    assert request.run_key == "late-2026-03-01-3" and request.tags["sofar/late_uploads"] == "2->3"
    # once the re-run commits 3 uploads, the day is quiet again
    instance.report_runless_asset_event(dg.AssetMaterialization(PREDICTIONS_KEY, partition="2026-03-01",
                                                                metadata={"uploads": 3}))
    assert isinstance(evaluate()[0], dg.SkipReason)
