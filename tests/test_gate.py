"""The promotion gate: a worse model is not promoted and tomorrow is predicted by the old one."""

from __future__ import annotations

import datetime as dt

import dagster as dg
import numpy as np

from sofar_assets.config import load_config
from sofar_assets.definitions import TRAINING_SELECTION, build_definitions

from conftest import _assets, write_config

RETRAIN = dg.AssetSelection.assets("sofar_classifier", "ood_calibration", "model_evaluation", "champion_model")


def test_worse_model_fails_the_gate_and_the_champion_stays(tmp_path, demo_data):
    cfg = load_config(write_config(tmp_path, demo_data))
    defs = build_definitions(cfg)
    instance = dg.DagsterInstance.ephemeral()
    run = dict(resources=defs.resources, instance=instance)
    assert dg.materialize(_assets(defs), selection=TRAINING_SELECTION, **run).success
    client = defs.resources["mlflow_tracking"].client()
    assert str(client.get_model_version_by_alias(cfg.model.name, "champion").version) == "1"

    # Sabotage: shuffle the labels of the train and val splits (the test split stays true),
    # as a broken labeling job would. The model trained on it must not replace the champion.
    wh = defs.resources["warehouse"].get()
    data = wh.read_table("sofar_dataset")
    fit = data["split"].isin(["train", "val"]) & ~data["multi_label"]
    rng = np.random.default_rng(0)
    data.loc[fit, "label"] = rng.permutation(data.loc[fit, "label"].to_numpy())
    wh.write_table("sofar_dataset", data)

    result = dg.materialize(_assets(defs), selection=RETRAIN, raise_on_error=False, **run)
    assert not result.success
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    gate = checks["macro_f1_not_worse_than_champion"]
    assert not gate.passed
    new, old = gate.metadata["new_macro_f1"].value, gate.metadata["champion_macro_f1"].value
    assert new < old - cfg.gate.max_macro_f1_drop
    # the blocking check stopped the promotion step: no materialization, alias unchanged
    assert not result.asset_materializations_for_node("champion_model")
    assert str(client.get_model_version_by_alias(cfg.model.name, "champion").version) == "1"
    assert str(client.get_model_version(cfg.model.name, "2").version) == "2"  # registered, just not promoted

    # Materializing champion_model on its own later (the failed run's evaluation is stored)
    # must not promote the version either: the step re-checks the gate itself.
    alone = dg.materialize(_assets(defs), selection=dg.AssetSelection.assets("champion_model"),
                           raise_on_error=False, **run)
    assert not alone.success
    failure = alone.failure_data_for_node("champion_model").user_failure_data
    assert "did not pass the promotion gate" in failure.description
    assert "macro_f1_not_worse_than_champion" in failure.description
    assert str(client.get_model_version_by_alias(cfg.model.name, "champion").version) == "1"

    day = dt.date(2026, 11, 1)
    out = dg.materialize(_assets(defs), selection=dg.AssetSelection.assets("daily_predictions"),
                         partition_key=day.isoformat(), **run)
    assert out.success
    rows = wh.read_table("predictions")
    assert set(rows["model_version"]) == {"1"}

    # An alias moved by hand in MLflow is honored by the next day's predictions.
    client.set_registered_model_alias(cfg.model.name, "champion", "2")
    out = dg.materialize(_assets(defs), selection=dg.AssetSelection.assets("daily_predictions"),
                         partition_key=day.isoformat(), **run)
    assert out.success
    assert set(wh.read_table("predictions")["model_version"]) == {"2"}
