"""Ingest: one raw label table per task (made from the task list in the config), and the
concatenated ``sofar_dataset`` with its checks and dataset card."""

import io
from concurrent.futures import ThreadPoolExecutor

import dagster as dg
import pandas as pd
from PIL import Image

from sofar_assets.config import SofarConfig, TaskSource
from sofar_assets.defs.k8s import step_tags
from sofar_assets.defs.resources import ImageStoreResource, WarehouseResource
from sofar_assets.lib.common.names import md_text, shown
from sofar_assets.lib.data import dataset as ds
from sofar_assets.lib.data import storage
from sofar_assets.lib.data.images import sha256_hex
from sofar_assets.lib.model.plots import contact_sheet_png, png_to_markdown
from sofar_assets.lib.warehouse import RAW_CORRECTIONS, SOFAR_DATASET, raw_labels_schema, raw_labels_table

DECODE_THREADS = 2
CORRECTIONS_ASSET_KEY = dg.AssetKey(["raw_labels", "label_corrections"])
"""The inspectors' corrections scanned as a task source (defs/corrections.py)."""


def raw_table_name(task: str) -> str:
    return raw_labels_table(task)


def _task_items(cfg: SofarConfig, task: TaskSource, warehouse) -> list[tuple[str, str]]:
    """``(image_uri, source_label)`` for every file of a task, from its folder or its table."""
    if task.folder is not None:
        folder = cfg.resolve(task.folder)
        items = []
        for sub in storage.list_subfolders(folder):
            base = f"{folder.rstrip('/')}/{sub}"
            items += [(uri, sub) for uri in storage.list_files(base)]
        return items
    df = warehouse.read_table(task.table)
    missing = {"image_uri", "label"} - set(df.columns)
    if missing:
        raise ValueError(f"label table {task.table!r} lacks column(s) {sorted(missing)}; needs image_uri, label")
    return [(cfg.resolve(u), str(lab)) for u, lab in zip(df["image_uri"], df["label"], strict=True)]


def file_inspector(image_store: ImageStoreResource, size: int, *, max_bytes: int = storage.MAX_IMAGE_BYTES,
                   within: list[str] | None = None):
    """Read (at most ``max_bytes``; with ``within``, confined to those roots and never through a
    link), hash and decode one image, filling the preprocessed cache on the way."""
    cache = image_store.cache(size)

    def inspect(uri: str) -> tuple[str, int, int, int]:
        data = storage.read_bytes(uri, max_bytes=max_bytes, within=within)
        sha = sha256_hex(data)
        # the one full decode: training and evaluation reuse the cached array wherever they share
        # this cache (one machine locally; a shared volume in production, see config/prod.yaml)
        cache.get(sha, lambda: data, uri)
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
        return sha, len(data), width, height

    return inspect


def build_raw_label_asset(cfg: SofarConfig, task_name: str, task: TaskSource) -> dg.AssetsDefinition:
    source = f"folder `{cfg.resolve(task.folder)}`" if task.folder else f"warehouse table `{task.table}`"
    mapping = ", ".join(f"`{k}` → `{v}`" for k, v in task.labels.items()) or "labels as stored"

    @dg.asset(
        key=["raw_labels", task_name],
        group_name="ingest",
        kinds={cfg.storage.warehouse.kind, "python"},
        code_version="1",
        description=(
            f"Raw label table of the task-centric dataset **{task_name}** from {source} ({mapping}). "
            "One row per file with its content hash; unreadable files are rows with an `error`."
        ),
        metadata={"task": task_name, "source": source},
        op_tags=step_tags(cfg, gpu=False, workers=DECODE_THREADS),
        pool="warehouse_write",
    )
    def _raw_labels(context: dg.AssetExecutionContext, warehouse: WarehouseResource,
                    image_store: ImageStoreResource) -> dg.MaterializeResult:
        wh = warehouse.get()
        items = _task_items(cfg, task, wh)
        context.log.info(f"{task_name}: {len(items)} files to read, hash and decode")
        inspect = file_inspector(image_store, cfg.model.image_size, max_bytes=cfg.inference.max_bytes)
        rows = []
        with ThreadPoolExecutor(DECODE_THREADS) as pool:
            scanned = pool.map(lambda it: ds.scan_row(task_name, it[0], it[1], task.labels, inspect), items)
            for i, row in enumerate(scanned, 1):
                rows.append(row)
                if i % 100 == 0:
                    context.log.info(f"{task_name}: {i}/{len(items)} files scanned")
        raw = ds.raw_frame(rows)
        wh.write_table(raw_table_name(task_name), raw, schema=raw_labels_schema(task_name))
        errors = raw[raw["error"].notna()]
        for err in errors["error"]:
            context.log.warning(f"unreadable: {shown(err, 400)}")
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": len(raw),
                "table": raw_table_name(task_name),
                "per_label": dg.MetadataValue.json(raw[raw["error"].isna()]["label"].value_counts().to_dict()),
                "unreadable": len(errors),
                "unreadable_files": dg.MetadataValue.md(
                    "\n".join(f"- {md_text(e, 400)}" for e in errors["error"]) or "none"
                ),
            }
        )

    return _raw_labels


DATASET_CHECKS = [
    ("no_unreadable_files", "Every task file decodes; failing lists the files (they are left out of training)."),
    ("min_images_per_class_and_split", "Each class has at least dataset.min_per_class single-label images per split."),
    ("no_image_in_two_splits", "No content hash sits in two splits, in this version or against the previous "
     "one (no leakage between train, val and test across retrains)."),
    ("vocabulary_consistent", "No task label looks like a typo of another task's label (e.g. nomral)."),
    ("label_conflicts", "Photos with different labels in different tasks (kept once, multi-label; listed)."),
]


def _dataset_checks(f: ds.DatasetFindings, cfg: SofarConfig,
                    vocabulary: list[str]) -> list[dg.AssetCheckResult]:
    def listed(lines) -> dg.MetadataValue:
        return dg.MetadataValue.md("\n".join(lines) or "none")

    warn = dg.AssetCheckSeverity.WARN
    return [
        dg.AssetCheckResult(
            check_name="no_unreadable_files", passed=not f.unreadable, severity=warn,
            metadata={"unreadable": len(f.unreadable),
                      "files": listed(f"- {md_text(e, 400)}" for e in f.unreadable)}),
        dg.AssetCheckResult(
            check_name="min_images_per_class_and_split", passed=not f.too_small, severity=warn,
            metadata={"minimum": cfg.dataset.min_per_class, "below": dg.MetadataValue.json(f.too_small)}),
        dg.AssetCheckResult(
            check_name="no_image_in_two_splits", passed=f.leaks == 0,
            metadata={"hashes_in_two_splits": f.leaks, "moved_since_previous_version": dg.MetadataValue.json(
                f.moved.head(50).to_dict("records"))}),
        dg.AssetCheckResult(
            check_name="vocabulary_consistent", passed=not f.typos, severity=warn,
            metadata={"findings": dg.MetadataValue.json(f.typos),
                      "vocabulary": dg.MetadataValue.json(vocabulary)}),
        dg.AssetCheckResult(check_name="label_conflicts", passed=True, metadata={
            "multi_label_images": len(f.multi), "conflicts": listed(
                f"- {md_text(u)}: {lab.replace('|', ' + ')}"
                for u, lab in zip(f.multi["image_uri"], f.multi["labels"], strict=True))}),
    ]


def _dataset_metadata(data, digest, raw, verdicts, findings: ds.DatasetFindings, vocabulary,
                      card: str) -> dict:
    return {
        "dagster/row_count": len(data),
        "dataset_hash": digest,
        "classes": dg.MetadataValue.json(vocabulary),
        "multi_label_images": len(findings.multi),
        "unreadable_files": len(findings.unreadable),
        "corrections": dg.MetadataValue.json(ds.correction_effects(raw, verdicts)),
        "corrected_images": int(data["corrected_at"].notna().sum()),
        "dataset_card": dg.MetadataValue.md(card),
    }


def build_dataset_asset(cfg: SofarConfig, raw_keys: list[dg.AssetKey]) -> dg.AssetsDefinition:
    vocabulary = cfg.vocabulary()
    task_labels = {n: t.labels for n, t in cfg.tasks.items()}

    @dg.asset(
        name="sofar_dataset",
        deps=[*raw_keys, CORRECTIONS_ASSET_KEY],
        group_name="ingest",
        kinds={cfg.storage.warehouse.kind, "pandas"},
        code_version="1",
        check_specs=[dg.AssetCheckSpec(name, asset="sofar_dataset", description=desc)
                     for name, desc in DATASET_CHECKS],
        op_tags=step_tags(cfg, gpu=False, workers=DECODE_THREADS),
        pool="warehouse_write",
    )
    def sofar_dataset(context: dg.AssetExecutionContext, warehouse: WarehouseResource,
                      image_store: ImageStoreResource):
        """The concatenated SOFAR dataset: every task's images in ONE label vocabulary.

        Shared labels (``normal``) are one class; identical photos (same sha256) are one row;
        a photo labeled differently by two tasks is kept once as multi-label (out of
        single-label training, used to evaluate the top-2). Train/val/test come from the content
        hash: stable when photos are added, never leaking across splits.

        Inspectors' corrections (``raw_labels/label_corrections``) are a task source with one
        rule: a verdict overrides every task label of the same photo content (sha256), the
        latest ``corrected_at`` wins, a corrected photo is single-label, and a photo judged
        ``irrelevant`` leaves the dataset (it joins the ``inspector_irrelevant`` OOD set). A
        verdict that flips a label changes the dataset hash: a new version to retrain on.
        """
        wh = warehouse.get()
        raw = pd.concat([wh.read_table(raw_table_name(k.path[-1])) for k in raw_keys], ignore_index=True)
        verdicts = wh.read_table(RAW_CORRECTIONS.name) if wh.table_exists(RAW_CORRECTIONS.name) else None
        data = ds.concatenate(
            raw, vocabulary, val_fraction=cfg.dataset.val_fraction, test_fraction=cfg.dataset.test_fraction,
            corrections=verdicts, label_tasks=ds.label_tasks(task_labels),
        )
        previous = wh.read_table("sofar_dataset") if wh.table_exists("sofar_dataset") else None
        wh.write_table(SOFAR_DATASET.name, data, schema=SOFAR_DATASET)
        findings = ds.dataset_findings(
            data, raw, previous, vocabulary, task_labels, min_per_class=cfg.dataset.min_per_class,
            val_fraction=cfg.dataset.val_fraction, test_fraction=cfg.dataset.test_fraction)
        card = _dataset_card(data, ds.counts_by(data, vocabulary), raw, image_store, cfg, vocabulary)
        digest = ds.dataset_hash(data)
        context.log.info(f"sofar_dataset: {len(data)} images, {len(vocabulary)} classes, hash {digest[:12]}")
        metadata = _dataset_metadata(data, digest, raw, verdicts, findings, vocabulary, card)
        yield dg.MaterializeResult(metadata=metadata, check_results=_dataset_checks(findings, cfg, vocabulary))

    return sofar_dataset


def _dataset_card(data, counts, raw, image_store, cfg, vocabulary) -> str:
    per_task = raw[raw["error"].isna()].groupby(["task", "label"]).size().rename("images").reset_index()
    sheet = ""
    k = cfg.dataset.contact_sheet_per_class
    if k:
        cache = image_store.cache(cfg.model.image_size)
        thumbs = {}
        for label in vocabulary:
            rows = data[(data["label"] == label) & ~data["multi_label"]].head(k)
            thumbs[label] = [
                cache.get(sha, lambda uri=uri: storage.read_bytes(uri), uri)
                for sha, uri in zip(rows["sha256"], rows["image_uri"], strict=True)
            ]
        sheet = "\n\n### Contact sheet\n\n" + png_to_markdown(contact_sheet_png(thumbs), "contact sheet")
    return (
        "### Images per label and split (single-label) and multi-label\n\n"
        + counts.to_markdown()
        + "\n\n### Images per task and label (before deduplication)\n\n"
        + per_task.to_markdown(index=False)
        + sheet
    )
