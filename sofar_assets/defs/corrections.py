"""Closing the loop: inspectors' corrections become labels, and measure the champion in the field.

    label_corrections (table; `sofar correct`, CSV imports, other systems)
        ├─▶ raw_labels/label_corrections ─▶ sofar_dataset ─▶ … retrain + gate (train_and_promote)
        └─▶ field_accuracy (daily partitions, after daily_predictions)

The rule when a verdict disagrees with a task label is in ``lib/data/dataset.py`` (the verdict
overrides, the latest verdict wins); validation in ``lib/review/corrections.py``; the per-day figures
and their trailing-week check in ``lib/review/field_accuracy.py``.
"""

import datetime as dt

import dagster as dg
import pandas as pd

from sofar_assets.config import SofarConfig
from sofar_assets.defs.data import CORRECTIONS_ASSET_KEY, DECODE_THREADS, file_inspector
from sofar_assets.defs.k8s import step_tags
from sofar_assets.defs.model import OWNERS
from sofar_assets.defs.predictions import partition_days
from sofar_assets.defs.resources import ImageStoreResource, WarehouseResource
from sofar_assets.lib.common.names import md_text, shown
from sofar_assets.lib.review import corrections as corr
from sofar_assets.lib.review import field_accuracy as fa
from sofar_assets.lib.review.drift import trailing_window
from sofar_assets.lib.warehouse import LABEL_CORRECTIONS, RAW_CORRECTIONS

FIELD_CHECK = "field_accuracy_vs_trailing_7_days"


def label_corrections_spec(cfg: SofarConfig) -> dg.AssetSpec:
    """The verdicts table, written outside Dagster (``sofar correct``, CSV imports, other systems)."""
    kind = cfg.storage.warehouse.kind
    return dg.AssetSpec(
        "label_corrections",
        group_name="ingest",
        kinds={kind},
        owners=OWNERS,
        description=(
            "Inspectors' verdicts on predicted photos (image_id, image_uri, label, inspector, corrected_at, "
            "prediction_date), appended by `sofar correct` (one verdict or a CSV, validated all-or-nothing) "
            "or by any other system. Not materialized by Dagster: read by raw_labels/label_corrections and "
            "field_accuracy."
        ),
        metadata={"table": LABEL_CORRECTIONS.name, "partition_expr": LABEL_CORRECTIONS.partition_column},
    )


def raw_corrections_asset(cfg: SofarConfig, label_corrections: dg.AssetSpec):
    vocabulary = cfg.vocabulary()
    kind = cfg.storage.warehouse.kind

    @dg.asset(
        key=CORRECTIONS_ASSET_KEY,
        deps=[label_corrections],
        group_name="ingest",
        kinds={kind, "python"},
        owners=OWNERS,
        code_version="1",
        op_tags=step_tags(cfg, gpu=False, workers=DECODE_THREADS),
        pool="warehouse_write",
        check_specs=[dg.AssetCheckSpec(
            "corrections_valid", asset=CORRECTIONS_ASSET_KEY,
            description="Every latest verdict names a known photo, a class or 'irrelevant', and a readable image "
            "inside the uploads' roots; failing lists the rejected rows (left out of the dataset, the table "
            "untouched).")],
    )
    def raw_corrections(context: dg.AssetExecutionContext, warehouse: WarehouseResource,
                        image_store: ImageStoreResource) -> dg.MaterializeResult:
        """The corrections task source: the latest verdict per photo of ``label_corrections``,
        validated (label in the vocabulary or ``irrelevant``, a known ``image_id`` on its
        ``prediction_date``, an image inside the uploads' allowed roots) and read, hashed and
        decoded like a task's file. A rejected verdict is an error row naming the image id and
        why. ``sofar_dataset`` applies the verdicts: they override the task labels of the same
        photo content, the latest ``corrected_at`` wins, ``irrelevant`` photos leave the
        dataset for the ``inspector_irrelevant`` OOD set."""
        wh = warehouse.get()
        latest = corr.latest_per_image(wh)
        reasons = corr.validate_stored(wh, latest, vocabulary)
        # the photos are uploads: read only under their roots, never through a link
        inspect = file_inspector(image_store, cfg.model.image_size, max_bytes=cfg.inference.max_bytes,
                                 within=cfg.upload_roots)
        raw = corr.scan(latest, reasons, vocabulary, inspect, cfg.upload_roots, threads=DECODE_THREADS)
        wh.write_table(RAW_CORRECTIONS.name, raw, schema=RAW_CORRECTIONS)
        errors = raw[raw["error"].notna()]
        for err in errors["error"].head(50):
            context.log.warning(f"correction rejected: {shown(err, 400)}")
        superseded = int(latest["verdicts"].sum() - len(latest)) if len(latest) else 0
        context.log.info(f"{len(raw)} photo(s) with a verdict ({superseded} older verdict(s) superseded), "
                         f"{len(errors)} rejected")
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": len(raw),
                "table": RAW_CORRECTIONS.name,
                "per_label": dg.MetadataValue.json(raw[raw["error"].isna()]["label"].value_counts().to_dict()),
                "superseded_verdicts": superseded,
                "rejected": len(errors),
            },
            check_results=[dg.AssetCheckResult(
                check_name="corrections_valid", passed=errors.empty, severity=dg.AssetCheckSeverity.WARN,
                metadata={"rejected": len(errors), "rows": dg.MetadataValue.md(
                    "\n".join(f"- {md_text(e, 400)}" for e in errors["error"].head(200)) or "none")},
            )],
        )

    return raw_corrections


def field_accuracy_asset(cfg: SofarConfig, label_corrections: dg.AssetSpec):
    kind = cfg.storage.warehouse.kind
    partitions = dg.DailyPartitionsDefinition(
        start_date=cfg.partitions.start_date.isoformat(), timezone=cfg.partitions.timezone
    )

    @dg.asset(
        partitions_def=partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),
        deps=[dg.AssetKey("daily_predictions"), label_corrections],
        group_name="predictions",
        kinds={kind},
        owners=OWNERS,
        code_version="1",
        check_specs=[dg.AssetCheckSpec(
            FIELD_CHECK, asset="field_accuracy",
            description="Warns when a day's real-world accuracy, coverage or OOD precision drops against the "
            "trailing 7 days: more than lib/review/field_accuracy.py DROP_MARGIN below AND a one-sided Fisher exact "
            "test p < DROP_ALPHA.")],
    )
    def field_accuracy(context: dg.AssetExecutionContext, warehouse: WarehouseResource) -> dg.MaterializeResult:
        """The champion in the field, per upload day: on the day's photos inspectors judged
        (``predictions`` JOIN the latest verdict of ``label_corrections``, scored rows), the
        top-1 accuracy on photos judged a class, the conformal label sets' coverage of the
        verdict (unavailable without a ``label_set`` column), and the OOD precision (flagged
        photos judged ``irrelevant``) and recall. One SQL aggregate; each day's figures on its
        own partition. Re-materialize a day as its verdicts come in (a range runs as one run)."""
        wh = warehouse.get()
        days = partition_days(context)
        counts = fa.daily_counts(wh, trailing_window(min(days))[0], max(days) + dt.timedelta(days=1))
        figures = fa.per_day(counts, days)
        for day, f in figures.items():
            context.add_asset_metadata(
                {k: v for k, v in f.items() if v is not None}
                | {"coverage_available": f["coverage"] is not None or f["with_label_set"] is not None},
                partition_key=day.isoformat())
        drops = fa.vs_trailing(counts, days)
        table = pd.DataFrame({d.isoformat(): f for d, f in figures.items()}).T
        return dg.MaterializeResult(
            metadata={"days": len(days), "per_day": dg.MetadataValue.md(table.to_markdown())},
            check_results=[dg.AssetCheckResult(
                check_name=FIELD_CHECK, severity=dg.AssetCheckSeverity.WARN,
                passed=not any(v["dropped"] for by in drops.values() for v in by.values()),
                metadata={"compared": dg.MetadataValue.json({d.isoformat(): v for d, v in drops.items()}),
                          "drop_margin": fa.DROP_MARGIN, "alpha": fa.DROP_ALPHA},
            )],
        )

    return field_accuracy


def build_corrections_assets(cfg: SofarConfig) -> list:
    label_corrections = label_corrections_spec(cfg)
    return [label_corrections, raw_corrections_asset(cfg, label_corrections),
            field_accuracy_asset(cfg, label_corrections)]
