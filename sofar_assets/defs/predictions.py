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
from pathlib import Path
from zoneinfo import ZoneInfo

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
from sofar_assets.lib.data.uploads import Upload, iter_folder_day, iter_table_uploads
from sofar_assets.lib.model import ood, plots
from sofar_assets.lib.model.conformal import LabelSets
from sofar_assets.lib.review import drift
from sofar_assets.lib.review import queue as review
from sofar_assets.lib.serving import daily, registry
from sofar_assets.lib.serving.packaging import load_registered
from sofar_assets.lib.serving.predictor import make_runner
from sofar_assets.lib.warehouse import PREDICTIONS, ParquetSpool, iter_uploads

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
REVIEW_QUEUE_ON_SHEET = 18  # photos per day on a partition's review sheet (`sofar review DAY` lists more)


def uploads_location(cfg: SofarConfig, day: dt.date) -> str:
    """Where ``day``'s uploads are looked for, as a person would check it."""
    if cfg.uploads.folder is not None:
        return f"{cfg.resolve(cfg.uploads.folder).rstrip('/')}/{day.isoformat()}"
    start, end = day_window(cfg, day)
    return f"table {cfg.uploads.table}, uploaded_at in [{start.isoformat()}, {end.isoformat()})"


def review_metadata(wh, day: dt.date, facts: dict, read=storage.read_bytes,
                    review_url: str = "http://127.0.0.1:8765") -> dict:
    """A partition's review queue (lib/review/queue.py: OOD-flagged photos, then those whose label set
    holds other than one label, most uncertain first): its size per reason, and the first photos
    as a sheet with their top-2, label set and OOD score (``sofar review DAY`` draws the same), and
    a link to the review page on that day (``sofar review --serve``)."""
    counts = review.review_queue_counts(wh, PREDICTIONS_TABLE, day)
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


def day_window(cfg: SofarConfig, day: dt.date) -> tuple[dt.datetime, dt.datetime]:
    """The partition's day as an aware [start, end) in ``partitions.timezone`` (not UTC midnight)."""
    tz = ZoneInfo(cfg.partitions.timezone)
    start = dt.datetime.combine(day, dt.time(), tzinfo=tz)
    return start, dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tzinfo=tz)


def day_uploads(cfg: SofarConfig, day: dt.date, warehouse) -> Iterator[Upload]:
    """One :class:`Upload` per photo uploaded on ``day`` (in the partitions' timezone), streamed:
    readable, or an error record (bad link, pipe, URI outside ``uploads.allowed_roots``) that
    becomes an error row without being read. The uploads table is read in pages
    (``iter_uploads``): memory holds one page, whatever the day's size."""
    if cfg.uploads.folder is not None:
        return iter_folder_day(cfg.resolve(cfg.uploads.folder), day, allowed_roots=cfg.upload_roots)
    pages = iter_uploads(warehouse, cfg.uploads.table, *day_window(cfg, day))
    return iter_table_uploads(((i, u) for page in pages for i, u in zip(page["image_id"], page["image_uri"],
                                                                        strict=True)), cfg.upload_roots)


def list_day(cfg: SofarConfig, day: dt.date, warehouse, run_id: str) -> tuple[str, int]:
    """List ``day``'s uploads ONCE into its manifest, staged under ``storage.root``; returns
    (manifest URI, count). Memory holds one row group of the manifest, whatever the day's size."""
    uri = daily.manifest_uri(cfg.root, day, run_id)
    local = daily.local_spool_path(uri)
    count = manifest.write_manifest(day_uploads(cfg, day, warehouse), local)
    daily.publish(local, uri)
    return uri, count


def _span(days: list[dt.date]) -> str:
    return "-" if not days else days[0].isoformat() if len(days) == 1 else f"{days[0]} .. {days[-1]}"


def run_days(context) -> list[dt.date]:
    """The days of a run: one partition or a single-run range."""
    window = context.partition_time_window
    first, last = window.start.date(), window.end.date()
    return [first + dt.timedelta(days=i) for i in range((last - first).days)]


def build_prediction_assets(cfg: SofarConfig):
    partitions = dg.DailyPartitionsDefinition(
        start_date=cfg.partitions.start_date.isoformat(), timezone=cfg.partitions.timezone
    )
    inf = cfg.inference

    @dg.op(out=dg.DynamicOut(dict), ins={"champion_model": dg.In(dg.Nothing)})
    def plan_shards(context: dg.OpExecutionContext, mlflow_tracking: MlflowResource, warehouse: WarehouseResource):
        """Resolve the champion once for the run, list each day once into its manifest, size each
        day's shards by its upload count and emit one unit per shard step."""
        days = run_days(context)
        name = cfg.model.name
        try:
            mv = registry.champion(mlflow_tracking.client(), name)
            calibration = registry.read_calibration(mv)
        except (registry.NoChampionError, registry.UncalibratedError) as exc:
            raise dg.Failure(description=str(exc)) from exc
        unit = {
            "run_id": context.run_id,
            "model_name": name, "model_version": str(mv.version), "model_uri": f"models:/{name}/{mv.version}",
            # where each shard pod reads the package from, without the tracking server's proxy
            "model_source": registry.direct_source(mlflow_tracking.client(), name, mv.version,
                                                   cfg.storage.mlflow.artifacts_destination),
            "threshold": calibration.threshold, "temperature": calibration.temperature,
            "score_method": calibration.score_method,
            "label_sets": calibration.label_sets.as_dict() if calibration.label_sets else None,
        }
        if calibration.label_sets is None:
            context.log.warning(f"{name} v{mv.version} has no conformal label-set tags (calibrated before label "
                                "sets existed): its rows get NULL label_set; re-train to get them")
        wh = warehouse.get()
        listed = {}
        for day in days:  # each day listed ONCE for the run; the shards read slices of its manifest
            listed[day.isoformat()] = list_day(cfg, day, wh, context.run_id)
        units = manifest.pack(listed, images_per_shard=inf.images_per_shard, max_shards=inf.max_shards,
                              fixed_shards=inf.shards_per_day)
        shards = {s["day"]: s["shards"] for u in units for s in u}
        for day, (_, count) in listed.items():
            context.log.info(f"{day}: {count} uploads listed -> {shards[day]} shard(s)"
                             + (" (no uploads: one shard commits the empty day)" if not count else ""))
        context.log.info(f"{name} v{mv.version} for {len(days)} day(s) {days[0]} .. {days[-1]}: "
                         f"{len(units)} shard step(s)")
        for k, slices in enumerate(units):
            yield dg.DynamicOutput(unit | {"step": k, "steps": len(units), "slices": slices}, mapping_key=f"shard_{k}")

    shard_holds_gpu = cfg.inference.device != "cpu" and cfg.inference.runtime == "torch"

    @dg.op(pool="gpu" if shard_holds_gpu else None,
           tags=step_tags(cfg, gpu=shard_holds_gpu, workers=cfg.inference.num_workers))
    def score_shard(context: dg.OpExecutionContext, unit: dict, mlflow_tracking: MlflowResource) -> dict:
        """Score this step's slices (row ranges of the days' manifests) in one streaming pass; stage each
        slice's rows."""
        k, n = unit["step"], unit["steps"]
        mlflow_tracking.client()  # this step may be its own process (a pod): point mlflow at the registry
        model, meta = load_registered(unit.get("model_source") or unit["model_uri"])  # once per step (pod)
        stats = meta.get("ood_stats") or {}  # {} for a package without feature statistics
        missing = ood.missing_stats(unit["score_method"], stats)
        if missing:
            raise dg.Failure(description=(
                f"{unit['model_uri']} is calibrated with OOD score {unit['score_method']!r}, which needs "
                f"{missing} from its package's ood_stats.safetensors, and this version's package has none (registered "
                "before feature scores existed?). Move @champion to a version trained since, or calibrate this one "
                "with a logit score (ood.score: max_logit)."))
        model = make_runner(model, meta, cfg.inference.runtime, cfg.inference.device)  # torch or ONNX Runtime
        context.log.info(f"{unit['model_uri']} loaded for shard {k + 1}/{n} from "
                         f"{unit.get('model_source') or 'the tracking server'} (runtime {cfg.inference.runtime})")
        slices = {dt.date.fromisoformat(s["day"]): s for s in unit["slices"]}  # one slice per day at most
        staged: dict[dt.date, tuple[str, str]] = {}  # day -> (local spool file, staging URI)
        fetched: list[str] = []  # local copies of gs:// manifests, removed at the end

        def open_spool(day: dt.date) -> ParquetSpool:
            uri = daily.staging_uri(cfg.root, day, unit["run_id"], slices[day]["shard"], slices[day]["shards"])
            staged[day] = (daily.local_spool_path(uri), uri)
            return ParquetSpool(PREDICTIONS, staged[day][0])

        def day_slices():
            for day, s in slices.items():
                local, temporary = daily.fetch_local(s["manifest"])
                if temporary:
                    fetched.append(local)
                yield day, manifest.read_slice(local, s["start"], s["stop"])

        try:
            tallies = score_slices(model, meta, unit, day_slices(), open_spool, context)
        finally:
            for f in fetched:
                Path(f).unlink(missing_ok=True)
        for local, uri in staged.values():
            daily.publish(local, uri)
        return {"step": k, "model_version": unit["model_version"], "days": {
            d.isoformat(): t.as_dict() | {"listed": slices[d]["count"], "shards": slices[d]["shards"],
                                          "file": staged.get(d, (None, None))[1]}
            for d, t in tallies.items()}}

    def score_slices(model, meta, unit, day_slices, open_spool, context):
        """``daily.score_days`` with the unit's calibration and the inference settings."""
        stats = meta.get("ood_stats") or {}
        tallies = daily.score_days(
            model, day_slices, open_spool=open_spool,
            columns={"model_name": unit["model_name"], "model_version": unit["model_version"],
                     "predicted_at": pd.Timestamp.now(tz="UTC").tz_localize(None)},
            classes=list(meta["classes"]), image_size=int(meta["spec"]["image_size"]),
            threshold=unit["threshold"], score_method=unit["score_method"], temperature=unit["temperature"],
            label_sets=LabelSets(**unit["label_sets"]) if unit.get("label_sets") else None,
            ood_stats=stats, knn_k=ood.package_knn_k(meta),
            batch_size=inf.batch_size, num_workers=inf.num_workers, device=inf.device,
            read_bytes=storage.read_bytes, max_bytes=inf.max_bytes, reads_in_flight=inf.reads_in_flight,
            # within: a local upload is opened without following links, under the roots it was checked in;
            # pool_size: the gs:// connection pool, one connection per read in flight
            read_kwargs={"timeout_s": inf.read_timeout_s, "retries": inf.read_retries,
                         "within": cfg.upload_roots, "pool_size": inf.reads_in_flight},
            log=context.log.info, log_every=inf.log_every,
        )
        return tallies

    @dg.op(pool="warehouse_write", out={"result": dg.Out(dg.Nothing),
                **{f"daily_predictions_{c}": dg.Out(dg.Nothing, is_required=False) for c in CHECKS}})
    def commit_days(context: dg.AssetExecutionContext, shard_results: list, warehouse: WarehouseResource):
        """Commit each day once all its shards are in; read back; checks; per-partition metadata."""
        wh = warehouse.get()
        days = run_days(context)
        per_day, failures = {}, []
        read_upload = functools.partial(storage.read_bytes, within=cfg.upload_roots)  # the review sheets
        for day in days:
            parts = [r["days"][day.isoformat()] for r in shard_results if day.isoformat() in r["days"]]
            facts = daily.commit_day(wh, PREDICTIONS, day, parts) | {"shards": max((p["shards"] for p in parts), default=0)}
            per_day[day.isoformat()] = facts
            context.add_asset_metadata(  # THIS partition's own numbers and photos, not the run's totals
                {"dagster/row_count": facts["rows"]}
                | at_a_glance({k: facts[k] for k in ("uploads", "rows", "error_rows", "ood_rows", "ood_rate", "shards")})
                | review_metadata(wh, day, facts, read_upload, cfg.ui.review_url),
                partition_key=day.isoformat())
            context.log.info(f"{day}: {facts['rows']} rows committed from {len(facts['files'])} shard file(s) "
                             f"of {facts['shards']} shard(s), {facts['error_rows']} errors, {facts['ood_rows']} OOD"
                             + ("; no uploads: the day is committed empty" if not facts["uploads"] else ""))
            if facts["uploads"] and facts["error_rows"] == facts["uploads"]:
                failures.append(day)
        daily.remove_staged(f for facts in per_day.values() for f in facts.pop("files"))
        daily.remove_staged({daily.manifest_uri(cfg.root, day, context.run_id) for day in days})
        ood, mix = drift.checks_in_warehouse(wh, PREDICTIONS_TABLE, PARTITION_COLUMN, days)
        run_facts = {  # the run's facts, after each partition's own (Output metadata would come first)
            "days": len(days),
            "run_days": dg.MetadataValue.text(_span(days)),
            "run_rows": sum(d["rows"] for d in per_day.values()),
            "empty_days": dg.MetadataValue.json([d for d, v in per_day.items() if v["uploads"] == 0]),
            "per_day": dg.MetadataValue.md(pd.DataFrame(per_day).T.to_markdown()),
            "shards_per_day": dg.MetadataValue.json({d: v["shards"] for d, v in per_day.items()}),
            "shard_steps": len(shard_results),
            "model_version": shard_results[0]["model_version"] if shard_results else None,
        }
        for day in days:
            context.add_asset_metadata(run_facts, partition_key=day.isoformat())
        yield dg.Output(None, "result")
        span = f"days {_span(days)}"  # which days a check speaks of
        yield dg.AssetCheckResult(check_name="rows_match_uploads", passed=all(f["ok"] for f in per_day.values()),
                                  description=span, metadata={"days": dg.MetadataValue.text(_span(days)),
                                                              "per_day": dg.MetadataValue.json(per_day)})
        yield dg.AssetCheckResult(
            check_name="ood_rate_vs_trailing_7_days", severity=dg.AssetCheckSeverity.WARN,
            passed=not any(v["spike"] for v in ood.values()), description=span,
            metadata={"days": dg.MetadataValue.json({d.isoformat(): v for d, v in ood.items()}),
                      "compared_days": dg.MetadataValue.text(str(len(ood)))},
        )
        yield dg.AssetCheckResult(
            check_name="label_mix_vs_trailing_7_days", severity=dg.AssetCheckSeverity.WARN,
            passed=not any(v["drift"] for v in mix.values()), description=span,
            metadata={"total_variation": dg.MetadataValue.json(
                {d.isoformat(): round(v["total_variation"], 4) for d, v in mix.items()}),
                "compared_days": dg.MetadataValue.text(str(len(mix)))},
        )
        missing = {d: uploads_location(cfg, dt.date.fromisoformat(d)) for d, v in per_day.items() if v["uploads"] == 0}
        for d, where in missing.items():
            context.log.warning(f"{d}: no uploads found in {where}")
        yield dg.AssetCheckResult(
            check_name="uploads_found", severity=dg.AssetCheckSeverity.WARN, passed=not missing, description=span,
            metadata={"days_without_uploads": dg.MetadataValue.json(missing), "days": dg.MetadataValue.text(_span(days))},
        )
        if failures:
            raise dg.Failure(
                description=f"every image failed on {', '.join(map(str, failures))}; their error rows were written "
                "to the predictions table — check the image store and the errors in those rows."
            )

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
        check_specs=[dg.AssetCheckSpec(c, asset="daily_predictions", description=d) for c, d in CHECKS.items()],
    )
    def daily_predictions(champion_model):
        """Top-2 labels, conformal label set, OOD score (``ood.score``) and OOD flag for every
        photo uploaded that day, by the MLflow ``champion`` version with its own temperature,
        threshold and label-set rule; each partition's metadata carries its review queue. Rows land in
        the warehouse table ``predictions`` (``prediction_date`` is a DATE); each day of a run is
        replaced at once, after all its rows are scored (a day of N uploads in
        ``ceil(N / inference.images_per_shard)`` steps, at most ``inference.max_shards``). A backfill range runs as one run (or, with ``partitions.backfill_days_per_run``,
        fans out into runs of N days): the model loads once per shard step.
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
