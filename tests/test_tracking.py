"""lib/model/tracking.py (what goes to MLflow for a training run) and the plain decisions of
lib/model/evaluation.py that the training assets delegate to."""

from __future__ import annotations

import dataclasses

import pytest

from sofar_assets.lib.model import evaluation, tracking


def test_one_tag_dict_for_every_run_and_version():
    origin = tracking.RunOrigin("run-1", "http://dagster/runs/run-1", "abc123")
    tags = tracking.run_tags(origin, "hash", val_macro_f1="0.9000")
    assert tags == {"dagster_run_id": "run-1", "dataset_hash": "hash", "git_commit": "abc123",
                    "dagster_run_url": "http://dagster/runs/run-1", "val_macro_f1": "0.9000"}


def test_model_ref_is_small_frozen_and_names_its_uri():
    ref = tracking.ModelRef("sofar-classifier", "3", "r1", "h1")
    assert ref.model_uri == "models:/sofar-classifier/3"
    assert set(dataclasses.asdict(ref)) == {"model_name", "version", "run_id", "dataset_hash"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        ref.run_id = "r2"


@pytest.mark.parametrize(("freeze", "lp", "arch", "pretrained", "expected"), [
    (True, True, "linear", True, True),
    (True, None, "linear", True, False),  # auto: no LP with a frozen backbone, the head is SGD-trained
    (False, True, "linear", True, False),  # fine-tuned: no longer the probe
    (True, True, "pmg", True, False),
    (True, True, "linear", False, False),  # random features: not the pretrained probe
])
def test_the_model_is_the_probe_only_as_the_frozen_pretrained_linear_probe(freeze, lp, arch, pretrained,
                                                                          expected):
    assert evaluation.model_is_the_probe(freeze_backbone=freeze, linear_probe=lp, arch=arch,
                                         pretrained=pretrained) is expected


def test_evaluation_metrics_name_what_the_registry_confirms():
    from sofar_assets.lib.serving.registry import EVIDENCE_METRICS

    result = {"accuracy": 0.9, "macro_f1": 0.8, "ece": 0.05, "tasks": {"defect": {"accuracy": 1.0, "f1": 1.0}},
              "ood_auroc": {"documents": 0.99}, "probe": {"skipped": "one class"}}
    logged = tracking.evaluation_metrics(result)
    assert {m: logged[m] for m in EVIDENCE_METRICS} == {m: result[k] for m, k in EVIDENCE_METRICS.items()}
    assert logged["test_defect_f1"] == 1.0 and "probe_test_macro_f1" not in logged
