"""Training, OOD calibration, evaluation and the gated champion alias in the MLflow registry.

Assets hand each other a small frozen pointer (:class:`~sofar_assets.lib.model.tracking.ModelRef`:
model name, version, run id, dataset hash), never weights or per-image scores: those live in
MLflow (the package, ``ood_calibration.json``, ``evaluation.json``), so lineage holds and a
backfill knows exactly which version it used. The work is in lib/: the recipe
(``lib/model/training.py``), the calibration and evaluation of a version
(``lib/model/evaluation.py``), what goes to MLflow (``lib/model/tracking.py``) and the version's
tags and aliases (``lib/serving/registry.py``).
"""

import functools

import dagster as dg
import pandas as pd

from sofar_assets.config import SofarConfig
from sofar_assets.defs.k8s import step_tags
from sofar_assets.defs.metadata import at_a_glance
from sofar_assets.defs.resources import ImageStoreResource, MlflowResource, WarehouseResource
from sofar_assets.lib.common import links
from sofar_assets.lib.common.devices import resolve_device
from sofar_assets.lib.data import dataset as ds
from sofar_assets.lib.data import storage
from sofar_assets.lib.data.images import ImageDataset
from sofar_assets.lib.model import calibration, evaluation, metrics, ood, plots, tracking
from sofar_assets.lib.model.gate import GATE_CHECKS, gate_results
from sofar_assets.lib.model.models import ModelSpec
from sofar_assets.lib.model.tracking import ModelRef
from sofar_assets.lib.model.training import TrainResult, predict_logits, train_classifier
from sofar_assets.lib.review.corrections import INSPECTOR_OOD_SET, irrelevant_uris
from sofar_assets.lib.serving import registry
from sofar_assets.lib.serving.packaging import load_registered, log_and_register
from sofar_assets.lib.warehouse import RAW_CORRECTIONS
from sofar_assets.settings import git_commit

__all__ = ["build_model_assets", "model_spec"]


def _split(data: pd.DataFrame, split: str) -> pd.DataFrame:
    return data[(data["split"] == split) & ~data["multi_label"]].reset_index(drop=True)


def _image_dataset(rows: pd.DataFrame, classes: list[str], cfg: SofarConfig, image_store):
    index = {c: i for i, c in enumerate(classes)}
    return ImageDataset(
        list(rows["image_uri"]),
        [index[label] for label in rows["label"]],
        cfg.model.image_size,
        cache=image_store.cache(cfg.model.image_size),
        sha256s=list(rows["sha256"]),
        # the size limit the ingest used (a plain partial: DataLoader workers pickle it)
        read_bytes=functools.partial(storage.read_bytes, max_bytes=cfg.inference.max_bytes),
    )


def _labels(rows: pd.DataFrame, classes: list[str]):
    return rows["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()


def model_spec(cfg: SofarConfig, num_classes: int) -> ModelSpec:
    """The network the config asks for (also what the trade-off report's systems are built from)."""
    return ModelSpec(num_classes=num_classes, arch=cfg.model.arch, backbone=cfg.model.backbone,
                     image_size=cfg.model.image_size, pretrained=cfg.model.pretrained,
                     weights_file=cfg.weights_file, pmg_feature_dim=cfg.model.pmg_feature_dim)


def _ood_uris(cfg: SofarConfig, warehouse, context) -> dict[str, list[str]]:
    """The image URIs of every OOD set: each configured folder, then the photos inspectors judged
    ``irrelevant`` (``inspector_irrelevant``) once there are gate.min_ood_images of them — fewer
    would make the gate's OOD check "insufficient evidence" for every set."""
    sets = {name: storage.list_files(cfg.resolve(oset.folder)) for name, oset in cfg.ood_sets.items()}
    wh = warehouse.get()
    if INSPECTOR_OOD_SET not in sets and wh.table_exists(RAW_CORRECTIONS.name):
        uris = irrelevant_uris(wh.read_table(RAW_CORRECTIONS.name))
        if len(uris) >= cfg.gate.min_ood_images:
            sets[INSPECTOR_OOD_SET] = uris
        elif uris:
            context.log.info(f"{INSPECTOR_OOD_SET}: {len(uris)} photo(s) judged irrelevant, fewer than "
                             f"gate.min_ood_images={cfg.gate.min_ood_images}; not an OOD set yet")
    return sets


def _ood_features(model, cfg: SofarConfig, image_store, warehouse, context):
    return evaluation.ood_set_features(model, _ood_uris(cfg, warehouse, context), cfg.model.image_size,
                                       cache=image_store.cache(cfg.model.image_size),
                                       device=cfg.inference.device, log=context.log.warning)


def _origin(cfg: SofarConfig, context) -> tracking.RunOrigin:
    return tracking.RunOrigin(context.run_id, links.dagster_run_url(cfg.ui.dagster_url, context.run_id),
                              git_commit())


def _dataset_input(cfg: SofarConfig, data: pd.DataFrame, digest: str):
    wh = cfg.storage.warehouse
    if wh.kind == "bigquery":
        return tracking.dataset_input(data, digest, bigquery_table=(wh.project, wh.dataset))
    return tracking.dataset_input(data, digest, local_table=f"{cfg.duckdb_path}#{wh.schema_}.sofar_dataset")


def _mlflow_links(cfg: SofarConfig, experiment_id: str | None, run_id: str | None, version: str) -> dict:
    """Clickable MLflow pages in the asset's metadata (base URL: ui.mlflow_url)."""
    md = {"mlflow_model_version": dg.MetadataValue.url(
        links.mlflow_version_url(cfg.ui.mlflow_url, cfg.model.name, version))}
    if run_id is not None:
        md["mlflow_run"] = dg.MetadataValue.url(
            links.mlflow_run_url(cfg.ui.mlflow_url, experiment_id, run_id))
    return md


def _artifact_link(cfg: SofarConfig, run_id: str, key: str):
    return dg.MetadataValue.url(links.mlflow_artifact_url(cfg.ui.mlflow_url, run_id, tracking.FIGURES[key]))


# -- sofar_classifier -------------------------------------------------------------------------------
def _fit_splits(data: pd.DataFrame, classes: list[str], context) -> tuple[pd.DataFrame, pd.DataFrame]:
    train_rows, val_rows = _split(data, "train"), _split(data, "val")
    if train_rows.empty or val_rows.empty:
        raise dg.Failure(
            description=f"sofar_dataset has {len(train_rows)} train and {len(val_rows)} val single-label "
            "images; both are needed. Add images or raise dataset.val_fraction in the config."
        )
    missing = sorted(set(classes) - set(train_rows["label"]))
    if missing:
        context.log.warning(f"classes without training images: {missing}")
    return train_rows, val_rows


def _training_figures(cfg, result: TrainResult, val_rows, classes, image_store) -> dict[str, bytes]:
    logits = predict_logits(result.model, _image_dataset(val_rows, classes, cfg, image_store),
                            device=cfg.train.device)
    cm = metrics.confusion_matrix(_labels(val_rows, classes), logits.argmax(1), len(classes))
    return {"val_confusion_matrix": plots.confusion_matrix_png(cm, classes),
            "training_curves": plots.training_curves_png(result.history, ["train_loss", "val_loss"])}


def _register(cfg: SofarConfig, result: TrainResult, spec: ModelSpec, classes: list[str], digest: str,
              origin: tracking.RunOrigin, client, description: str) -> str:
    """Log the package in the active run, register it, record its gate and describe it: the version."""
    reg = log_and_register(
        result.model, spec, classes, cfg.model.name,
        extra={"dataset_hash": digest, "git_commit": origin.git_commit, "best_epoch": result.best_epoch,
               "ood_knn_k": cfg.ood.knn_k},
        ood_stats=ood.fit_feature_stats(result.train_features, result.train_labels,
                                        knn_bank_max=cfg.ood.knn_bank_max,
                                        knn_bank_reduction=cfg.ood.knn_bank_reduction),
        model_config={"allowed_roots": cfg.upload_roots},  # the URIs the served model may read
        tags=tracking.run_tags(origin, digest, val_macro_f1=f"{result.best_val_macro_f1:.4f}"),
    )
    version = str(reg["version"])
    # the gate this version is held to, whoever re-checks it later (promote, rollback)
    registry.record_gate_config(client, cfg.model.name, version, cfg.gate)
    tracking.describe(client, cfg.model.name, version, description)
    return version


def _classifier_metadata(cfg, ref: ModelRef, result: TrainResult, experiment_id: str) -> dict:
    return at_a_glance({
        "model_uri": ref.model_uri, "model_version": ref.version, "mlflow_run_id": ref.run_id,
        **_mlflow_links(cfg, experiment_id, ref.run_id, ref.version),
        "dataset_hash": ref.dataset_hash, "best_epoch": result.best_epoch,
        "val_macro_f1": result.best_val_macro_f1, "train_images_per_s": result.images_per_s,
        "data_wait_share": result.data_wait_share, "device": str(resolve_device(cfg.train.device)),
        "training_curves": _artifact_link(cfg, ref.run_id, "training_curves"),
        "val_confusion_matrix": _artifact_link(cfg, ref.run_id, "val_confusion_matrix"),
    })


def build_classifier_asset(cfg: SofarConfig) -> dg.AssetsDefinition:
    classes = cfg.vocabulary()

    @dg.asset(deps=["sofar_dataset"], group_name="training", kinds={"pytorch", "mlflow"}, code_version="2",
              pool="gpu", op_tags=step_tags(cfg, gpu=True, workers=cfg.train.num_workers,
                                            batch_size=cfg.train.batch_size, device=cfg.train.device))
    def sofar_classifier(
        context: dg.AssetExecutionContext, warehouse: WarehouseResource, mlflow_tracking: MlflowResource,
        image_store: ImageStoreResource,
    ) -> dg.Output[ModelRef]:
        """ONE N-class classifier over the concatenated label space (the GPU step).

        Trains the configured architecture (``linear`` or the paper's ``pmg``) with the recipe
        of ``lib/model/training.py`` (linear probe, then fine-tuning on augmented photos with
        patience), keeps the epoch with the best val macro-F1 (ties: lower val loss), and
        registers it in MLflow (safetensors + JSON config + the feature-score statistics of the
        train split, tagged with the dataset hash and the git commit).
        """
        data = warehouse.get().read_table("sofar_dataset")
        digest, origin, spec = ds.dataset_hash(data), _origin(cfg, context), model_spec(cfg, len(classes))
        train_rows, val_rows = _fit_splits(data, classes, context)
        # a registry is created only on a first run: not when the warehouse remembers its versions
        mlflow_tracking.require_registry(cfg.model.name,
                                         registry.predicted_versions(warehouse.get(), cfg.model.name))
        experiment_id = mlflow_tracking.setup()
        run_name = f"{cfg.model.name}-{context.run_id[:8]}"
        with tracking.run(experiment_id, run_name, tracking.run_tags(origin, digest)) as run:
            tracking.log_training_inputs(spec.to_dict(), cfg.train.model_dump(), classes, digest,
                                         len(train_rows), len(val_rows), _dataset_input(cfg, data, digest))
            result = train_classifier(spec, _image_dataset(train_rows, classes, cfg, image_store),
                                      _image_dataset(val_rows, classes, cfg, image_store), cfg.train,
                                      log=context.log.info, on_epoch=tracking.log_epoch)
            figures = _training_figures(cfg, result, val_rows, classes, image_store)
            tracking.log_training_result(result, figures)
            text = tracking.version_description(spec, classes, digest, len(train_rows), len(val_rows), result,
                                                origin.dagster_run_url)
            version = _register(cfg, result, spec, classes, digest, origin, mlflow_tracking.client(), text)
        ref = ModelRef(cfg.model.name, version, run.info.run_id, digest)
        context.log.info(f"registered {ref.model_uri} (val macro-F1 {result.best_val_macro_f1:.3f})")
        return dg.Output(ref, metadata=_classifier_metadata(cfg, ref, result, experiment_id))

    return sofar_classifier


# -- ood_calibration --------------------------------------------------------------------------------
def calibration_settings(cfg: SofarConfig) -> evaluation.CalibrationSettings:
    index = {c: i for i, c in enumerate(cfg.vocabulary())}
    return evaluation.CalibrationSettings(
        score_method=cfg.ood.score, target_tpr=cfg.ood.target_tpr, threshold_rule=cfg.ood.threshold,
        knn_k=cfg.ood.knn_k, coverage=cfg.conformal.coverage, conformal_method=cfg.conformal.method,
        task_positives={t: index[task.positive_label] for t, task in cfg.tasks.items()},
        device=cfg.inference.device)


def _calibration_metadata(cfg, ref: ModelRef, cal: evaluation.VersionCalibration) -> dict:
    report = cal.report
    md = {
        "threshold": report["threshold"], "temperature": report["temperature"], "score_method": cfg.ood.score,
        "val_tpr": report["val_tpr"], "val_nll_before": report["val_nll_before"],
        "val_nll_after": report["val_nll_after"],
        "val_score_range": dg.MetadataValue.json([report["val_score_min"], report["val_score_max"]]),
        "ood_report": dg.MetadataValue.json({k: {kk: vv for kk, vv in v.items() if kk != "scores"}
                                             for k, v in report["ood_sets"].items()}),
        "ood_scores_side_by_side": dg.MetadataValue.md(calibration.scores_table(report["ood_sets"])),
        "task_auroc": dg.MetadataValue.json(report["task_auroc"]),
        "label_sets": dg.MetadataValue.json(cal.label_sets.as_dict()),
        "model_version": ref.version,
    }
    for name, r in report["ood_sets"].items():
        md[f"auroc_{name}"] = r["auroc"]
        md[f"rejected_share_{name}"] = r["rejected_share"]
    if cal.roc_png:
        md["roc"] = _artifact_link(cfg, ref.run_id, "roc")
    return at_a_glance(md)


def build_calibration_asset(cfg: SofarConfig) -> dg.AssetsDefinition:
    classes = cfg.vocabulary()

    @dg.asset(group_name="training", kinds={"mlflow", "numpy"}, code_version="4", pool="gpu",
              op_tags=step_tags(cfg, gpu=True, workers=cfg.inference.num_workers))
    def ood_calibration(
        context: dg.AssetExecutionContext, sofar_classifier: ModelRef, warehouse: WarehouseResource,
        mlflow_tracking: MlflowResource, image_store: ImageStoreResource,
    ) -> dg.Output[ModelRef]:
        """Out-of-distribution threshold for the model version, and every OOD score side by side.

        Temperature scaling fitted on the val split (changes probabilities, not the top-2);
        the configured OOD score (``ood.score``: kNN by default, measured on real photos; the
        paper's max logit is one setting away)
        thresholded at the target in-distribution TPR on the val split. AUROC and FPR@TPR of
        every score (max logit, energy, max softmax, Mahalanobis, kNN) on each configured
        irrelevant image set, and one-class AUROC per task. The conformal label-set rule
        (``conformal.coverage``, lib/model/conformal.py) is calibrated on the same val probabilities
        (temperature applied). Score method, temperature, threshold and the label-set rule are
        tags on the MLflow model version (lib/serving/registry.py); the report with every image's
        scores is ``ood_calibration.json`` in the version's run (model_evaluation reads it there).
        """
        ref = sofar_classifier
        model, meta = load_registered(ref.model_uri)
        val_rows = _split(warehouse.get().read_table("sofar_dataset"), "val")
        cal = evaluation.calibrate_version(
            model, meta, _image_dataset(val_rows, classes, cfg, image_store), _labels(val_rows, classes),
            _ood_features(model, cfg, image_store, warehouse, context), calibration_settings(cfg))
        for warning in cal.warnings:
            context.log.warning(warning)
        report = cal.report
        registry.write_calibration(
            mlflow_tracking.client(), ref.model_name, ref.version,
            registry.Calibration(cfg.ood.score, report["temperature"], report["threshold"], cal.label_sets),
            target_tpr=cfg.ood.target_tpr,
            extra={f"ood_auroc_{k}": f"{v['auroc']:.4f}" for k, v in report["ood_sets"].items()},
        )
        tracking.log_calibration(ref.run_id, report, cal.label_sets.qhat, cal.roc_png)
        return dg.Output(ref, metadata=_calibration_metadata(cfg, ref, cal))

    return ood_calibration


# -- model_evaluation -------------------------------------------------------------------------------
def evaluation_settings(cfg: SofarConfig) -> evaluation.EvaluationSettings:
    classes = cfg.vocabulary()
    index = {c: i for i, c in enumerate(classes)}
    return evaluation.EvaluationSettings(
        classes=classes,
        tasks={t: (index[task.positive_label], {index[lab] for lab in task.labels.values()})
               for t, task in cfg.tasks.items()},
        positives=sorted({index[t.positive_label] for t in cfg.tasks.values() if t.positive_label in index}),
        knn_k=cfg.ood.knn_k, n_resamples=cfg.gate.bootstrap_resamples, device=cfg.inference.device)


def _held_out(cfg: SofarConfig, data: pd.DataFrame, image_store) -> evaluation.HeldOut:
    classes = cfg.vocabulary()
    index = {c: i for i, c in enumerate(classes)}
    test_rows = _split(data, "test")
    if test_rows.empty:
        raise dg.Failure(
            description="sofar_dataset has no single-label test images; raise dataset.test_fraction")
    multi = data[data["multi_label"]].reset_index(drop=True)
    return evaluation.HeldOut(
        _image_dataset(test_rows, classes, cfg, image_store), _labels(test_rows, classes),
        _image_dataset(multi, classes, cfg, image_store) if not multi.empty else None,  # label: the first
        [{index[lab] for lab in labels.split("|")} for labels in multi["labels"]])


def _probe(cfg: SofarConfig, data: pd.DataFrame, test: evaluation.HeldOut, context, image_store, warehouse):
    """The frozen-feature probe baseline (a callable), or None when the model IS the probe."""
    if evaluation.model_is_the_probe(freeze_backbone=cfg.train.freeze_backbone,
                                     linear_probe=cfg.train.linear_probe, arch=cfg.model.arch,
                                     pretrained=cfg.model.pretrained):
        return None
    classes = cfg.vocabulary()

    def figures() -> dict:
        frozen = evaluation.frozen_feature_model(model_spec(cfg, len(classes)))
        train_rows = _split(data, "train")
        ood_f = {k: f for k, (_, f) in _ood_features(frozen, cfg, image_store, warehouse, context).items()}
        return evaluation.probe_figures(
            frozen, _image_dataset(train_rows, classes, cfg, image_store), _labels(train_rows, classes),
            test.dataset, test.y, ood_f, len(classes), c=cfg.train.probe_c, knn_k=cfg.ood.knn_k,
            device=cfg.inference.device, log=context.log.warning)

    return figures


def _champion_macro_f1(cfg, client, ref: ModelRef, test: evaluation.HeldOut,
                       context) -> tuple[str | None, float | None]:
    """The current champion re-scored on the same test split (None: no other champion, or not comparable)."""
    champ = registry.champion_version(client, ref.model_name)
    if champ is None or champ == ref.version:
        return champ, None
    champ_model, champ_meta = load_registered(registry.model_uri(ref.model_name, champ))
    score = evaluation.rescore(champ_model, champ_meta["classes"], cfg.vocabulary(), test.dataset, test.y,
                               device=cfg.inference.device)
    if score is None:
        context.log.warning(f"champion v{champ} has other classes {champ_meta['classes']}: not comparable")
    return champ, score


def _label_set_metadata(cf: dict | None) -> dict:
    if cf is None:
        return {}
    return {
        "label_set_target_coverage": cf["target"],
        "label_set_coverage": cf["coverage"],
        "label_set_coverage_ci": dg.MetadataValue.json(cf["coverage_ci"]),
        "label_set_mean_size": cf["mean_set_size"],
        "label_set_size_counts": dg.MetadataValue.json(cf["set_size_counts"]),
        "label_sets_per_class": dg.MetadataValue.md(
            pd.DataFrame(cf["per_class"]).T.drop(columns=["coverage_ci"]).to_markdown()),
        **({"label_sets_multi_label": dg.MetadataValue.json(cf["multi_label"])}
           if "multi_label" in cf else {}),
    }


def _evaluation_metadata(cfg, result: dict, experiment_id: str, run_id: str) -> dict:
    return at_a_glance({
        "model_version": result["version"], "test_macro_f1": result["macro_f1"],
        "test_accuracy": result["accuracy"], "ece": result["ece"],
        "top2_joint_hit_rate": result.get("top2_joint_hit_rate"),
        "composites_top2_joint_hit_rate": result["composites"].get("top2_joint_hit_rate"),
        "composites_label_set_joint_coverage": result["composites"].get("label_set_joint_coverage"),
        "macro_f1_ci": dg.MetadataValue.json(result["macro_f1_ci"]),
        "ece_ci": dg.MetadataValue.json(result["ece_ci"]),
        "ood_auroc": dg.MetadataValue.json(result["ood_auroc"]),
        "ood_auroc_ci": dg.MetadataValue.json(result["ood_auroc_ci"]),
        "ood_auroc_by_score": dg.MetadataValue.json(result["ood_auroc_by_score"]),
        "probe_baseline": dg.MetadataValue.json(result["probe"]),
        "champion_version": result["champion_version"],
        "champion_macro_f1_same_test": result["champion_macro_f1"],
        **_mlflow_links(cfg, experiment_id, run_id, result["version"]),
        "per_task": dg.MetadataValue.md(pd.DataFrame(result["tasks"]).T.to_markdown()),
        "confusion_matrix": _artifact_link(cfg, run_id, "test_confusion_matrix"),
        "reliability": _artifact_link(cfg, run_id, "reliability"),
        **_label_set_metadata(result.get("conformal")),
    })


def build_evaluation_asset(cfg: SofarConfig) -> dg.AssetsDefinition:
    @dg.asset(group_name="training", kinds={"mlflow", "numpy"}, code_version="4", pool="gpu",
              op_tags=step_tags(cfg, gpu=True, workers=cfg.inference.num_workers))
    def model_evaluation(
        context: dg.AssetExecutionContext, ood_calibration: ModelRef, warehouse: WarehouseResource,
        mlflow_tracking: MlflowResource, image_store: ImageStoreResource,
    ) -> dg.Output[dict]:
        """The new version on the held-out test split, side by side with the current champion.

        Per task: accuracy and F1 of the N-class prediction mapped onto the task's binary
        question (the paper's Table 2); macro-F1 over all classes; ECE and a reliability
        diagram (temperature applied); top-2 joint hit rate on multi-label photos (both labels
        in the top-2); OOD AUROC on the test split against each irrelevant set; the label sets'
        empirical coverage and mean size, overall and per class (and, on multi-label photos, how
        often the set holds every label). The champion is re-scored on the same test split so
        the promotion gate compares like with like.
        """
        ref, client = ood_calibration, mlflow_tracking.client()
        data = warehouse.get().read_table("sofar_dataset")
        test = _held_out(cfg, data, image_store)
        model, meta = load_registered(ref.model_uri)
        cal = registry.read_calibration(client.get_model_version(ref.model_name, ref.version))
        scores = evaluation.ood_scores_by_method(tracking.load_calibration_report(ref.run_id))
        ev = evaluation.evaluate_version(
            model, meta, temperature=cal.temperature, score_method=cal.score_method,
            label_sets=cal.label_sets, ood_scores=scores, test=test, settings=evaluation_settings(cfg),
            probe=_probe(cfg, data, test, context, image_store, warehouse))
        champ, champ_f1 = _champion_macro_f1(cfg, client, ref, test, context)
        result = {"model_name": ref.model_name, "version": ref.version, **ev.result,
                  "champion_version": champ, "champion_macro_f1": champ_f1}
        registry.write_test_metrics(client, ref.model_name, ref.version, {"test_macro_f1": result["macro_f1"],
                                    "test_accuracy": result["accuracy"], "test_ece": result["ece"]})
        tracking.log_evaluation(ref.run_id, result, ev.figures)
        experiment_id = client.get_run(ref.run_id).info.experiment_id
        return dg.Output(result, metadata=_evaluation_metadata(cfg, result, experiment_id, ref.run_id))

    return model_evaluation


# -- the gate and champion_model --------------------------------------------------------------------
def build_gate_checks(cfg: SofarConfig, model_evaluation: dg.AssetsDefinition) -> list:
    """The blocking promotion-gate checks on ``model_evaluation`` (lib/model/gate.py)."""

    def _check(name: str, description: str):
        @dg.asset_check(name=name, asset=model_evaluation, blocking=True, description=description)
        def _gate_check(model_evaluation: dict) -> dg.AssetCheckResult:
            passed, metadata = gate_results(model_evaluation, cfg.gate)[name]
            return dg.AssetCheckResult(passed=passed, metadata=at_a_glance(metadata))

        return _gate_check

    return [_check(name, description) for name, description in GATE_CHECKS.items()]


def build_champion_asset(cfg: SofarConfig) -> dg.AssetsDefinition:
    @dg.asset(group_name="training", kinds={"mlflow"}, code_version="2")
    def champion_model(
        context: dg.AssetExecutionContext, model_evaluation: dict, mlflow_tracking: MlflowResource
    ) -> dg.Output[dict]:
        """Moves the MLflow alias ``champion`` to the new version — only after the blocking
        gate checks on ``model_evaluation`` passed (otherwise this step does not run and the
        champion stays). ``daily_predictions`` always reads ``models:/<name>@champion``, so an
        alias moved by hand in the MLflow UI is honored too.

        The verdict is re-computed from what the registry holds (the evaluation logged to the
        version's run, confirmed by its metrics, under the gate settings recorded on the version
        at training), never from the IO manager's copy: a stored ``model_evaluation`` that
        differs from the registered one refuses the promotion."""
        client = mlflow_tracking.client()
        name, version = model_evaluation["model_name"], str(model_evaluation["version"])
        try:
            verdict, source = registry.registry_gate(client, name, version, cfg.gate,
                                                     offered=model_evaluation)
        except registry.EvidenceError as exc:
            raise dg.Failure(description=f"{exc}; the champion stays.") from None
        failed = {k: md for k, (ok, md) in verdict.items() if not ok}
        if failed:  # e.g. a stored evaluation of a failed run, materialized on its own later
            raise dg.Failure(
                description=f"v{version} did not pass the promotion gate ({source}): {sorted(failed)}; "
                "the champion stays.", metadata={k: dg.MetadataValue.json(v) for k, v in failed.items()},
            )
        user = context.run.tags.get("user", "dagster")
        user = user if registry.text_problem(user) is None else ascii(user)  # one line, before the move
        previous = registry.set_champion(client, name, version)
        registry.record_promotion(client, name, version, previous, by=user,
                                  reason="passed the promotion gate on model_evaluation",
                                  via=f"champion_model (run {context.run_id[:8]})",
                                  gate=f"passed under {source}")
        moved = f"{'v' + previous if previous else 'none'} -> v{version}"
        context.log.info(f"{name}@{registry.CHAMPION}: {moved}")
        return dg.Output({"model_name": name, "version": version, "previous": previous},
                         metadata={"champion": f"models:/{name}@{registry.CHAMPION} = v{version}",
                                   "previous_version": previous, **_mlflow_links(cfg, None, None, version)})

    return champion_model


def build_model_assets(cfg: SofarConfig) -> tuple[list, list]:
    """The training assets (classifier → calibration → evaluation → champion) and the gate checks."""
    model_evaluation = build_evaluation_asset(cfg)
    assets = [build_classifier_asset(cfg), build_calibration_asset(cfg), model_evaluation,
              build_champion_asset(cfg)]
    return assets, build_gate_checks(cfg, model_evaluation)
