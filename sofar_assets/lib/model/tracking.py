"""What goes to MLflow for a training run: ONE module owns it.

Run tags, parameters, the dataset input, per-epoch and final metrics, figures (PNG images),
the calibration and evaluation reports, the trade-off report's run, and the registry
descriptions. ``defs/model.py`` and ``defs/tradeoff.py`` call these; the model VERSION's tags
and aliases stay with ``lib/serving/registry.py``. No Dagster here.

:class:`ModelRef` is what the training assets hand each other: a small frozen pointer to a
registered version and the run that trained it (the weights, reports and per-image scores live
in MLflow, found from it).
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import mlflow
import numpy as np
from PIL import Image

from sofar_assets.lib.common import links

CALIBRATION_ARTIFACT = "ood_calibration.json"
EVALUATION_ARTIFACT = "evaluation.json"  # lib/serving/registry.py reads it back
FIGURES = {"training_curves": "training_curves.png", "val_confusion_matrix": "val_confusion_matrix.png",
           "test_confusion_matrix": "test_confusion_matrix.png", "reliability": "reliability.png",
           "roc": "ood_roc.png", "tradeoff": "tradeoff.png"}
MODEL_DESCRIPTION = (
    "ONE N-class image classifier over every SOFAR inspection task (one label space), with a "
    "OOD score threshold tagged on each version. @champion serves the daily predictions; it is "
    "moved by the champion_model asset after the promotion gate, or by `sofar promote` / `sofar rollback`.")


@dataclass(frozen=True)
class ModelRef:
    """A registered model version and the MLflow run that trained it."""

    model_name: str
    version: str
    run_id: str
    dataset_hash: str

    @property
    def model_uri(self) -> str:
        return f"models:/{self.model_name}/{self.version}"

    @classmethod
    def from_dict(cls, value: dict) -> ModelRef:
        """From a stored output (extra keys of older, larger outputs are ignored)."""
        return cls(**{f.name: str(value[f.name]) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class RunOrigin:
    """Where a run comes from: the Dagster run (id and page) and the code's git commit."""

    dagster_run_id: str
    dagster_run_url: str
    git_commit: str


def run_tags(origin: RunOrigin, dataset_hash: str, **extra: str) -> dict[str, str]:
    """The tags of every run we log (and of a registered version): origin and dataset hash."""
    return {"dagster_run_id": origin.dagster_run_id, "dataset_hash": dataset_hash,
            "git_commit": origin.git_commit, "dagster_run_url": origin.dagster_run_url, **extra}


@contextmanager
def run(experiment_id: str, run_name: str, tags: dict[str, str]) -> Iterator[mlflow.ActiveRun]:
    """A new run in ``experiment_id``, active inside the ``with``."""
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as active:
        yield active


def log_png(png: bytes, name: str) -> None:
    """A PNG figure as an MLflow image of the active run."""
    mlflow.log_image(Image.open(io.BytesIO(png)).convert("RGB"), name)


def _numbers(values: dict) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def dataset_input(data, digest: str, *, bigquery_table: tuple[str, str] | None = None,
                  local_table: str | None = None):
    """``sofar_dataset`` as an MLflow dataset input: its hash as the digest, the warehouse table as
    the source (the DuckDB file locally, the BigQuery console's table page in production)."""
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    if bigquery_table is not None:  # (project, dataset)
        source = HTTPDatasetSource(links.bigquery_table_url(*bigquery_table, "sofar_dataset"))
    else:  # a local path (or gs:// root): MLflow resolves it to its artifact dataset source
        source = local_table
    cols = [c for c in ("sha256", "label", "split", "task") if c in data.columns]
    with warnings.catch_warnings():  # MLflow registers two local artifact sources and warns it picked one
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        return mlflow.data.from_pandas(data[cols], source=source, name="sofar_dataset", digest=digest[:16])


def log_training_inputs(spec: dict, train: dict, classes: list[str], digest: str, n_train: int, n_val: int,
                        dataset) -> None:
    """Parameters (network, recipe, data), ``classes.json`` and the dataset input of the active run."""
    mlflow.log_params({**{f"model.{k}": v for k, v in spec.items()},
                       **{f"train.{k}": v for k, v in train.items()}, "dataset_hash": digest,
                       "train_images": n_train, "val_images": n_val, "classes": ",".join(classes)})
    mlflow.log_dict({"classes": classes}, "classes.json")
    mlflow.log_input(dataset, context="training")  # "Dataset" in the run's view


def log_epoch(row: dict) -> None:
    """One training history row as step metrics (``train_classifier``'s ``on_epoch``)."""
    mlflow.log_metrics({k: v for k, v in _numbers(row).items() if k != "epoch"}, step=int(row["epoch"]))


def log_training_result(result, figures: dict[str, bytes]) -> None:
    """The best epoch's metrics, throughput and the training figures (``FIGURES`` keys)."""
    final = {f"best_{k}": v for k, v in _numbers(result.best_val_metrics).items()}
    mlflow.log_metrics({**final, "images_per_s": result.images_per_s,
                        "data_wait_share": result.data_wait_share})
    for key, png in figures.items():
        log_png(png, FIGURES[key])


def version_description(spec, classes: list[str], digest: str, n_train: int, n_val: int, result,
                        dagster_run_url: str) -> str:
    """The registered version's description: network, classes, data and its best epoch."""
    return (f"{spec.arch} head on {spec.backbone} at {spec.image_size} px, {len(classes)} classes "
            f"({', '.join(classes)}); dataset {digest[:12]}, {n_train} train / {n_val} val "
            f"images; best epoch {result.best_epoch}, val macro-F1 {result.best_val_macro_f1:.3f}. "
            f"Trained by Dagster run {dagster_run_url}")


def describe(client, name: str, version: str, text: str) -> None:
    """Registry descriptions: the version's own, and the model's if it has none yet."""
    client.update_model_version(name, version, description=text)
    if not (client.get_registered_model(name).description or "").strip():
        client.update_registered_model(name, MODEL_DESCRIPTION)


def calibration_metrics(report: dict, qhat: float) -> dict[str, float]:
    """The calibration's run metrics: temperature, threshold, the rule's qhat, every AUROC."""
    side_by_side = {f"{name}/{m}": r for name, sets in report["ood_sets"].items()
                    for m, r in sets["scores"].items()}
    return {"ood_temperature": report["temperature"], "ood_threshold": report["threshold"],
            **({"conformal_qhat": qhat} if np.isfinite(qhat) else {}),
            **{f"ood_auroc_{k}": v["auroc"] for k, v in report["ood_sets"].items()},
            **{f"ood_fpr_at_tpr_{k}": v["fpr_at_tpr"] for k, v in report["ood_sets"].items()},
            **{f"ood_auroc_{k.replace('/', '_')}": v["auroc"] for k, v in side_by_side.items()},
            **{f"task_auroc_{k}": v for k, v in report["task_auroc"].items()}}


def log_calibration(run_id: str, report: dict, qhat: float, roc_png: bytes | None) -> None:
    """The calibration report (per-image scores included), its metrics and ROC figure, in the
    version's training run."""
    with mlflow.start_run(run_id=run_id):
        mlflow.log_dict(report, CALIBRATION_ARTIFACT)
        mlflow.log_metrics(calibration_metrics(report, qhat))
        if roc_png:
            log_png(roc_png, FIGURES["roc"])


def load_calibration_report(run_id: str) -> dict:
    """The calibration report ``log_calibration`` logged to ``run_id``."""
    return mlflow.artifacts.load_dict(f"runs:/{run_id}/{CALIBRATION_ARTIFACT}")


def evaluation_metrics(result: dict) -> dict[str, float]:
    """The evaluation's run metrics (``test_*``; registry.py confirms evaluation.json with three)."""
    cf, probe = result.get("conformal"), result["probe"]
    return {
        "test_accuracy": result["accuracy"], "test_macro_f1": result["macro_f1"], "test_ece": result["ece"],
        **{f"test_{t}_accuracy": m["accuracy"] for t, m in result["tasks"].items()},
        **{f"test_{t}_f1": m["f1"] for t, m in result["tasks"].items()},
        **({"top2_joint_hit_rate": result["top2_joint_hit_rate"]} if "top2_joint_hit_rate" in result else {}),
        **{f"test_ood_auroc_{k}": v for k, v in result["ood_auroc"].items()},
        **({"probe_test_macro_f1": probe["macro_f1"], "probe_test_accuracy": probe["accuracy"]}
           if probe.get("macro_f1") is not None else {}),
        **({"test_label_set_coverage": cf["coverage"], "test_label_set_mean_size": cf["mean_set_size"]}
           if cf else {}),
    }


def log_evaluation(run_id: str, result: dict, figures: dict[str, bytes]) -> None:
    """The evaluation (``evaluation.json``), its metrics and figures, in the version's training run."""
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(evaluation_metrics(result))
        mlflow.log_dict(result, EVALUATION_ARTIFACT)
        for key, png in figures.items():
            log_png(png, FIGURES[key])


def tradeoff_metrics(report: dict) -> dict[str, float]:
    systems = report["systems"]
    return {f"{s['system']}_{k}_{n}": v for s in systems for k in ("ood_auroc", "ood_fpr_at_95tpr")
            for n, v in s[k].items() if v is not None} | {
        f"{s['system']}_{k}": s[k] for s in systems for k in ("s_per_1k_images", "train_s")}


def log_tradeoff_report(experiment_id: str, run_name: str, tags: dict[str, str], report: dict, table: str,
                        png: bytes, report_file: str, save_multitask) -> str:
    """The trade-off report's own run: the report (JSON + markdown), its figure, metrics and the
    multi-task model (``save_multitask(folder) -> package folder``). Returns the run id."""
    import tempfile
    from pathlib import Path

    with run(experiment_id, run_name, tags) as active:
        mlflow.log_dict(report, report_file)
        mlflow.log_text(table, "tradeoff_report.md")
        log_png(png, FIGURES["tradeoff"])
        mlflow.log_metrics(tradeoff_metrics(report))
        with tempfile.TemporaryDirectory(prefix="sofar-multitask-") as tmp:
            mlflow.log_artifacts(str(save_multitask(Path(tmp))), "multitask_model")
    return active.info.run_id
