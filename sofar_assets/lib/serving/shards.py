"""The daily run's shard steps as plain functions: the champion's work unit, and scoring one unit.

``daily_predictions`` (defs/predictions.py) resolves the champion ONCE per run into a work unit
(:func:`champion_unit`: JSON-able, what every shard step needs to score with the same version)
and each shard step scores its slices of the days' manifests with :func:`score_unit`: the model
loaded once, one streaming pass (lib/serving/daily.py: score_days), one staged parquet file per
(day, shard). No Dagster import.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pandas as pd

from sofar_assets.lib.data import manifest
from sofar_assets.lib.model import ood
from sofar_assets.lib.model.conformal import LabelSets
from sofar_assets.lib.serving import daily, registry
from sofar_assets.lib.serving.packaging import load_registered
from sofar_assets.lib.serving.predictor import make_runner
from sofar_assets.lib.warehouse.predictions import PREDICTIONS
from sofar_assets.lib.warehouse.spool import ParquetSpool


class ShardError(RuntimeError):
    """A shard step cannot score with the unit's model version; the message says what to do."""


def champion_unit(client, name: str, run_id: str,
                  artifacts_destination: str | None) -> tuple[dict, str | None]:
    """The run's work unit for the ``champion`` of ``name``: the version, where a shard reads its
    package from, its calibration. Returns (unit, a warning or None). Raises
    ``registry.NoChampionError`` / ``registry.UncalibratedError``."""
    mv = registry.champion(client, name)
    calibration = registry.read_calibration(mv)
    unit = {
        "run_id": run_id,
        "model_name": name, "model_version": str(mv.version), "model_uri": f"models:/{name}/{mv.version}",
        # where each shard pod reads the package from, without the tracking server's proxy
        "model_source": registry.direct_source(client, name, mv.version, artifacts_destination),
        "threshold": calibration.threshold, "temperature": calibration.temperature,
        "score_method": calibration.score_method,
        "label_sets": calibration.label_sets.as_dict() if calibration.label_sets else None,
    }
    warning = None
    if calibration.label_sets is None:
        warning = (f"{name} v{mv.version} has no conformal label-set tags (calibrated before label sets "
                   "existed): its rows get NULL label_set; re-train to get them")
    return unit, warning


def load_unit_model(unit: dict, runtime: str, device: str):
    """The unit's model, loaded once per step (pod), on ``runtime``: (runner, package meta)."""
    model, meta = load_registered(unit.get("model_source") or unit["model_uri"])
    missing = ood.missing_stats(unit["score_method"], meta.get("ood_stats") or {})
    if missing:
        raise ShardError(
            f"{unit['model_uri']} is calibrated with OOD score {unit['score_method']!r}, which needs "
            f"{missing} from its package's ood_stats.safetensors, and this version's package has none "
            "(registered before feature scores existed?). Move @champion to a version trained since, or "
            "calibrate this one with a logit score (ood.score: max_logit).")
    return make_runner(model, meta, runtime, device), meta


def unit_predict_kwargs(unit: dict, meta: dict) -> dict:
    """What :func:`~sofar_assets.lib.serving.inference.predict_images` takes from the unit's
    calibration and the version's package."""
    return {
        "classes": list(meta["classes"]), "image_size": int(meta["spec"]["image_size"]),
        "threshold": unit["threshold"], "score_method": unit["score_method"],
        "temperature": unit["temperature"],
        "label_sets": LabelSets(**unit["label_sets"]) if unit.get("label_sets") else None,
        "ood_stats": meta.get("ood_stats") or {}, "knn_k": ood.package_knn_k(meta),
    }


def score_unit(model, meta: dict, unit: dict, *, root: str, predict_kwargs: dict) -> dict:
    """Score the unit's slices (row ranges of the days' manifests) in one streaming pass and stage
    each day's rows at its staging URI. ``predict_kwargs``: the inference settings (batch size,
    workers, device, reads...). Returns the step's result: per day its tally, listing and file."""
    slices = {dt.date.fromisoformat(s["day"]): s for s in unit["slices"]}  # one slice per day at most
    staged: dict[dt.date, tuple[str, str]] = {}  # day -> (local spool file, staging URI)
    fetched: list[str] = []  # local copies of gs:// manifests, removed at the end

    def open_spool(day: dt.date) -> ParquetSpool:
        uri = daily.staging_uri(root, day, unit["run_id"], slices[day]["shard"], slices[day]["shards"])
        staged[day] = (daily.local_spool_path(uri), uri)
        return ParquetSpool(PREDICTIONS, staged[day][0])

    def day_slices():
        for day, s in slices.items():
            local, temporary = daily.fetch_local(s["manifest"])
            if temporary:
                fetched.append(local)
            yield day, manifest.read_slice(local, s["start"], s["stop"])

    run = {"model_name": unit["model_name"], "model_version": unit["model_version"],
           "predicted_at": pd.Timestamp.now(tz="UTC").tz_localize(None)}
    try:
        tallies = daily.score_days(model, day_slices(), open_spool=open_spool, columns=run,
                                   **unit_predict_kwargs(unit, meta), **predict_kwargs)
    finally:
        for f in fetched:
            Path(f).unlink(missing_ok=True)
    for local, uri in staged.values():
        daily.publish(local, uri)
    return {"step": unit["step"], "model_version": unit["model_version"], "days": {
        d.isoformat(): t.as_dict() | {"listed": slices[d]["count"], "shards": slices[d]["shards"],
                                      "file": staged.get(d, (None, None))[1]}
        for d, t in tallies.items()}}


def list_day(uploads, root: str, day: dt.date, run_id: str) -> tuple[str, int]:
    """List ``day``'s ``uploads`` ONCE into its manifest, staged under ``root``; returns (manifest URI,
    count). Memory holds one row group of the manifest, whatever the day's size."""
    uri = daily.manifest_uri(root, day, run_id)
    local = daily.local_spool_path(uri)
    count = manifest.write_manifest(uploads, local)
    daily.publish(local, uri)
    return uri, count
