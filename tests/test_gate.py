"""The promotion gate: a worse model is not promoted and tomorrow is predicted by the old one."""

from __future__ import annotations

import datetime as dt

import dagster as dg
import numpy as np

from sofar_assets.config import load_config
from sofar_assets.definitions import TRAINING_SELECTION, build_definitions

from conftest import _assets, write_config

RETRAIN = dg.AssetSelection.assets("sofar_classifier", "ood_calibration", "model_evaluation",
                                   "champion_model")


def test_worse_model_fails_the_gate_and_the_champion_stays(tmp_path, demo_data):
    cfg = load_config(write_config(tmp_path, demo_data))
    defs = build_definitions(cfg)
    instance = dg.DagsterInstance.ephemeral()
    run = dict(resources=defs.resources, instance=instance)
    first = dg.materialize(_assets(defs), selection=TRAINING_SELECTION, **run)
    assert first.success
    # every OOD score side by side; the package carries what the feature scores need
    from sofar_assets.lib.model import ood

    cal = first.output_for_node("ood_calibration")
    assert set(cal["ood_sets"]["documents"]["scores"]) == set(ood.METHODS)
    assert set(cal["ood_scores_by_method"]["documents"]) == set(ood.METHODS)
    ev = first.output_for_node("model_evaluation")
    assert ev["champion_version"] is None and 0 <= ev["probe"]["macro_f1"] <= 1  # the probe baseline
    assert set(ev["probe"]["ood_auroc_by_score"]["documents"]) == set(ood.METHODS)
    lo, hi = ev["macro_f1_ci"]
    assert lo <= ev["macro_f1"] <= hi and set(ev["ood_auroc_ci"]) == {"documents"}
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


# ---------------------------------------------------------------- the verdicts as pure functions

def _evaluation(**over) -> dict:
    ev = {"test_images": 40, "accuracy": 0.9, "macro_f1": 0.9, "macro_f1_ci": [0.8, 0.97], "ece": 0.05,
          "ece_ci": [0.02, 0.1], "ood_auroc": {"documents": 0.95}, "ood_auroc_ci": {"documents": [0.9, 0.99]},
          "ood_images": {"documents": 12}, "ood_auroc_min": 0.95, "champion_version": "1",
          "champion_macro_f1": 0.9, "probe": {"accuracy": 0.85, "macro_f1": 0.85}}
    return {**ev, **over}


def test_gate_states_its_evidence_and_passes_a_good_model():
    from sofar_assets.config import GateConfig
    from sofar_assets.lib.model.gate import GATE_CHECKS, gate_results

    res = gate_results(_evaluation(), GateConfig())
    assert set(res) == set(GATE_CHECKS) and all(ok for ok, _ in res.values())
    f1 = res["macro_f1_not_worse_than_champion"][1]
    assert f1["evidence"] == "sufficient" and f1["new_macro_f1_ci"] == [0.8, 0.97] and f1["test_images"] == 40
    assert res["ood_auroc_above_floor"][1]["per_set_ci"] == {"documents": [0.9, 0.99]}
    assert res["ece_below_ceiling"][1]["ece_ci"] == [0.02, 0.1]


def test_too_few_images_is_insufficient_evidence_not_a_comparison():
    from sofar_assets.config import GateConfig
    from sofar_assets.lib.model.gate import failed_checks, gate_results

    # 3 test images and a much worse macro-F1: with 3 images that is noise, and the gate says so
    ev = _evaluation(test_images=3, macro_f1=0.5, ece=0.4)
    res = gate_results(ev, GateConfig(min_test_images=10, insufficient_evidence="pass"))
    for name in ("macro_f1_not_worse_than_champion", "ece_below_ceiling", "ood_auroc_above_floor"):
        ok, md = res[name]
        assert (ok and md["evidence"] == "insufficient"
                and md["test_images"] == 3 and md["min_test_images"] == 10)
    strict = failed_checks(ev, GateConfig(min_test_images=10, insufficient_evidence="fail"))
    assert {"macro_f1_not_worse_than_champion", "ece_below_ceiling", "ood_auroc_above_floor"} <= set(strict)
    # an OOD set of 2 images is insufficient on its own
    ok, md = gate_results(_evaluation(ood_images={"documents": 2}), GateConfig(insufficient_evidence="fail"))[
        "ood_auroc_above_floor"]
    assert not ok and md["ood_sets_too_small"] == {"documents": 2}
    # enough images: the same drop fails on the numbers
    ok, md = gate_results(_evaluation(macro_f1=0.5), GateConfig())["macro_f1_not_worse_than_champion"]
    assert not ok and md["evidence"] == "sufficient"


def test_first_model_is_promoted_only_by_the_configured_rule():
    from sofar_assets.config import GateConfig
    from sofar_assets.lib.model.gate import gate_results

    first = _evaluation(champion_version=None, champion_macro_f1=None)
    ok, md = gate_results(first, GateConfig(first_model="promote_if_checks_pass"))["macro_f1_not_worse_than_champion"]
    assert ok and "first_model=promote_if_checks_pass" in md["reason"]
    ok, md = gate_results(first, GateConfig(first_model="require_manual"))["macro_f1_not_worse_than_champion"]
    assert not ok and "require_manual" in md["reason"]


def test_the_gate_can_require_beating_the_frozen_feature_probe():
    from sofar_assets.config import GateConfig
    from sofar_assets.lib.model.gate import gate_results

    worse = _evaluation(macro_f1=0.7, probe={"accuracy": 0.85, "macro_f1": 0.85})
    ok, md = gate_results(worse, GateConfig())["not_worse_than_probe"]
    assert ok and "off" in md["reason"] and md["probe_macro_f1"] == 0.85  # reported, not enforced
    ok, md = gate_results(worse, GateConfig(require_beats_probe=True))["not_worse_than_probe"]
    assert not ok and md["evidence"] == "sufficient"
    assert gate_results(_evaluation(), GateConfig(require_beats_probe=True))["not_worse_than_probe"][0]
    assert not gate_results(_evaluation(probe={}),
                            GateConfig(require_beats_probe=True))["not_worse_than_probe"][0]


def test_the_gate_blocks_label_sets_that_significantly_under_cover():
    from sofar_assets.config import GateConfig
    from sofar_assets.lib.model import conformal
    from sofar_assets.lib.model.gate import gate_results

    def figures(n: int, covered: int) -> dict:
        """The rule's sets are {a} on every row; ``covered`` of the ``n`` true labels are a."""
        y = np.array([0] * covered + [1] * (n - covered))
        return conformal.evaluate(conformal.LabelSets("lac", 0.9, 0.5, 200),
                                  np.tile([0.7, 0.2, 0.1], (n, 1)), y, ["a", "b", "c"])

    def verdict(cf: dict, **gate) -> tuple[bool, dict]:
        return gate_results(_evaluation(conformal=cf, test_images=cf["images"]),
                            GateConfig(**gate))["label_set_coverage"]

    low = figures(400, 320)  # 0.80 on 400 photos: 95 % interval 0.76-0.84, below the floor 0.85
    assert low["coverage"] == 0.8 and low["per_class"]["b"]["coverage"] == 0.0
    ok, md = verdict(low, coverage_tolerance=0.05)
    assert not ok and md["evidence"] == "sufficient" and md["floor"] == 0.85 and md["coverage_ci"][1] < 0.85
    ok, md = verdict(figures(400, 348), coverage_tolerance=0.05)  # 0.87: within the tolerance
    assert ok and md["coverage"] == 0.87
    # 0.80 on 40 photos: the interval (0.65-0.90) reaches the floor, sampling noise is not a verdict
    ok, md = verdict(figures(40, 32), coverage_tolerance=0.05)
    assert ok and md["coverage"] == 0.8 and md["coverage_ci"][1] >= 0.85
    ok, md = verdict(low, coverage_tolerance=0.15)  # a wider tolerance: floor 0.75
    assert ok and md["floor"] == 0.75
    ok, md = verdict(low, coverage_tolerance=None)
    assert ok and "not enforced" in md["reason"]
    ok, md = verdict(figures(5, 2), coverage_tolerance=0.05, insufficient_evidence="fail")
    assert not ok and md["evidence"] == "insufficient"
    ok, md = gate_results(_evaluation(), GateConfig())["label_set_coverage"]  # evaluated before label sets
    assert ok and "no label-set figures" in md["reason"]
