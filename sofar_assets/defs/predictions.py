"""The ONE daily prediction table: every photo uploaded on a day, top-2 labels, label set + OOD flag.

``daily_predictions`` is a graph-backed asset of three steps, so that a day can be spread over
several pods and still be committed at once:

    plan_shards ──(one unit per shard, sized by the day)──> score_shard × n ──> commit_days

* ``plan_shards`` resolves the champion ONCE for the run (every shard scores with the same
  version), lists each day of the run ONCE into a manifest (lib/data/manifest.py: staged Parquet,
  streamed from the folder or the uploads table in pages), gives each day
  ``ceil(uploads / inference.images_per_shard)`` shards (at most ``inference.max_shards``; or
  ``inference.shards_per_day`` when set) and emits one work unit per step through Dagster's
  dynamic outputs: slices (row ranges of a day's manifest), quiet days packed together.
* ``score_shard`` loads the model once, streams its slices of the manifests through the model
  and stages the rows as parquet at ``<root>/staging/predictions/<day>/<run_id>/shard-k-of-n
  .parquet`` (one step, i.e. one Kubernetes pod under ``k8s_job_executor``, per unit).
* ``commit_days`` replaces each day with ONE ``replace_day`` from all its shards' files (a crash
  leaves the old day or the new one, never a mix), reads the count back, computes the drift
  checks in the warehouse and records each day's numbers on THAT partition.

Steps pass small JSON-able dicts (file URIs and counts), never rows.
"""

import datetime as dt
import functools
from collections.abc import Iterator

import dagster as dg
import pandas as pd

from sofar_assets.config import SofarConfig
from sofar_assets.defs.k8s import step_tags
from sofar_assets.defs.metadata import at_a_glance
from sofar_assets.defs.model import OWNERS
from sofar_assets.defs.resources import MlflowResource, WarehouseResource
from sofar_assets.defs.runs import max_runtime_tags
from sofar_assets.lib.common.names import md_frame
from sofar_assets.lib.data import manifest, storage
from sofar_assets.lib.data.days import day_window, run_days, span
from sofar_assets.lib.data.uploads import Upload
from sofar_assets.lib.model import plots
from sofar_assets.lib.review import queue as review
from sofar_assets.lib.review.run_counts import RunCounts, run_counts
from sofar_assets.lib.serving import daily, registry, shards
from sofar_assets.lib.warehouse import PREDICTIONS
from sofar_assets.lib.warehouse.uploads import day_uploads

PREDICTIONS_TABLE = PREDICTIONS.name
PARTITION_COLUMN = PREDICTIONS.partition_column
CHECKS = {
    "rows_match_uploads": "One row per uploaded photo for every day in the run (error rows included), "
    "read back from the table after the day's single commit.",
    "ood_rate_vs_trailing_7_days": "Warns when a day's OOD share spikes against the trailing 7 days "
    "(lib/review/drift.py: ood_spike).",
    "label_mix_vs_trailing_7_days": "Warns when a day's top-1 label mix drifts from the trailing 7 days "
    "(lib/review/drift.py: total variation > LABEL_TV_MAX).",
    "uploads_found": "Warns when a day of the run has no uploads at all, naming where it looked (a missing "
    "day folder or an empty window of the uploads table usually means the upload job did not run).",
}
AT_A_GLANCE = ("uploads", "rows", "error_rows", "ood_rows", "ood_rate", "shards")  # a partition's own numbers
REVIEW_QUEUE_ON_SHEET = 18  # photos per day on a partition's review sheet (`sofar review DAY` lists more)


def uploads_location(cfg: SofarConfig, day: dt.date) -> str:
    """Where ``day``'s uploads are looked for, as a person would check it."""
    if cfg.uploads.folder is not None:
        return f"{cfg.resolve(cfg.uploads.folder).rstrip('/')}/{day.isoformat()}"
    start, end = day_window(day, cfg.partitions.timezone)
    return f"table {cfg.uploads.table}, uploaded_at in [{start.isoformat()}, {end.isoformat()})"


def review_metadata(wh, day: dt.date, facts: dict, counts: dict[str, int], read=storage.read_bytes,
                    review_url: str = "http://127.0.0.1:8765") -> dict:
    """A partition's review queue (lib/review/queue.py: OOD-flagged photos, then those whose label set
    holds other than one label, most uncertain first): its size per reason (``counts``, from the
    run's grouped query), and the first photos as a sheet with their top-2, label set and OOD
    score (``sofar review DAY`` draws the same), and a link to the review page on that day
    (``sofar review --serve``)."""
    md = {"review_queue": sum(counts.values()), "review_queue_by_reason": dg.MetadataValue.json(counts),
          "review_page": dg.MetadataValue.url(f"{review_url.rstrip('/')}/?day={day.isoformat()}")}
    queue = review.review_queue(wh, PREDICTIONS_TABLE, day, limit=REVIEW_QUEUE_ON_SHEET)
    if queue.empty:
        return md
    sheet = review.review_sheet_png(queue, read, thumb=96, title=(
        f"{day}: {facts['rows']} rows, {facts['ood_rows']} OOD-flagged, {facts['error_rows']} errors; "
        f"review queue {sum(counts.values())}, first {len(queue)}"))
    return md | {"review_sheet": dg.MetadataValue.md(plots.png_to_markdown(sheet, f"review {day}")),
                 "review_rows": dg.MetadataValue.md(  # names escaped: a newline or '|' cannot break the table
                     md_frame(queue.drop(columns=["image_uri"])).to_markdown(index=False))}


def uploads_of_day(cfg: SofarConfig, day: dt.date, warehouse) -> Iterator[Upload]:
    """``day``'s uploads where this deployment keeps them (lib/warehouse/uploads.py: day_uploads)."""
    folder = cfg.resolve(cfg.uploads.folder) if cfg.uploads.folder is not None else None
    return day_uploads(day, timezone=cfg.partitions.timezone, allowed_roots=cfg.upload_roots, folder=folder,
                       table=cfg.uploads.table, warehouse=warehouse)


def list_day(cfg: SofarConfig, day: dt.date, warehouse, run_id: str) -> tuple[str, int]:
    """List ``day``'s uploads ONCE into its manifest, staged under ``storage.root``: (URI, count)."""
    return shards.list_day(uploads_of_day(cfg, day, warehouse), cfg.root, day, run_id)


def partition_days(context) -> list[dt.date]:
    """The days of a run: one partition or a single-run range."""
    window = context.partition_time_window
    return run_days(window.start, window.end)


def predict_settings(cfg: SofarConfig, log) -> dict:
    """The inference settings a shard step streams with (lib/serving/inference.py: predict_images)."""
    inf = cfg.inference
    return {
        "batch_size": inf.batch_size, "num_workers": inf.num_workers, "device": inf.device,
        "read_bytes": storage.read_bytes, "max_bytes": inf.max_bytes, "reads_in_flight": inf.reads_in_flight,
        # within: a local upload is opened without following links, under the roots it was checked in;
        # pool_size: the gs:// connection pool, one connection per read in flight
        "read_kwargs": {"timeout_s": inf.read_timeout_s, "retries": inf.read_retries,
                        "within": cfg.upload_roots, "pool_size": inf.reads_in_flight},
        "log": log, "log_every": inf.log_every,
    }


def plan_units(cfg: SofarConfig, context, client, wh) -> list[dict]:
    """The run's shard steps: the champion's unit once, each day listed once, shards sized by the day."""
    days = partition_days(context)
    try:
        unit, warning = shards.champion_unit(client, cfg.model.name, context.run_id,
                                             cfg.storage.mlflow.artifacts_destination)
    except (registry.NoChampionError, registry.UncalibratedError) as exc:
        raise dg.Failure(description=str(exc)) from exc
    if warning:
        context.log.warning(warning)
    # each day listed ONCE for the run; the shards read slices of its manifest
    listed = {day.isoformat(): list_day(cfg, day, wh, context.run_id) for day in days}
    inf = cfg.inference
    units = manifest.pack(listed, images_per_shard=inf.images_per_shard, max_shards=inf.max_shards,
                          fixed_shards=inf.shards_per_day)
    per_day = {s["day"]: s["shards"] for u in units for s in u}
    for day, (_, count) in listed.items():
        context.log.info(f"{day}: {count} uploads listed -> {per_day[day]} shard(s)"
                         + (" (no uploads: one shard commits the empty day)" if not count else ""))
    context.log.info(f"{unit['model_uri']} for {len(days)} day(s) {span(days)}: {len(units)} shard step(s)")
    return [unit | {"step": k, "steps": len(units), "slices": slices} for k, slices in enumerate(units)]


def commit_run(cfg: SofarConfig, context, shard_results: list, wh) -> tuple[list, dict, RunCounts]:
    """Commit each day of the run once all its shards are in (one ``replace_day`` each), then ONE
    grouped query reads back every day's rows, queue and drift counts; each partition gets its own
    numbers. Returns (days, per-day facts, the counts)."""
    days = partition_days(context)
    written = {}
    for day in days:
        parts = [r["days"][day.isoformat()] for r in shard_results if day.isoformat() in r["days"]]
        written[day] = daily.write_day(wh, PREDICTIONS, day, parts) | {
            "shards": max((p["shards"] for p in parts), default=0)}
    counts = run_counts(wh, PREDICTIONS_TABLE, days)
    read_upload = functools.partial(storage.read_bytes, within=cfg.upload_roots)  # the review sheets
    per_day = {}
    for day in days:
        facts = per_day[day.isoformat()] = daily.read_back(written[day], counts.rows(day))
        context.add_asset_metadata(  # THIS partition's own numbers and photos, not the run's totals
            {"dagster/row_count": facts["rows"]}
            | at_a_glance({k: facts[k] for k in AT_A_GLANCE})
            | review_metadata(wh, day, facts, counts.queue(day), read_upload, cfg.ui.review_url),
            partition_key=day.isoformat())
        context.log.info(f"{day}: {facts['rows']} rows committed from {len(facts['files'])} shard file(s) of "
                         f"{facts['shards']} shard(s), {facts['error_rows']} errors, {facts['ood_rows']} OOD"
                         + ("; no uploads: the day is committed empty" if not facts["uploads"] else ""))
    daily.remove_staged(f for facts in per_day.values() for f in facts.pop("files"))
    daily.remove_staged({daily.manifest_uri(cfg.root, day, context.run_id) for day in days})
    return days, per_day, counts


def run_facts(days: list, per_day: dict, shard_results: list) -> dict:
    """The run's facts, recorded on each of its partitions after their own numbers."""
    return {
        "days": len(days),
        "run_days": dg.MetadataValue.text(span(days)),
        "run_rows": sum(d["rows"] for d in per_day.values()),
        "empty_days": dg.MetadataValue.json([d for d, v in per_day.items() if v["uploads"] == 0]),
        "per_day": dg.MetadataValue.md(pd.DataFrame(per_day).T.to_markdown()),
        "shards_per_day": dg.MetadataValue.json({d: v["shards"] for d, v in per_day.items()}),
        "shard_steps": len(shard_results),
        "model_version": shard_results[0]["model_version"] if shard_results else None,
    }


def check_results(cfg: SofarConfig, context, days: list, per_day: dict, counts: RunCounts) -> list:
    """The run's four checks: rows read back, OOD share and label mix vs the trailing week, uploads found."""
    which = f"days {span(days)}"  # which days a check speaks of
    ood, mix = counts.drift()
    missing = {d: uploads_location(cfg, dt.date.fromisoformat(d))
               for d, v in per_day.items() if v["uploads"] == 0}
    for d, where in missing.items():
        context.log.warning(f"{d}: no uploads found in {where}")
    return [
        dg.AssetCheckResult(check_name="rows_match_uploads", passed=all(f["ok"] for f in per_day.values()),
                            description=which, metadata={"days": dg.MetadataValue.text(span(days)),
                                                         "per_day": dg.MetadataValue.json(per_day)}),
        dg.AssetCheckResult(
            check_name="ood_rate_vs_trailing_7_days", severity=dg.AssetCheckSeverity.WARN,
            passed=not any(v["spike"] for v in ood.values()), description=which,
            metadata={"days": dg.MetadataValue.json({d.isoformat(): v for d, v in ood.items()}),
                      "compared_days": dg.MetadataValue.text(str(len(ood)))}),
        dg.AssetCheckResult(
            check_name="label_mix_vs_trailing_7_days", severity=dg.AssetCheckSeverity.WARN,
            passed=not any(v["drift"] for v in mix.values()), description=which,
            metadata={"total_variation": dg.MetadataValue.json(
                {d.isoformat(): round(v["total_variation"], 4) for d, v in mix.items()}),
                "compared_days": dg.MetadataValue.text(str(len(mix)))}),
        dg.AssetCheckResult(
            check_name="uploads_found", severity=dg.AssetCheckSeverity.WARN, passed=not missing,
            description=which, metadata={"days_without_uploads": dg.MetadataValue.json(missing),
                                         "days": dg.MetadataValue.text(span(days))}),
    ]


def plan_shards_op(cfg: SofarConfig):
    @dg.op(out=dg.DynamicOut(dict), ins={"champion_model": dg.In(dg.Nothing)})
    def plan_shards(context: dg.OpExecutionContext, mlflow_tracking: MlflowResource,
                    warehouse: WarehouseResource):
        """Resolve the champion once for the run, list each day once into its manifest, size each
        day's shards by its upload count and emit one unit per shard step."""
        for unit in plan_units(cfg, context, mlflow_tracking.client(), warehouse.get()):
            yield dg.DynamicOutput(unit, mapping_key=f"shard_{unit['step']}")

    return plan_shards


def score_shard_op(cfg: SofarConfig):
    holds_gpu = cfg.inference.device != "cpu" and cfg.inference.runtime == "torch"

    @dg.op(pool="gpu" if holds_gpu else None,
           tags=step_tags(cfg, gpu=holds_gpu, workers=cfg.inference.num_workers))
    def score_shard(context: dg.OpExecutionContext, unit: dict, mlflow_tracking: MlflowResource) -> dict:
        """Score this step's slices (row ranges of the days' manifests) in one streaming pass; stage each
        slice's rows."""
        mlflow_tracking.client()  # this step may be its own process (a pod): point mlflow at the registry
        try:  # once per step (pod), on torch or ONNX Runtime
            model, meta = shards.load_unit_model(unit, cfg.inference.runtime, cfg.inference.device)
        except shards.ShardError as exc:
            raise dg.Failure(description=str(exc)) from exc
        source = unit.get("model_source") or "the tracking server"
        context.log.info(f"{unit['model_uri']} loaded for shard {unit['step'] + 1}/{unit['steps']} from "
                         f"{source} (runtime {cfg.inference.runtime})")
        return shards.score_unit(model, meta, unit, root=cfg.root,
                                 predict_kwargs=predict_settings(cfg, context.log.info))

    return score_shard


def commit_days_op(cfg: SofarConfig):
    @dg.op(pool="warehouse_write", out={"result": dg.Out(dg.Nothing),
                **{f"daily_predictions_{c}": dg.Out(dg.Nothing, is_required=False) for c in CHECKS}})
    def commit_days(context: dg.AssetExecutionContext, shard_results: list, warehouse: WarehouseResource):
        """Commit each day once all its shards are in (``daily.write_day``, ONE ``replace_day`` per
        day); read back; checks; per-partition metadata."""
        days, per_day, counts = commit_run(cfg, context, shard_results, warehouse.get())
        facts = run_facts(days, per_day, shard_results)
        for day in days:  # after each partition's own numbers (Output metadata would come first)
            context.add_asset_metadata(facts, partition_key=day.isoformat())
        yield dg.Output(None, "result")
        yield from check_results(cfg, context, days, per_day, counts)
        failures = [d for d, f in per_day.items() if f["uploads"] and f["error_rows"] == f["uploads"]]
        if failures:
            raise dg.Failure(
                description=f"every image failed on {', '.join(failures)}; their error rows were written "
                "to the predictions table — check the image store and the errors in those rows."
            )

    return commit_days


def build_prediction_assets(cfg: SofarConfig):
    partitions = dg.DailyPartitionsDefinition(
        start_date=cfg.partitions.start_date.isoformat(), timezone=cfg.partitions.timezone
    )
    plan_shards, score_shard, commit_days = plan_shards_op(cfg), score_shard_op(cfg), commit_days_op(cfg)

    @dg.graph_asset(
        partitions_def=partitions,
        backfill_policy=dg.BackfillPolicy.single_run() if cfg.partitions.backfill_days_per_run is None
        else dg.BackfillPolicy.multi_run(cfg.partitions.backfill_days_per_run),
        ins={"champion_model": dg.AssetIn(dagster_type=dg.Nothing)},
        group_name="predictions",
        kinds={cfg.storage.warehouse.kind, "pytorch"},
        owners=OWNERS,
        code_version="3",
        metadata={"table": PREDICTIONS_TABLE, "partition_expr": PARTITION_COLUMN},
        check_specs=[dg.AssetCheckSpec(c, asset="daily_predictions", description=d)
                     for c, d in CHECKS.items()],
    )
    def daily_predictions(champion_model):
        """Top-2 labels, conformal label set, OOD score (``ood.score``) and OOD flag for every
        photo uploaded that day, by the MLflow ``champion`` version with its own temperature,
        threshold and label-set rule; each partition's metadata carries its review queue. Rows land in
        the warehouse table ``predictions`` (``prediction_date`` is a DATE); each day of a run is
        replaced at once, after all its rows are scored (a day of N uploads in
        ``ceil(N / inference.images_per_shard)`` steps, at most ``inference.max_shards``). A backfill
        range runs as one run (or, with ``partitions.backfill_days_per_run``, fans out into runs of N
        days): the model loads once per shard step.
        """
        return commit_days(plan_shards(champion_model).map(score_shard).collect())

    job = dg.define_asset_job(
        "daily_predictions_job", selection=[daily_predictions], partitions_def=partitions,
        description="Predict one day's uploads (the schedule runs yesterday's partition).",
        tags=max_runtime_tags("daily_predictions_job"),
    )
    schedule = dg.build_schedule_from_partitioned_job(
        job, hour_of_day=cfg.partitions.schedule_hour,
        default_status=dg.DefaultScheduleStatus.RUNNING if cfg.partitions.schedule_enabled
        else dg.DefaultScheduleStatus.STOPPED,
    )
    return daily_predictions, job, schedule
