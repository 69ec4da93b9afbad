"""Late uploads: a day that gained photos after it was committed is predicted again.

The day is SOCAR's business day (``partitions.timezone``, Asia/Seoul in production). The schedule
runs a day ``partitions.schedule_hour`` hours after it ends: that is the lateness window every
upload gets for free. An upload that arrives later still (a phone offline overnight, a delayed
upload job) would be missing from the committed day forever, so this sensor compares, for each of
the last ``partitions.late_upload_days`` days, the uploads found NOW with the ``uploads`` count the
day's latest commit recorded, and re-runs the day when there are more. The re-run replaces the day
at once (``replace_day``), so readers see the old day or the new one. One request per (day, count):
a day is not re-run again until yet more uploads arrive.
"""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import dagster as dg

from sofar_assets.config import SofarConfig
from sofar_assets.defs.predictions import uploads_of_day
from sofar_assets.defs.resources import WarehouseResource
from sofar_assets.lib.data.days import day_window

PREDICTIONS_KEY = dg.AssetKey("daily_predictions")


def uploads_now(cfg: SofarConfig, day: dt.date, wh) -> int:
    """How many photos ``day`` has now, looked up where the day's run looks for them."""
    if cfg.uploads.table is not None:
        return wh.count_range(cfg.uploads.table, "uploaded_at", *day_window(day, cfg.partitions.timezone))
    return sum(1 for _ in uploads_of_day(cfg, day, wh))


def committed_uploads(instance: dg.DagsterInstance, day: dt.date) -> int | None:
    """The ``uploads`` count of ``day``'s latest commit, or None when the day was never committed."""
    result = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=PREDICTIONS_KEY, asset_partitions=[day.isoformat()]), limit=1, ascending=False)
    if not result.records:
        return None
    value = result.records[0].asset_materialization.metadata.get("uploads")
    return None if value is None else int(value.value)


def late_days(cfg: SofarConfig, instance: dg.DagsterInstance, wh, today: dt.date) -> dict[dt.date, tuple[int, int]]:
    """Committed days among the last ``late_upload_days`` with more uploads now: day -> (then, now)."""
    out = {}
    for back in range(1, cfg.partitions.late_upload_days + 1):
        day = today - dt.timedelta(days=back)
        if day < cfg.partitions.start_date:
            break
        then = committed_uploads(instance, day)
        if then is None:
            continue  # not committed yet: the schedule (or a backfill) runs it
        now = uploads_now(cfg, day, wh)
        if now > then:
            out[day] = (then, now)
    return out


def build_late_upload_sensor(cfg: SofarConfig, job: dg.JobDefinition | dg.UnresolvedAssetJobDefinition):
    @dg.sensor(
        name="late_uploads", job=job, minimum_interval_seconds=3600,
        default_status=dg.DefaultSensorStatus.RUNNING if cfg.partitions.schedule_enabled
        else dg.DefaultSensorStatus.STOPPED,
        description=f"Re-runs a committed day of the last {cfg.partitions.late_upload_days} days "
        "(partitions.late_upload_days) that has more uploads now than its commit counted.",
    )
    def late_uploads(context: dg.SensorEvaluationContext, warehouse: WarehouseResource):
        today = dt.datetime.now(ZoneInfo(cfg.partitions.timezone)).date()
        late = late_days(cfg, context.instance, warehouse.get(), today)
        for day, (then, now) in sorted(late.items()):
            context.log.info(f"{day}: {now} uploads now, {then} when it was committed: predicting the day again")
            yield dg.RunRequest(run_key=f"late-{day.isoformat()}-{now}", partition_key=day.isoformat(),
                                tags={"sofar/late_uploads": f"{then}->{now}"})
        if not late:
            yield dg.SkipReason(f"no committed day of the last {cfg.partitions.late_upload_days} has new uploads")

    return late_uploads
