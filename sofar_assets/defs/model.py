"""Training, OOD calibration, evaluation and the gated champion alias in the MLflow registry.

Assets hand each other small pointers (model name + version + run id), never weights: the
weights live in MLflow, so lineage holds and a backfill knows exactly which version it used.
"""

import functools
import io
import warnings

import dagster as dg
import mlflow
import numpy as np
import pandas as pd
from PIL import Image

from sofar_assets.config import SofarConfig
from sofar_assets.defs.k8s import step_tags
from sofar_assets.defs.metadata import at_a_glance
from sofar_assets.defs.resources import ImageStoreResource, MlflowResource, WarehouseResource
from sofar_assets.lib.common import links
from sofar_assets.lib.common.devices import resolve_device
from sofar_assets.lib.common.names import shown
from sofar_assets.lib.data import dataset as ds
from sofar_assets.lib.data import storage
from sofar_assets.lib.data.images import ImageDataset
from sofar_assets.lib.model import calibration, conformal, evaluation, metrics, ood, plots
from sofar_assets.lib.model.gate import GATE_CHECKS, gate_results
from sofar_assets.lib.model.models import ModelSpec
from sofar_assets.lib.model.training import (
    TrainConfig,
    predict_logits,
    predict_logits_and_features,
    train_classifier,
)
from sofar_assets.lib.review.corrections import INSPECTOR_OOD_SET, irrelevant_uris
from sofar_assets.lib.serving import registry
from sofar_assets.lib.serving.packaging import load_registered, log_and_register
from sofar_assets.lib.warehouse import RAW_CORRECTIONS
from sofar_assets.settings import git_commit

OWNERS = ["team:ml-platform"]

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


def _png_image(png: bytes) -> Image.Image:
    return Image.open(io.BytesIO(png)).convert("RGB")


def _describe(client, name: str, version: str, text: str) -> None:
    """Registry descriptions: the version's own, and the model's if it has none yet."""
    client.update_model_version(name, version, description=text)
    if not (client.get_registered_model(name).description or "").strip():
        client.update_registered_model(name, (
            "ONE N-class image classifier over every SOFAR inspection task (one label space), with a "
            "OOD score threshold tagged on each version. @champion serves the daily predictions; it is "
            "moved by the champion_model asset after the promotion gate, or by `sofar promote` / `sofar rollback`."))


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


def _ood_set_features(model, cfg: SofarConfig, image_store, context,
                      ood_uris: dict[str, list[str]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(logits, features) of every readable image of every OOD set (``_ood_uris``)."""
    out = {}
    for name, uris in ood_uris.items():
        arrays, errors = calibration.read_images(uris, cfg.model.image_size,
                                                 cache=image_store.cache(cfg.model.image_size))
        for err in errors:
            context.log.warning(f"OOD set {name!r}: image skipped: {shown(err, 400)}")
        if not arrays:
            context.log.warning(f"OOD set {name!r} has no readable images; skipped")
            continue
        out[name] = predict_logits_and_features(model, evaluation.ArrayDataset(arrays, [0] * len(arrays)),
                                                device=cfg.inference.device)
    return out


def _dataset_input(cfg: SofarConfig, data: pd.DataFrame, digest: str):
    """``sofar_dataset`` as an MLflow dataset input: its hash as the digest, the warehouse table as
    the source (the DuckDB file locally, the BigQuery console's table page in production)."""
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    wh = cfg.storage.warehouse
    if wh.kind == "bigquery":
        source = HTTPDatasetSource(links.bigquery_table_url(wh.project, wh.dataset, "sofar_dataset"))
    else:  # a local path (or gs:// root): MLflow resolves it to its artifact dataset source
        source = f"{cfg.duckdb_path}#{wh.schema_}.sofar_dataset"
    cols = [c for c in ("sha256", "label", "split", "task") if c in data.columns]
    with warnings.catch_warnings():  # MLflow registers two local artifact sources and warns it picked one
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        return mlflow.data.from_pandas(data[cols], source=source, name="sofar_dataset", digest=digest[:16])


def build_model_assets(cfg: SofarConfig) -> list:
    classes = cfg.vocabulary()
    index = {c: i for i, c in enumerate(classes)}

    def _mlflow_links(experiment_id: str | None, run_id: str | None, version: str) -> dict:
        """Clickable MLflow pages in the asset's metadata (base URL: ui.mlflow_url)."""
        md = {"mlflow_model_version": dg.MetadataValue.url(links.mlflow_version_url(cfg.ui.mlflow_url, cfg.model.name, version))}
        if run_id is not None:
            md["mlflow_run"] = dg.MetadataValue.url(links.mlflow_run_url(cfg.ui.mlflow_url, experiment_id, run_id))
        return md

    @dg.asset(
        deps=["sofar_dataset"],
        group_name="training",
        kinds={"pytorch", "mlflow"},
        owners=OWNERS,
        code_version="2",
        pool="gpu",
        op_tags=step_tags(cfg, gpu=True, workers=cfg.train.num_workers, batch_size=cfg.train.batch_size,
                          device=cfg.train.device),
    )
    def sofar_classifier(
        context: dg.AssetExecutionContext, warehouse: WarehouseResource, mlflow_tracking: MlflowResource, image_store: ImageStoreResource
    ) -> dg.Output[dict]:
        """ONE N-class classifier over the concatenated label space (the GPU step).

        Trains the configured architecture (``linear`` or the paper's ``pmg``) with the recipe
        of ``lib/model/training.py`` (linear probe, then fine-tuning on augmented photos with
        patience), keeps the epoch with the best val macro-F1 (ties: lower val loss), and
        registers it in MLflow (safetensors + JSON config + the feature-score statistics of the
        train split, tagged with the dataset hash and the git commit).
        """
        data = warehouse.get().read_table("sofar_dataset")
        digest = ds.dataset_hash(data)
        train_rows, val_rows = _split(data, "train"), _split(data, "val")
        if train_rows.empty or val_rows.empty:
            raise dg.Failure(
                description=f"sofar_dataset has {len(train_rows)} train and {len(val_rows)} val single-label images; "
                "both are needed. Add images or raise dataset.val_fraction in the config."
            )
        missing = sorted(set(classes) - set(train_rows["label"]))
        if missing:
            context.log.warning(f"classes without training images: {missing}")
        spec = model_spec(cfg, len(classes))
        tcfg = TrainConfig(**cfg.train.model_dump())
        # a registry is created only on a first run: not when the warehouse remembers its versions
        mlflow_tracking.require_registry(cfg.model.name, registry.predicted_versions(warehouse.get(), cfg.model.name))
        experiment_id = mlflow_tracking.setup()
        with mlflow.start_run(
            experiment_id=experiment_id,
            run_name=f"{cfg.model.name}-{context.run_id[:8]}",
            tags={"dagster_run_id": context.run_id, "dataset_hash": digest, "git_commit": git_commit(),
                  "dagster_run_url": links.dagster_run_url(cfg.ui.dagster_url, context.run_id)},
        ) as run:
            mlflow.log_params(
                {**{f"model.{k}": v for k, v in spec.to_dict().items()},
                 **{f"train.{k}": v for k, v in cfg.train.model_dump().items()},
                 "dataset_hash": digest, "train_images": len(train_rows), "val_images": len(val_rows),
                 "classes": ",".join(classes)}
            )
            mlflow.log_dict({"classes": classes}, "classes.json")
            mlflow.log_input(_dataset_input(cfg, data, digest), context="training")  # "Dataset" in the run's view
            result = train_classifier(
                spec,
                _image_dataset(train_rows, classes, cfg, image_store),
                _image_dataset(val_rows, classes, cfg, image_store),
                tcfg,
                log=context.log.info,
                on_epoch=lambda m: mlflow.log_metrics(
                    {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and k != "epoch"},
                    step=int(m["epoch"]),
                ),
            )
            val_logits = predict_logits(result.model, _image_dataset(val_rows, classes, cfg, image_store),
                                        device=tcfg.device)
            val_y = val_rows["label"].map(index).to_numpy()
            cm = metrics.confusion_matrix(val_y, val_logits.argmax(1), len(classes))
            cm_png = plots.confusion_matrix_png(cm, classes)
            curves_png = plots.training_curves_png(result.history, ["train_loss", "val_loss"])
            mlflow.log_image(_png_image(cm_png), "val_confusion_matrix.png")
            mlflow.log_image(_png_image(curves_png), "training_curves.png")
            final = {f"best_{k}": float(v) for k, v in result.best_val_metrics.items() if isinstance(v, (int, float))}
            mlflow.log_metrics({**final, "images_per_s": result.images_per_s, "data_wait_share": result.data_wait_share})
            reg = log_and_register(
                result.model,
                spec,
                classes,
                cfg.model.name,
                extra={"dataset_hash": digest, "git_commit": git_commit(), "best_epoch": result.best_epoch,
                       "ood_knn_k": cfg.ood.knn_k},
                ood_stats=ood.fit_feature_stats(result.train_features, result.train_labels,
                                                knn_bank_max=cfg.ood.knn_bank_max,
                                                knn_bank_reduction=cfg.ood.knn_bank_reduction),
                model_config={"allowed_roots": cfg.upload_roots},  # the URIs the served model may read
                tags={"dataset_hash": digest, "git_commit": git_commit(), "dagster_run_id": context.run_id,
                      "dagster_run_url": links.dagster_run_url(cfg.ui.dagster_url, context.run_id),
                      "val_macro_f1": f"{result.best_val_macro_f1:.4f}"},
            )
            # the gate this version is held to, whoever re-checks it later (promote, rollback)
            registry.record_gate_config(mlflow_tracking.client(), cfg.model.name, str(reg["version"]), cfg.gate)
            _describe(mlflow_tracking.client(), cfg.model.name, str(reg["version"]),
                      f"{spec.arch} head on {spec.backbone} at {spec.image_size} px, {len(classes)} classes "
                      f"({', '.join(classes)}); dataset {digest[:12]}, {len(train_rows)} train / {len(val_rows)} val "
                      f"images; best epoch {result.best_epoch}, val macro-F1 {result.best_val_macro_f1:.3f}. "
                      f"Trained by Dagster run {links.dagster_run_url(cfg.ui.dagster_url, context.run_id)}")
        ref = {
            "model_name": cfg.model.name,
            "version": str(reg["version"]),
            "model_uri": f"models:/{cfg.model.name}/{reg['version']}",
            "run_id": run.info.run_id,
            "dataset_hash": digest,
            "classes": classes,
        }
        context.log.info(f"registered {ref['model_uri']} (val macro-F1 {result.best_val_macro_f1:.3f})")
        return dg.Output(
            ref,
            metadata=at_a_glance({
                "model_uri": ref["model_uri"],
                "model_version": ref["version"],
                "mlflow_run_id": ref["run_id"],
                **_mlflow_links(experiment_id, ref["run_id"], ref["version"]),
                "dataset_hash": digest,
                "best_epoch": result.best_epoch,
                "val_macro_f1": result.best_val_macro_f1,
                "train_images_per_s": result.images_per_s,
                "data_wait_share": result.data_wait_share,
                "device": str(resolve_device(tcfg.device)),
                "training_curves": dg.MetadataValue.url(links.mlflow_artifact_url(
                    cfg.ui.mlflow_url, run.info.run_id, "training_curves.png")),
                "val_confusion_matrix": dg.MetadataValue.url(links.mlflow_artifact_url(
                    cfg.ui.mlflow_url, run.info.run_id, "val_confusion_matrix.png")),
            }),
        )

    @dg.asset(group_name="training", kinds={"mlflow", "numpy"}, owners=OWNERS, code_version="3", pool="gpu",
              op_tags=step_tags(cfg, gpu=True, workers=cfg.inference.num_workers))
    def ood_calibration(
        context: dg.AssetExecutionContext, sofar_classifier: dict, warehouse: WarehouseResource, mlflow_tracking: MlflowResource,
        image_store: ImageStoreResource,
    ) -> dg.Output[dict]:
        """Out-of-distribution threshold for the model version, and every OOD score side by side.

        Temperature scaling fitted on the val split (changes probabilities, not the top-2);
        the configured OOD score (``ood.score``: kNN by default, measured on real photos; the
        paper's max logit is one setting away)
        thresholded at the target in-distribution TPR on the val split. AUROC and FPR@TPR of
        every score (max logit, energy, max softmax, Mahalanobis, kNN) on each configured
        irrelevant image set, and one-class AUROC per task. The conformal label-set rule
        (``conformal.coverage``, lib/model/conformal.py) is calibrated on the same val probabilities
        (temperature applied). Score method, temperature, threshold and the label-set rule are
        tags on the MLflow model version (lib/serving/registry.py).
        """
        client = mlflow_tracking.client()
        model, meta = load_registered(sofar_classifier["model_uri"])
        val_rows = _split(warehouse.get().read_table("sofar_dataset"), "val")
        logits, feats = predict_logits_and_features(model, _image_dataset(val_rows, classes, cfg, image_store),
                                                    device=cfg.inference.device)
        val_y = val_rows["label"].map(index).to_numpy()
        report = calibration.calibrate(
            logits, val_y, feats, meta["ood_stats"],
            _ood_set_features(model, cfg, image_store, context, _ood_uris(cfg, warehouse, context)),
            score_method=cfg.ood.score,
            target_tpr=cfg.ood.target_tpr, knn_k=ood.package_knn_k(meta, cfg.ood.knn_k),  # the k serving uses
            threshold_rule=cfg.ood.threshold,
            task_positives={t: index[task.positive_label] for t, task in cfg.tasks.items()})
        if report["temperature_at_bound"]:
            context.log.warning(
                f"temperature hit its lower bound {calibration.TEMPERATURE_MIN}: the val NLL keeps falling as it "
                "sharpens (val split perfectly separated, or the model underconfident); probabilities use the bound")
        temperature, threshold = report["temperature"], report["threshold"]
        label_sets = conformal.calibrate(ood.softmax(logits, temperature), val_y, coverage=cfg.conformal.coverage,
                                         method=cfg.conformal.method)
        if np.isinf(label_sets.qhat):
            context.log.warning(f"{len(val_y)} val images are too few for label sets at coverage "
                                f"{cfg.conformal.coverage}: every set holds every label")
        registry.write_calibration(
            client, sofar_classifier["model_name"], sofar_classifier["version"],
            registry.Calibration(cfg.ood.score, temperature, threshold, label_sets), target_tpr=cfg.ood.target_tpr,
            extra={f"ood_auroc_{k}": f"{v['auroc']:.4f}" for k, v in report["ood_sets"].items()},
        )
        curves = {name: (*ood.roc_curve(report["val_scores"], s), report["ood_sets"][name]["auroc"])
                  for name, s in report["ood_scores"].items()}
        side_by_side = {f"{name}/{m}": r for name, sets in report["ood_sets"].items() for m, r in sets["scores"].items()}
        with mlflow.start_run(run_id=sofar_classifier["run_id"]):
            mlflow.log_dict(report, "ood_calibration.json")
            mlflow.log_metrics({"ood_temperature": temperature, "ood_threshold": threshold,
                                **({"conformal_qhat": label_sets.qhat} if np.isfinite(label_sets.qhat) else {}),
                                **{f"ood_auroc_{k}": v["auroc"] for k, v in report["ood_sets"].items()},
                                **{f"ood_fpr_at_tpr_{k}": v["fpr_at_tpr"] for k, v in report["ood_sets"].items()},
                                **{f"ood_auroc_{k.replace('/', '_')}": v["auroc"] for k, v in side_by_side.items()},
                                **{f"task_auroc_{k}": v for k, v in report["task_auroc"].items()}})
            roc_png = plots.roc_png(curves) if curves else None
            if roc_png:
                mlflow.log_image(_png_image(roc_png), "ood_roc.png")
        out = {**sofar_classifier, **{k: report[k] for k in ("score_method", "temperature", "threshold", "target_tpr")},
               "ood_sets": report["ood_sets"], "ood_scores": report["ood_scores"],
               "ood_scores_by_method": report["ood_scores_by_method"], "label_sets": label_sets.as_dict()}
        md = {
            "threshold": threshold, "temperature": temperature, "score_method": cfg.ood.score,
            "val_tpr": report["val_tpr"], "val_nll_before": report["val_nll_before"],
            "val_nll_after": report["val_nll_after"],
            "val_score_range": dg.MetadataValue.json([report["val_score_min"], report["val_score_max"]]),
            "ood_report": dg.MetadataValue.json({k: {kk: vv for kk, vv in v.items() if kk != "scores"}
                                                 for k, v in report["ood_sets"].items()}),
            "ood_scores_side_by_side": dg.MetadataValue.md(calibration.scores_table(report["ood_sets"])),
            "task_auroc": dg.MetadataValue.json(report["task_auroc"]),
            "label_sets": dg.MetadataValue.json(label_sets.as_dict()),
            "model_version": sofar_classifier["version"],
        }
        for name, r in report["ood_sets"].items():
            md[f"auroc_{name}"] = r["auroc"]
            md[f"rejected_share_{name}"] = r["rejected_share"]
        if roc_png:
            md["roc"] = dg.MetadataValue.url(links.mlflow_artifact_url(cfg.ui.mlflow_url, sofar_classifier["run_id"],
                                                                       "ood_roc.png"))
        return dg.Output(out, metadata=at_a_glance(md))

    def _probe_figures(data: pd.DataFrame, test_ds, y, context, image_store, warehouse) -> dict:
        """The frozen-feature probe baseline on the same train/test split (and OOD sets)."""
        train_rows = _split(data, "train")
        frozen = evaluation.frozen_feature_model(model_spec(cfg, len(classes)))
        _, train_f = predict_logits_and_features(frozen, _image_dataset(train_rows, classes, cfg, image_store),
                                                 device=cfg.inference.device)
        _, test_f = predict_logits_and_features(frozen, test_ds, device=cfg.inference.device)
        ood_f = {k: f for k, (_, f) in _ood_set_features(frozen, cfg, image_store, context,
                                                          _ood_uris(cfg, warehouse, context)).items()}
        try:
            pb = evaluation.probe_baseline(train_f, train_rows["label"].map(index).to_numpy(), test_f, ood_f,
                                           len(classes), c=cfg.train.probe_c, knn_k=cfg.ood.knn_k)
        except ValueError as exc:  # e.g. a train split with one class
            context.log.warning(f"probe baseline skipped: {exc}")
            return {"skipped": str(exc)}
        pred = pb.test_logits.argmax(1)
        return {"accuracy": metrics.accuracy(y, pred), "macro_f1": metrics.macro_f1(y, pred, len(classes)),
                "ood_auroc_by_score": {name: {m: ood.auroc(pb.test_scores[m], v) for m, v in by.items()}
                                       for name, by in pb.ood_scores.items()}}

    @dg.asset(group_name="training", kinds={"mlflow", "numpy"}, owners=OWNERS, code_version="3", pool="gpu",
              op_tags=step_tags(cfg, gpu=True, workers=cfg.inference.num_workers))
    def model_evaluation(
        context: dg.AssetExecutionContext, ood_calibration: dict, warehouse: WarehouseResource, mlflow_tracking: MlflowResource,
        image_store: ImageStoreResource,
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
        ref = ood_calibration
        client = mlflow_tracking.client()
        data = warehouse.get().read_table("sofar_dataset")
        test_rows = _split(data, "test")
        if test_rows.empty:
            raise dg.Failure(description="sofar_dataset has no single-label test images; raise dataset.test_fraction")
        test_ds = _image_dataset(test_rows, classes, cfg, image_store)
        y = test_rows["label"].map(index).to_numpy()
        model, meta = load_registered(ref["model_uri"])
        logits, feats = predict_logits_and_features(model, test_ds, device=cfg.inference.device)
        pred = logits.argmax(1)
        multi = data[data["multi_label"]].reset_index(drop=True)
        multi_logits = (predict_logits(model, _image_dataset(multi, classes, cfg, image_store),  # label: the first
                                       device=cfg.inference.device) if not multi.empty else None)
        multi_sets = [{index[lab] for lab in labels.split("|")} for labels in multi["labels"]]
        result = {
            "model_name": ref["model_name"], "version": ref["version"],
            **evaluation.evaluate_test(
                y, logits, feats, num_classes=len(classes), temperature=ref["temperature"],
                score_method=ref["score_method"], stats=meta["ood_stats"], knn_k=ood.package_knn_k(meta, cfg.ood.knn_k),
                ood_scores_by_method=ref.get("ood_scores_by_method")
                or {k: {ref["score_method"]: v} for k, v in ref.get("ood_scores", {}).items()},
                tasks={t: (index[task.positive_label], {index[lab] for lab in task.labels.values()})
                       for t, task in cfg.tasks.items()},
                multi_logits=multi_logits,
                multi_label_sets=multi_sets,
                n_resamples=cfg.gate.bootstrap_resamples),
        }
        probs = ood.softmax(logits, ref["temperature"])
        if ref.get("label_sets"):
            rule = conformal.LabelSets(**ref["label_sets"])
            result["conformal"] = conformal.evaluate(rule, probs, y, classes)
            if multi_logits is not None:
                result["conformal"]["multi_label"] = conformal.joint_hit_rate(
                    rule, ood.softmax(multi_logits, ref["temperature"]), multi_sets)
        positives = sorted({index[t.positive_label] for t in cfg.tasks.values() if t.positive_label in index})
        result["composites"] = evaluation.composite_evaluation(  # two states in one photo, from single-state ones
            model, test_ds, y, [(a, b) for k, a in enumerate(positives) for b in positives[k + 1:]],
            temperature=ref["temperature"], device=cfg.inference.device,
            rule=conformal.LabelSets(**ref["label_sets"]) if ref.get("label_sets") else None)
        if cfg.train.freeze_backbone and cfg.train.linear_probe is True and cfg.model.arch == "linear" \
                and cfg.model.pretrained:
            # the model IS the probe (LP on the frozen pretrained features, same split, same C)
            result["probe"] = {"accuracy": result["accuracy"], "macro_f1": result["macro_f1"],
                               "ood_auroc_by_score": result["ood_auroc_by_score"], "same_as_model": True}
        else:
            result["probe"] = _probe_figures(data, test_ds, y, context, image_store, warehouse)
        champ = registry.champion_version(client, ref["model_name"])
        result["champion_version"] = champ
        result["champion_macro_f1"] = None
        if champ is not None and champ != ref["version"]:
            champ_model, champ_meta = load_registered(registry.model_uri(ref["model_name"], champ))
            if list(champ_meta["classes"]) == classes:
                cl = predict_logits(champ_model, test_ds, device=cfg.inference.device)
                result["champion_macro_f1"] = metrics.macro_f1(y, cl.argmax(1), len(classes))
            else:
                context.log.warning(f"champion v{champ} has other classes {champ_meta['classes']}: not comparable")
        cm = metrics.confusion_matrix(y, pred, len(classes))
        bins = metrics.reliability_bins(probs, y)
        for k, v in {"test_macro_f1": result["macro_f1"], "test_accuracy": result["accuracy"],
                     "test_ece": result["ece"]}.items():
            client.set_model_version_tag(ref["model_name"], ref["version"], k, f"{v:.4f}")
        with mlflow.start_run(run_id=ref["run_id"]):
            mlflow.log_metrics({
                "test_accuracy": result["accuracy"], "test_macro_f1": result["macro_f1"], "test_ece": result["ece"],
                **{f"test_{t}_accuracy": m["accuracy"] for t, m in result["tasks"].items()},
                **{f"test_{t}_f1": m["f1"] for t, m in result["tasks"].items()},
                **({"top2_joint_hit_rate": result["top2_joint_hit_rate"]} if "top2_joint_hit_rate" in result else {}),
                **{f"test_ood_auroc_{k}": v for k, v in result["ood_auroc"].items()},
                **({"probe_test_macro_f1": result["probe"]["macro_f1"], "probe_test_accuracy": result["probe"]["accuracy"]}
                   if result["probe"].get("macro_f1") is not None else {}),
                **({"test_label_set_coverage": cf["coverage"], "test_label_set_mean_size": cf["mean_set_size"]}
                   if (cf := result.get("conformal")) else {}),
            })
            mlflow.log_dict(result, "evaluation.json")
            cm_png, rel_png = plots.confusion_matrix_png(cm, classes), plots.reliability_png(bins)
            mlflow.log_image(_png_image(cm_png), "test_confusion_matrix.png")
            mlflow.log_image(_png_image(rel_png), "reliability.png")
        task_table = pd.DataFrame(result["tasks"]).T
        cf = result.get("conformal")
        label_set_md = {} if cf is None else {
            "label_set_target_coverage": cf["target"],
            "label_set_coverage": cf["coverage"],
            "label_set_coverage_ci": dg.MetadataValue.json(cf["coverage_ci"]),
            "label_set_mean_size": cf["mean_set_size"],
            "label_set_size_counts": dg.MetadataValue.json(cf["set_size_counts"]),
            "label_sets_per_class": dg.MetadataValue.md(pd.DataFrame(cf["per_class"]).T.drop(columns=["coverage_ci"])
                                                        .to_markdown()),
            **({"label_sets_multi_label": dg.MetadataValue.json(cf["multi_label"])} if "multi_label" in cf else {}),
        }
        return dg.Output(
            result,
            metadata=at_a_glance({
                "model_version": ref["version"],
                "test_macro_f1": result["macro_f1"],
                "test_accuracy": result["accuracy"],
                "ece": result["ece"],
                "top2_joint_hit_rate": result.get("top2_joint_hit_rate"),
                "composites_top2_joint_hit_rate": result["composites"].get("top2_joint_hit_rate"),
                "composites_label_set_joint_coverage": result["composites"].get("label_set_joint_coverage"),
                "macro_f1_ci": dg.MetadataValue.json(result["macro_f1_ci"]),
                "ece_ci": dg.MetadataValue.json(result["ece_ci"]),
                "ood_auroc": dg.MetadataValue.json(result["ood_auroc"]),
                "ood_auroc_ci": dg.MetadataValue.json(result["ood_auroc_ci"]),
                "ood_auroc_by_score": dg.MetadataValue.json(result["ood_auroc_by_score"]),
                "probe_baseline": dg.MetadataValue.json(result["probe"]),
                "champion_version": champ,
                "champion_macro_f1_same_test": result["champion_macro_f1"],
                **_mlflow_links(client.get_run(ref["run_id"]).info.experiment_id, ref["run_id"], ref["version"]),
                "per_task": dg.MetadataValue.md(task_table.to_markdown()),
                "confusion_matrix": dg.MetadataValue.url(links.mlflow_artifact_url(
                    cfg.ui.mlflow_url, ref["run_id"], "test_confusion_matrix.png")),
                "reliability": dg.MetadataValue.url(links.mlflow_artifact_url(
                    cfg.ui.mlflow_url, ref["run_id"], "reliability.png")),
                **label_set_md,
            }),
        )

    gate = cfg.gate

    def _check(name: str, description: str):
        @dg.asset_check(name=name, asset=model_evaluation, blocking=True, description=description)
        def _gate_check(model_evaluation: dict) -> dg.AssetCheckResult:
            passed, metadata = gate_results(model_evaluation, gate)[name]
            return dg.AssetCheckResult(passed=passed, metadata=at_a_glance(metadata))

        return _gate_check

    gate_checks = [_check(name, description) for name, description in GATE_CHECKS.items()]

    @dg.asset(group_name="training", kinds={"mlflow"}, owners=OWNERS, code_version="2")
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
            verdict, source = registry.registry_gate(client, name, version, gate, offered=model_evaluation)
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
                                  via=f"champion_model (run {context.run_id[:8]})", gate=f"passed under {source}")
        context.log.info(f"{name}@{registry.CHAMPION}: {'v' + previous if previous else 'none'} -> v{version}")
        return dg.Output({"model_name": name, "version": version, "previous": previous},
                         metadata={"champion": f"models:/{name}@{registry.CHAMPION} = v{version}",
                                   "previous_version": previous,
                                   **_mlflow_links(None, None, version)})

    return [sofar_classifier, ood_calibration, model_evaluation, champion_model], gate_checks
