"""The recipe against the frozen-feature probe (cross-validation), and the calibration math."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from sofar_assets.lib.data import synthetic
from sofar_assets.lib.data.images import load_image_array, resize_center_crop
from sofar_assets.lib.model import calibration, evaluation, ood
from sofar_assets.lib.model.models import ModelSpec
from sofar_assets.lib.model.training import TrainConfig

SIZE = 64
CLASSES = {"0_NORMAL": 0, "1_DEFECT": 1, "1_DIRT": 2}


def _photos(samples):
    arrays, labels = [], []
    for task in ("CAR_DEFECT_RECOGNITION", "CAR_DIRT_RECOGNITION"):
        for folder in sorted((samples / task).iterdir()):
            for f in sorted(folder.glob("*.jpg")):
                arrays.append(load_image_array(f.read_bytes(), str(f), SIZE))
                labels.append(CLASSES[folder.name])
    return arrays, labels


def _irrelevant():
    from PIL import Image
    from skimage import data

    return {"page_text": [resize_center_crop(Image.fromarray(i).convert("RGB"), SIZE)
                          for i in (data.page(), data.text())],
            "documents": [resize_center_crop(synthetic.document(random.Random(i)), SIZE) for i in range(4)]}


@pytest.mark.slow
def test_cross_validation_recipe_vs_probe_on_real_photos(samples):
    arrays, labels = _photos(samples)
    assert len(arrays) == 20
    spec = ModelSpec(num_classes=3, image_size=SIZE)
    # frozen backbone: the recipe is its linear probe, fitted on the same train split as the
    # probe baseline, so both must agree exactly: a check of the whole fold machinery
    frozen = evaluation.cross_validate(arrays, labels, _irrelevant(), spec,
                                       TrainConfig(freeze_backbone=True, linear_probe=True, device="cpu"),
                                       folds=2, log=lambda s: None)
    rec, pr = frozen["models"]["recipe"], frozen["models"]["probe"]
    assert frozen["best_epochs"] == [0, 0] and frozen["images"] == 20
    assert rec["accuracy"] == pr["accuracy"] and rec["macro_f1"] == pr["macro_f1"]
    assert set(rec["ood_auroc"]) == {"page_text", "documents"}
    for name, by_score in rec["ood_auroc"].items():
        assert set(by_score) == set(ood.METHODS)
        for method, auc in by_score.items():
            assert auc == pytest.approx(pr["ood_auroc"][name][method], abs=1e-6), (name, method)
    # and the fine-tuning path runs end to end (one augmented epoch per fold)
    ft = evaluation.cross_validate(arrays, labels, _irrelevant(), spec,
                                   TrainConfig(epochs=1, patience=None, device="cpu"),
                                   folds=2, log=lambda s: None)
    assert all(0 <= e <= 1 for e in ft["best_epochs"])
    assert 0.0 <= ft["models"]["recipe"]["accuracy"] <= 1.0


def test_calibrate_reports_every_score_and_thresholds_the_configured_one():
    rng = np.random.default_rng(0)
    y = np.arange(40) % 2
    feats = rng.normal(size=(40, 6)) + y[:, None] * 3
    logits = np.c_[-feats[:, 0], feats[:, 0]]
    stats = ood.fit_feature_stats(feats, y)
    far = rng.normal(size=(8, 6)) + 15
    rep = calibration.calibrate(logits, y, feats, stats, {"far": (np.c_[-far[:, 0], far[:, 0]] * 0, far)},
                                score_method="knn", target_tpr=0.9, task_positives={"t": 1})
    assert rep["score_method"] == "knn" and rep["val_images"] == 40
    knn_val = ood.score(logits, feats, "knn", 1.0, stats)
    assert rep["threshold"] == ood.threshold_at_tpr(knn_val, 0.9) and rep["val_tpr"] >= 0.9
    far_r = rep["ood_sets"]["far"]
    assert set(far_r["scores"]) == set(ood.METHODS) and far_r["images"] == 8
    assert far_r["auroc"] == far_r["scores"]["knn"]["auroc"] == 1.0 and far_r["rejected_share"] == 1.0
    assert rep["ood_scores"]["far"] == rep["ood_scores_by_method"]["far"]["knn"]
    assert 0 <= rep["task_auroc"]["t"] <= 1
    assert "| far | 8 |" in calibration.scores_table(rep["ood_sets"])


def test_evaluate_test_has_bootstrap_intervals_around_the_point_estimates():
    rng = np.random.default_rng(1)
    y = np.arange(30) % 3
    logits = np.eye(3)[y] * 3 + rng.normal(size=(30, 3))
    res = evaluation.evaluate_test(y, logits, None, num_classes=3, temperature=1.0, score_method="max_logit",
                                   stats=None,
                                   ood_scores_by_method={"docs": {"max_logit": [0.0, 0.5, 1.0, 0.2]}},
                                   tasks={"defect": (1, {0, 1})}, n_resamples=200)
    lo, hi = res["macro_f1_ci"]
    assert lo <= res["macro_f1"] <= hi and hi - lo > 0
    lo, hi = res["ece_ci"]
    assert lo <= res["ece"] <= hi
    lo, hi = res["ood_auroc_ci"]["docs"]
    assert lo <= res["ood_auroc"]["docs"] <= hi and res["ood_images"] == {"docs": 4}
    assert res["ood_auroc_min"] == res["ood_auroc"]["docs"] and res["test_images"] == 30
    assert res["tasks"]["defect"]["n"] == 20


def test_probe_baseline_fits_the_same_split_and_scores_ood():
    rng = np.random.default_rng(2)
    y = np.arange(24) % 3
    f = rng.normal(size=(24, 5)) + np.eye(3, 5)[y] * 4
    pb = evaluation.probe_baseline(f[:18], y[:18], f[18:], {"far": rng.normal(size=(5, 5)) + 30}, 3)
    assert (pb.test_logits.argmax(1) == y[18:]).mean() == 1.0
    assert set(pb.test_scores) == set(ood.METHODS) and set(pb.ood_scores["far"]) == set(ood.METHODS)
    with pytest.raises(ValueError, match="at least 2 classes"):
        evaluation.probe_baseline(f[:3], [1, 1, 1], f[3:], {}, 3)


def test_spec_replace_keeps_the_probe_on_pretrained_features():
    model = evaluation.frozen_feature_model(
        dataclasses.replace(ModelSpec(num_classes=2, arch="pmg"), pretrained=False))
    assert model.spec.arch == "linear" and model.spec.pretrained


def test_calibrate_between_rule_lets_unfamiliar_car_photos_in_and_keeps_documents_out():
    rng = np.random.default_rng(3)
    e = np.eye(6) * 5

    def photos(y):  # class c around direction e_c
        return e[y] + rng.normal(size=(len(y), 6)) * 0.5

    y = np.arange(20) % 2
    stats = ood.fit_feature_stats(photos(np.arange(40) % 2), np.arange(40) % 2)  # the train split
    feats = photos(y)  # val
    logits = np.c_[-feats[:, 0], feats[:, 0]]
    docs = e[3] - e[0] + rng.normal(size=(6, 6)) * 0.5  # pointing elsewhere
    unfamiliar = e[0] * 0.8 + e[1] * 0.5 + rng.normal(size=(5, 6)) * 0.3  # a third state: near, not in
    sets = {"documents": (np.zeros((6, 2)), docs)}
    plain = calibration.calibrate(logits, y, feats, stats, sets, score_method="knn", target_tpr=0.95)
    rep = calibration.calibrate(logits, y, feats, stats, sets, score_method="knn", target_tpr=0.95,
                                threshold_rule="between")
    s_unf = ood.score(None, unfamiliar, "knn", 1.0, stats)
    assert (s_unf < plain["threshold"]).all()  # the plain val rule flags every unfamiliar car photo
    assert rep["threshold_target_tpr"] == plain["threshold"] > rep["threshold"]
    assert (s_unf >= rep["threshold"]).all() and rep["ood_sets"]["documents"]["rejected_share"] == 1.0
    assert rep["val_tpr"] >= 0.95 and rep["threshold_rule"] == "between"
    with pytest.raises(ValueError, match="threshold rule"):
        calibration.calibrate(logits, y, feats, stats, sets, score_method="knn", threshold_rule="middle")


def test_two_state_composites_and_their_top2_report():
    a = np.zeros((8, 8, 3), np.uint8)
    b = np.full((8, 8, 3), 255, np.uint8)
    comp = evaluation.two_state_composites(a, b)
    assert set(comp) == {"halves_ab", "halves_ba", "patch_ab", "patch_ba"}
    assert (comp["halves_ab"][:, :4] == 0).all() and (comp["halves_ab"][:, 4:] == 255).all()
    share = (comp["patch_ab"] == 255).mean()
    assert 0.4 <= share <= 0.6 and (comp["patch_ba"] == 0).mean() == share  # about half the area
    arrays, sets, kinds = evaluation.composite_set([a, b, a, b], [1, 2, 0, 2], (1, 2))
    assert len(arrays) == 8 and all(s == {1, 2} for s in sets) and kinds.count("patch") == 4
    logits = np.tile([[0.0, 2.0, 1.0]], (8, 1))
    logits[:4] = [2.0, 1.0, 0.0]  # the first pair's composites miss dirt in the top-2
    mask = np.zeros((8, 3), bool)
    mask[:, 1:] = True
    rep = evaluation.composite_report(logits, sets, kinds, label_set_mask=mask)
    assert rep["top2_joint_hit_rate"] == 0.5 and rep["label_set_joint_coverage"] == 1.0
    assert rep["label_set_mean_size"] == 2.0 and set(rep["by_kind"]) == {"halves", "patch"}


def test_composite_evaluation_scores_a_model_on_composites_of_its_test_photos():
    from sofar_assets.lib.model import conformal
    from sofar_assets.lib.model.models import build_model

    rng = np.random.default_rng(4)
    arrays = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(5)]
    y = [0, 1, 1, 2, 0]
    model = build_model(ModelSpec(num_classes=3, image_size=32, pretrained=False)).eval()
    rule = conformal.LabelSets(method="lac", coverage=0.9, qhat=1.0, n_cal=10)  # every label in every set
    rep = evaluation.composite_evaluation(model, evaluation.ArrayDataset(arrays, y), y, [(1, 2)], rule=rule)
    # 2 defect x 1 dirt photos, 4 kinds each
    assert rep["images"] == 2 * 1 * 4 and set(rep["pairs"]) == {"1+2"}
    assert 0.0 <= rep["top2_joint_hit_rate"] <= 1.0 and rep["label_set_joint_coverage"] == 1.0
    assert evaluation.composite_evaluation(model, evaluation.ArrayDataset(arrays[:1], y[:1]),
                                           y[:1], [(1, 2)]) == {"images": 0}


def test_leave_one_class_out_reports_flag_rates_per_score_and_rule():
    rng = np.random.default_rng(5)
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])
    y = [k % 3 for k in range(18)]
    arrays = [np.clip(colours[c] + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8) for c in y]
    docs = {"documents": [np.full((32, 32, 3), 255, np.uint8)
                          - rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
                          for _ in range(4)]}
    res = evaluation.leave_one_class_out(arrays, y, docs, ModelSpec(num_classes=3, image_size=32),
                                         TrainConfig(freeze_backbone=True, linear_probe=True, device="cpu"),
                                         [2], folds=2, log=lambda s: None)
    assert res["left_out"] == [2] and set(res["scores"]) == {*ood.METHODS, "knn_pretrained"}
    for r in res["scores"].values():
        assert 0.0 <= r["auroc/documents"] <= 1.0
        # `between` only ever lowers the threshold: it never flags more than `tpr` does
        assert r["between/left_out_flagged"] <= r["tpr/left_out_flagged"]
        assert r["between/test_flagged"] <= r["tpr/test_flagged"]
