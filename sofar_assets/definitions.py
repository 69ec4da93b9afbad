"""The one Dagster code location: ``dagster dev -m sofar_assets.definitions`` (or workspace.yaml).

The asset graph is built from the config that ``SOFAR_CONFIG`` names (see settings.py): one
raw label table per task → ``sofar_dataset`` → ``sofar_classifier`` → ``ood_calibration`` →
``model_evaluation`` (+ blocking gate checks) → ``champion_model`` → ``daily_predictions``;
inspectors' corrections (``label_corrections``) feed ``sofar_dataset`` and ``field_accuracy``.
"""

from __future__ import annotations

import warnings

import dagster as dg

from sofar_assets.config import SofarConfig, load_config
from sofar_assets.defs.corrections import build_corrections_assets
from sofar_assets.defs.data import build_dataset_asset, build_raw_label_asset
from sofar_assets.defs.late_uploads import build_late_upload_sensor
from sofar_assets.defs.metadata import OWNERS
from sofar_assets.defs.model import build_model_assets
from sofar_assets.defs.predictions import build_prediction_assets
from sofar_assets.defs.resources import build_resources
from sofar_assets.defs.runs import max_runtime_tags
from sofar_assets.defs.tradeoff import build_tradeoff_assets
from sofar_assets.settings import config_path

TRAINING_SELECTION = dg.AssetSelection.groups("ingest", "training")

# BackfillPolicy is marked beta in 1.13; we rely on it knowingly (single-run backfills).
warnings.filterwarnings("ignore", category=dg.BetaWarning, message=".*backfill_policy.*")


def _executor(cfg: SofarConfig):
    kind = cfg.storage.executor
    if kind == "k8s":
        from sofar_assets.defs.k8s import sofar_k8s_executor

        return sofar_k8s_executor(cfg)
    if kind == "multiprocess":
        return dg.multiprocess_executor
    # DuckDB allows one writer: locally every step of a run executes in one process, in order.
    return dg.in_process_executor


def with_asset_policy(assets: list) -> list:
    """The policy every asset follows, applied once here over all asset specs: its owners."""
    return list(dg.map_asset_specs(lambda spec: spec.replace_attributes(owners=OWNERS), assets))


def build_definitions(cfg: SofarConfig) -> dg.Definitions:
    raw = [build_raw_label_asset(cfg, name, task) for name, task in cfg.tasks.items()]
    dataset = build_dataset_asset(cfg, [a.key for a in raw])
    model_assets, gate_checks = build_model_assets(cfg)
    predictions, predictions_job, schedule = build_prediction_assets(cfg)
    tradeoff_report, tradeoff_job = build_tradeoff_assets(cfg)
    corrections = build_corrections_assets(cfg)
    training_job = dg.define_asset_job(
        "train_and_promote",
        selection=TRAINING_SELECTION,
        description="Ingest every task, build the SOFAR dataset, train, calibrate, evaluate and promote.",
        tags=max_runtime_tags("train_and_promote"),
    )
    return dg.Definitions(
        assets=with_asset_policy([*raw, dataset, *model_assets, predictions, tradeoff_report, *corrections]),
        asset_checks=gate_checks,
        jobs=[training_job, predictions_job, tradeoff_job],
        schedules=[schedule],
        sensors=[build_late_upload_sensor(cfg, predictions_job)],
        resources=build_resources(cfg),
        executor=_executor(cfg),
    )


@dg.definitions
def defs() -> dg.Definitions:
    """Loaded lazily by Dagster, so importing this module never needs the config's folders."""
    return build_definitions(load_config(config_path()))
