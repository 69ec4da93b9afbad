"""The ONE daily prediction table: every photo uploaded on a day, top-2 labels + OOD flag."""

import datetime as dt
import functools
from collections.abc import Iterator
from zoneinfo import ZoneInfo

import dagster as dg
import pandas as pd

from sofar_assets.config import SofarConfig
from sofar_assets.defs.k8s import step_tags
from sofar_assets.defs.model import OWNERS
from sofar_assets.defs.resources import ImageStoreResource, MlflowResource, WarehouseResource
from sofar_assets.lib import registry, storage
from sofar_assets.lib.inference import PREDICTION_COLUMNS, predict_images
from sofar_assets.lib.packaging import load_registered
from sofar_assets.lib.uploads import Upload, iter_folder_day, iter_table_uploads, with_refused
from sofar_assets.lib.warehouse import uploads_from_table

PREDICTIONS_TABLE = "predictions"
TABLE_SCHEMA = {  # the columns of the warehouse table, in order, with their pandas dtypes
    "prediction_date": "object",  # datetime.date -> DATE in DuckDB and BigQuery
    "image_id": "string",
    "image_uri": "string",
    "top1_label": "string",
    "top1_prob": "float64",
    "top2_label": "string",
    "top2_prob": "float64",
    "ood_score": "float64",
    "is_ood": "boolean",
    "error": "string",
    "model_name": "string",
    "model_version": "string",
    "predicted_at": "datetime64[us]",
}
TRAILING_DAYS = 7


def day_window(cfg: SofarConfig, day: dt.date) -> tuple[dt.datetime, dt.datetime]:
    """The partition's day as an aware [start, end) in ``partitions.timezone`` (not UTC midnight)."""
    tz = ZoneInfo(cfg.partitions.timezone)
    start = dt.datetime.combine(day, dt.time(), tzinfo=tz)
    return start, dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tzinfo=tz)


def day_uploads(cfg: SofarConfig, day: dt.date, warehouse) -> Iterator[Upload]:
    """One :class:`Upload` per photo uploaded on ``day`` (in the partitions' timezone): readable, or
    an error record (bad link, pipe, URI outside ``uploads.allowed_roots``) that is never read."""
    if cfg.uploads.folder is not None:
        return iter_folder_day(cfg.resolve(cfg.uploads.folder), day, allowed_roots=cfg.upload_roots)
    df = uploads_from_table(warehouse, cfg.uploads.table, *day_window(cfg, day))
    return iter_table_uploads(zip(df["image_id"], df["image_uri"], strict=True), cfg.upload_roots)


def table_rows(scored: pd.DataFrame, day: dt.date, model_name: str, model_version: str) -> pd.DataFrame:
    """One day's rows of the predictions table from ``predict_images`` output."""
    rows = scored.assign(prediction_date=day, model_name=model_name, model_version=model_version,
                         predicted_at=pd.Timestamp.now(tz="UTC").tz_localize(None))
    return rows.reindex(columns=list(TABLE_SCHEMA)).astype(
        {k: v for k, v in TABLE_SCHEMA.items() if k != "prediction_date"}  # dates stay datetime.date
    )


def _trailing(wh, day: dt.date) -> pd.DataFrame:
    """The scored (non-error) rows of the trailing window before ``day``."""
    if not wh.table_exists(PREDICTIONS_TABLE):
        return pd.DataFrame(columns=list(TABLE_SCHEMA))
    past = wh.read_range(PREDICTIONS_TABLE, "prediction_date", day - dt.timedelta(days=TRAILING_DAYS), day)
    return past[past["error"].isna()]


def build_prediction_assets(cfg: SofarConfig):
    partitions = dg.DailyPartitionsDefinition(
        start_date=cfg.partitions.start_date.isoformat(), timezone=cfg.partitions.timezone
    )

    @dg.asset(
        partitions_def=partitions,
        backfill_policy=dg.BackfillPolicy.single_run() if cfg.partitions.backfill_days_per_run is None
        else dg.BackfillPolicy.multi_run(cfg.partitions.backfill_days_per_run),
        deps=["champion_model"],
        group_name="predictions",
        kinds={cfg.storage.warehouse.kind, "pytorch"},
        owners=OWNERS,
        code_version="1",
        metadata={"table": PREDICTIONS_TABLE, "partition_expr": "prediction_date"},
        op_tags=step_tags(cfg, gpu=True, workers=cfg.inference.num_workers),
        check_specs=[
            dg.AssetCheckSpec("rows_match_uploads", asset="daily_predictions",
                              description="One row per uploaded photo for every day in the run (error rows included)."),
            dg.AssetCheckSpec("ood_rate_vs_trailing_7_days", asset="daily_predictions",
                              description="Warns when a day's OOD share spikes against the trailing 7 days."),
            dg.AssetCheckSpec("label_mix_vs_trailing_7_days", asset="daily_predictions",
                              description="Warns when a day's top-1 label distribution drifts from the trailing 7 days."),
        ],
    )
    def daily_predictions(
        context: dg.AssetExecutionContext, warehouse: WarehouseResource, mlflow_tracking: MlflowResource, image_store: ImageStoreResource
    ):
        """Top-2 labels, max-logit OOD score and OOD flag for every photo uploaded that day,
        by the MLflow ``champion`` version with its own temperature and threshold. Rows land in
        the warehouse table ``predictions`` (``prediction_date`` is a DATE); a re-run replaces
        exactly the days it covers. A backfill range runs as one run (or, with
        ``partitions.backfill_days_per_run``, fans out into runs of N days): the model loads once
        per run.
        """
        window = context.partition_time_window
        first, last = window.start.date(), window.end.date()
        days = [first + dt.timedelta(days=i) for i in range((last - first).days)]
        wh = warehouse.get()
        client = mlflow_tracking.client()
        name = cfg.model.name
        try:
            mv = registry.champion(client, name)
            calibration = registry.read_calibration(mv)
        except (registry.NoChampionError, registry.UncalibratedError) as exc:
            raise dg.Failure(description=str(exc)) from exc
        threshold, temperature, method = calibration.threshold, calibration.temperature, calibration.score_method
        model, meta = load_registered(f"models:/{name}/{mv.version}")
        context.log.info(f"{name} v{mv.version} loaded once for {len(days)} day(s): {days[0]} .. {days[-1]}")

        # ONE streaming pass (one DataLoader, one set of workers) over every day of the run; each
        # day is written as soon as its rows are complete, so a crash keeps the finished days.
        day_items = [(day, list(day_uploads(cfg, day, wh))) for day in days]
        stream = predict_images(  # only what may be read, by its real path; refused uploads become error rows
            model, [(u.image_id, u.path) for _, ups in day_items for u in ups if u.path is not None], classes=list(meta["classes"]),
            image_size=int(meta["spec"]["image_size"]), threshold=threshold, score_method=method,
            temperature=temperature, batch_size=cfg.inference.batch_size, num_workers=cfg.inference.num_workers,
            device=cfg.inference.device, max_bytes=cfg.inference.max_bytes,
            read_bytes=functools.partial(storage.read_bytes, max_bytes=cfg.inference.max_bytes),
            log=context.log.info,
        )
        pending = pd.DataFrame(columns=list(PREDICTION_COLUMNS))  # scored rows not yet written

        per_day, failures, checks_rows, checks_ood, checks_mix = {}, [], [], [], []
        for day, items in day_items:
            n = sum(u.path is not None for u in items)
            while len(pending) < n:
                pending = pd.concat([pending, next(stream)], ignore_index=True)
            df, pending = pending.iloc[:n], pending.iloc[n:].reset_index(drop=True)
            df = table_rows(with_refused(items, df), day, name, str(mv.version))
            past = _trailing(wh, day)  # read before this day's rows are replaced
            written = wh.replace_partition(PREDICTIONS_TABLE, df, "prediction_date", day, day + dt.timedelta(days=1))
            ok = df[df["error"].isna()]
            errors = df[df["error"].notna()]
            for err in errors["error"]:
                context.log.warning(f"{day}: {err}")
            ood_rate = float(ok["is_ood"].mean()) if len(ok) else 0.0
            per_day[day.isoformat()] = {"uploads": len(items), "rows": written, "errors": len(errors),
                                        "ood": int(ok["is_ood"].sum()), "ood_rate": round(ood_rate, 4)}
            if not items:
                context.log.info(f"{day}: no uploads; 0 rows written")
            if items and errors.shape[0] == len(items):
                failures.append(day)
            # read back what the table now holds for the day: catches lost or duplicated rows
            stored = len(wh.read_range(PREDICTIONS_TABLE, "prediction_date", day, day + dt.timedelta(days=1),
                                       columns=["image_id"]))
            per_day[day.isoformat()]["stored"] = stored
            checks_rows.append(written == stored == len(items))
            if len(past) and len(ok):
                base = float(past["is_ood"].mean())  # the trailing week's share, weighted by rows
                checks_ood.append((day, ood_rate, base, ood_rate <= max(2 * base, base + 0.15)))
                p = past["top1_label"].value_counts(normalize=True)
                q = ok["top1_label"].value_counts(normalize=True)
                tv = 0.5 * float(p.subtract(q, fill_value=0).abs().sum())  # total variation distance
                checks_mix.append((day, tv, tv <= 0.5))
        total = {k: sum(d[k] for d in per_day.values()) for k in ("uploads", "rows", "errors", "ood")}
        summary = pd.DataFrame(per_day).T
        yield dg.MaterializeResult(
            metadata={
                "dagster/row_count": total["rows"],
                "days": len(days),
                "rows": total["rows"],
                "error_rows": total["errors"],
                "ood_rows": total["ood"],
                "empty_days": dg.MetadataValue.json([d for d, v in per_day.items() if v["uploads"] == 0]),
                "per_day": dg.MetadataValue.md(summary.to_markdown()),
                "model_version": str(mv.version),
                "model_uri": f"models:/{name}/{mv.version}",
                "ood_threshold": threshold,
                "temperature": temperature,
            },
            check_results=[
                dg.AssetCheckResult(check_name="rows_match_uploads", passed=all(checks_rows),
                                    metadata={"per_day": dg.MetadataValue.json(per_day)}),
                dg.AssetCheckResult(
                    check_name="ood_rate_vs_trailing_7_days", severity=dg.AssetCheckSeverity.WARN,
                    passed=all(c[3] for c in checks_ood),
                    metadata={"days": dg.MetadataValue.json(
                        {d.isoformat(): {"ood_rate": r, "trailing": round(b, 4)} for d, r, b, _ in checks_ood}),
                        "compared_days": len(checks_ood)},
                ),
                dg.AssetCheckResult(
                    check_name="label_mix_vs_trailing_7_days", severity=dg.AssetCheckSeverity.WARN,
                    passed=all(c[2] for c in checks_mix),
                    metadata={"total_variation": dg.MetadataValue.json({d.isoformat(): round(t, 4) for d, t, _ in checks_mix}),
                              "compared_days": len(checks_mix)},
                ),
            ],
        )
        if failures:
            raise dg.Failure(
                description=f"every image failed on {', '.join(map(str, failures))}; their error rows were written "
                "to the predictions table — check the image store and the errors in those rows."
            )

    job = dg.define_asset_job(
        "daily_predictions_job", selection=[daily_predictions], partitions_def=partitions,
        description="Predict one day's uploads (the schedule runs yesterday's partition).",
    )
    schedule = dg.build_schedule_from_partitioned_job(
        job, hour_of_day=cfg.partitions.schedule_hour,
        default_status=dg.DefaultScheduleStatus.RUNNING if cfg.partitions.schedule_enabled
        else dg.DefaultScheduleStatus.STOPPED,
    )
    return daily_predictions, job, schedule
