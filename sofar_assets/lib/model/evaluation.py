"""Evaluation math: test-split metrics, the frozen-feature probe baseline, cross-validation.

Plain numpy/torch/sklearn (no Dagster): ``model_evaluation`` and ``bench/bench_recipe.py``
call these, and the tests call them directly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold, train_test_split
from torch.utils.data import Dataset

from sofar_assets.lib.common.names import shown
from sofar_assets.lib.model import calibration, conformal, metrics, ood, plots, probe
from sofar_assets.lib.model.models import ModelSpec, build_model
from sofar_assets.lib.model.training import (
    TrainConfig,
    predict_logits,
    predict_logits_and_features,
    train_classifier,
)


class ArrayDataset(Dataset):
    """``(uint8 CHW tensor, label)`` from preprocessed uint8 HWC arrays kept in memory."""

    def __init__(self, arrays: Sequence[np.ndarray], labels: Sequence[int]):
        if len(arrays) != len(labels):
            raise ValueError(f"{len(arrays)} images but {len(labels)} labels")
        self.arrays, self.labels = list(arrays), [int(y) for y in labels]

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, i: int):
        return torch.from_numpy(np.ascontiguousarray(self.arrays[i])).permute(2, 0, 1).contiguous(), self.labels[i]


def frozen_feature_model(spec: ModelSpec):
    """The pretrained backbone the probe baseline reads features from (its head is unused)."""
    return build_model(dataclasses.replace(spec, arch="linear", pretrained=True)).eval()


def ood_report(id_scores: dict[str, np.ndarray], ood_scores: dict[str, dict[str, np.ndarray]],
               target_tpr: float = 0.95) -> dict[str, dict[str, dict]]:
    """``{ood set: {score method: {auroc, fpr_at_tpr, images}}}`` for every score given."""
    out: dict[str, dict[str, dict]] = {}
    for name, by_method in ood_scores.items():
        out[name] = {}
        for method, s_ood in by_method.items():
            s_id = id_scores[method]
            if len(s_ood) == 0 or len(s_id) == 0:
                continue
            out[name][method] = {"auroc": ood.auroc(s_id, s_ood), "fpr_at_tpr": ood.fpr_at_tpr(s_id, s_ood, target_tpr),
                                 "images": int(len(s_ood))}
    return out


def classification_summary(y: np.ndarray, logits: np.ndarray, num_classes: int, temperature: float = 1.0, *,
                           n_resamples: int = 1000, seed: int = 0) -> dict:
    """Accuracy, macro-F1 and ECE with bootstrap CIs (percentile, 95 %) on one split."""
    y = np.asarray(y, dtype=np.int64)
    pred = logits.argmax(1) if len(y) else np.zeros(0, np.int64)
    probs = ood.softmax(logits, temperature) if len(y) else np.zeros((0, num_classes))

    def f1(i):
        return metrics.macro_f1(y[i], pred[i], num_classes)

    def ece(i):
        return metrics.expected_calibration_error(probs[i], y[i])

    return {
        "images": int(len(y)),
        "accuracy": metrics.accuracy(y, pred),
        "macro_f1": metrics.macro_f1(y, pred, num_classes),
        "macro_f1_ci": list(metrics.bootstrap_ci(f1, len(y), n_resamples=n_resamples, seed=seed)),
        "ece": metrics.expected_calibration_error(probs, y),
        "ece_ci": list(metrics.bootstrap_ci(ece, len(y), n_resamples=n_resamples, seed=seed)),
    }


@dataclasses.dataclass
class ProbeBaseline:
    """The frozen-feature probe fitted on a train split, scored on a test split and OOD sets."""

    test_logits: np.ndarray
    test_scores: dict[str, np.ndarray]
    ood_scores: dict[str, dict[str, np.ndarray]]


def probe_baseline(train_features, train_labels, test_features, ood_features: dict[str, np.ndarray],
                   num_classes: int, *, c: float = 1.0, knn_k: int = 1) -> ProbeBaseline:
    """Logistic regression on frozen features; every OOD score on its logits and features."""
    lp = probe.fit_probe(train_features, train_labels, num_classes, c=c)
    stats = ood.fit_feature_stats(train_features, train_labels)
    test_logits = lp.logits(test_features)
    return ProbeBaseline(
        test_logits=test_logits,
        test_scores=ood.all_scores(test_logits, test_features, 1.0, stats, knn_k=knn_k),
        ood_scores={name: ood.all_scores(lp.logits(f), f, 1.0, stats, knn_k=knn_k)
                    for name, f in ood_features.items() if len(f)},
    )


def _mean(values: list[float]) -> float:
    v = [x for x in values if np.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")


def cross_validate(arrays: Sequence[np.ndarray], labels: Sequence[int], ood_arrays: dict[str, list[np.ndarray]],
                   spec: ModelSpec, train_cfg: TrainConfig, *, folds: int = 5, val_fraction: float = 0.15,
                   seed: int = 0, knn_k: int = 1, head_refit: bool = False,
                   composite_pair: tuple[int, int] | None = None, label_set_coverage: float = 0.9,
                   log: Callable[[str], object] = print) -> dict:
    """Stratified k-fold comparison of the training recipe with the frozen-feature probe.

    Per fold: the held-out fold is the test split; the rest is split (stratified) into train
    and val as the pipeline would (``val_fraction``); the recipe trains on train and selects
    on val; the probe fits on the same train split (``probe``) and, as a stricter reference,
    on train + val (``probe_trainval``). Accuracy and macro-F1 pool the held-out predictions
    of all folds; OOD AUROC / FPR@TPR are computed per fold (one model's scores) and averaged.

    ``composite_pair`` (two class indices): each fold's held-out photos of those classes are
    combined into two-state composites (:func:`composite_set`), and every model's top-2 joint
    hit rate on them is pooled over folds, beside the joint coverage of label sets
    (``conformal``, LAC at ``label_set_coverage``) calibrated for fold k on the held-out
    predictions of the OTHER folds (the val split of a fold is too small to calibrate them).
    """
    y = np.asarray(labels, dtype=np.int64)
    n_classes = spec.num_classes
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    frozen = frozen_feature_model(spec)
    all_ds = ArrayDataset(arrays, y)
    _, feats = predict_logits_and_features(frozen, all_ds, device="cpu")
    ood_feats = {k: predict_logits_and_features(frozen, ArrayDataset(v, [0] * len(v)), device="cpu")[1]
                 for k, v in ood_arrays.items()}
    models = ("recipe", *(("recipe_head_refit",) if head_refit else ()), "probe", "probe_trainval")
    pred = {m: np.zeros(len(y), np.int64) for m in models}
    heldout = {m: np.zeros((len(y), n_classes), np.float64) for m in models}
    comp_out: list[tuple[np.ndarray, list, list, dict[str, np.ndarray]]] = []  # per fold
    per_fold: dict[str, dict[str, dict[str, list[float]]]] = {m: {} for m in models}
    epochs = []
    for k, (rest, test) in enumerate(skf.split(np.zeros(len(y)), y)):
        n_val = max(len(np.unique(y[rest])), int(round(val_fraction * len(rest))))
        train, val = train_test_split(rest, test_size=n_val, stratify=y[rest], random_state=seed + k)
        res = train_classifier(spec, ArrayDataset([arrays[i] for i in train], y[train]),
                               ArrayDataset([arrays[i] for i in val], y[val]), train_cfg,
                               log=lambda s, k=k: log(f"  fold {k + 1}: {s}"))
        epochs.append(res.best_epoch)
        stats = ood.fit_feature_stats(res.train_features, res.train_labels)
        lg, f = predict_logits_and_features(res.model, ArrayDataset([arrays[i] for i in test], y[test]), device="cpu")
        ood_out = {name: predict_logits_and_features(res.model, ArrayDataset(v, [0] * len(v)), device="cpu")
                   for name, v in ood_arrays.items()}
        scores = {"recipe": (lg, ood.all_scores(lg, f, 1.0, stats, knn_k=knn_k), {
            name: ood.all_scores(olg, of, 1.0, stats, knn_k=knn_k) for name, (olg, of) in ood_out.items()})}
        if head_refit:  # the same fine-tuned backbone, its head refitted by logistic regression
            hp = probe.fit_probe(res.train_features, res.train_labels, n_classes, c=train_cfg.probe_c)
            scores["recipe_head_refit"] = (hp.logits(f), ood.all_scores(hp.logits(f), f, 1.0, stats, knn_k=knn_k), {
                name: ood.all_scores(hp.logits(of), of, 1.0, stats, knn_k=knn_k) for name, (_, of) in ood_out.items()})
        pb_probes = {}
        for m, fit_idx in (("probe", train), ("probe_trainval", rest)):
            pb = probe_baseline(feats[fit_idx], y[fit_idx], feats[test], ood_feats, n_classes, c=train_cfg.probe_c,
                                knn_k=knn_k)
            scores[m] = (pb.test_logits, pb.test_scores, pb.ood_scores)
            if composite_pair is not None:  # the same probe again, for the composites' frozen features
                pb_probes[m] = probe.fit_probe(feats[fit_idx], y[fit_idx], n_classes, c=train_cfg.probe_c)
        if composite_pair is not None:
            comp, sets, kinds = composite_set([arrays[i] for i in test], y[test], composite_pair)
            comp_logits = {}
            if comp:
                cds = ArrayDataset(comp, [0] * len(comp))
                comp_logits["recipe"], cf = predict_logits_and_features(res.model, cds, device="cpu")
                if head_refit:
                    comp_logits["recipe_head_refit"] = hp.logits(cf)
                frozen_cf = predict_logits_and_features(frozen, cds, device="cpu")[1]
                comp_logits.update({m: lp.logits(frozen_cf) for m, lp in pb_probes.items()})
            comp_out.append((test, sets, kinds, comp_logits))
        for m, (logits, id_s, ood_s) in scores.items():
            pred[m][test] = logits.argmax(1)
            heldout[m][test] = logits
            for name, sets in ood_report(id_s, ood_s).items():
                for method, r in sets.items():
                    per_fold[m].setdefault(name, {}).setdefault(method, []).append(r["auroc"])
        log(f"fold {k + 1}/{folds}: best epoch {res.best_epoch}, test acc recipe "
            f"{metrics.accuracy(y[test], pred['recipe'][test]):.2f} "
            f"probe {metrics.accuracy(y[test], pred['probe'][test]):.2f}")
    composites = {}
    if composite_pair is not None:
        for m in models:
            all_logits, all_sets, all_kinds, masks = [], [], [], []
            for test, sets, kinds, comp_logits in comp_out:
                if not sets:
                    continue
                others = np.setdiff1d(np.arange(len(y)), test)
                rule = conformal.calibrate(ood.softmax(heldout[m][others]), y[others], coverage=label_set_coverage)
                all_logits.append(comp_logits[m])
                all_sets += sets
                all_kinds += kinds
                masks.append(rule.mask(ood.softmax(comp_logits[m])))
            composites[m] = composite_report(np.concatenate(all_logits), all_sets, all_kinds,
                                             label_set_mask=np.concatenate(masks)) if all_sets else {"images": 0}
    return {
        "folds": folds, "images": int(len(y)), "best_epochs": epochs, "composites": composites,
        "models": {m: {"accuracy": metrics.accuracy(y, pred[m]), "macro_f1": metrics.macro_f1(y, pred[m], n_classes),
                       "ood_auroc": {name: {method: _mean(v) for method, v in sets.items()}
                                     for name, sets in per_fold[m].items()}}
                   for m in models},
    }


def evaluate_test(y: np.ndarray, logits: np.ndarray, features: np.ndarray | None, *, num_classes: int,
                  temperature: float, score_method: str, stats: dict | None, knn_k: int = 1,
                  ood_scores_by_method: dict[str, dict[str, list]] | None = None,
                  tasks: dict[str, tuple[int, set[int]]] | None = None,
                  multi_logits: np.ndarray | None = None, multi_label_sets: list[set[int]] | None = None,
                  n_resamples: int = 1000, seed: int = 0) -> dict:
    """Everything ``model_evaluation`` reports about one model on the test split.

    ``tasks[name] = (positive class, the task's own classes)`` for the paper's per-task binary
    metrics; ``ood_scores_by_method`` are the OOD sets' scores from the calibration (same
    version). ``ood_auroc`` is the configured score's AUROC per set (test images as ID), with
    a bootstrap CI; ``ood_auroc_by_score`` has every score's.
    """
    result = classification_summary(y, logits, num_classes, temperature, n_resamples=n_resamples, seed=seed)
    result["test_images"] = result.pop("images")
    pred = logits.argmax(1)
    result["tasks"] = {name: metrics.binary_task_metrics(y, pred, pos, task_classes=own)
                       for name, (pos, own) in (tasks or {}).items()}
    if multi_logits is not None and multi_label_sets:
        two = [k for k, st in enumerate(multi_label_sets) if len(st) == 2]  # three labels cannot fit a top-2
        if two:
            result["top2_joint_hit_rate"] = metrics.top2_joint_hit_rate(multi_logits[two],
                                                                        [multi_label_sets[k] for k in two])
        result["multi_label_images"] = len(multi_label_sets)
        result["multi_label_images_over_two_labels"] = len(multi_label_sets) - len(two)
    id_all = ood.all_scores(logits, features, temperature, stats, knn_k=knn_k) if len(y) else {}
    result["ood_auroc"], result["ood_auroc_ci"], result["ood_images"], result["ood_auroc_by_score"] = {}, {}, {}, {}
    for name, by_method in (ood_scores_by_method or {}).items():
        s_ood = np.asarray(by_method.get(score_method, []), dtype=float)
        if not len(s_ood) or not len(y):
            continue
        s_id = id_all[score_method]
        result["ood_auroc"][name] = ood.auroc(s_id, s_ood)
        result["ood_auroc_ci"][name] = list(metrics.bootstrap_ci(
            lambda i, j, a=s_id, b=s_ood: ood.auroc(a[i], b[j]), [len(s_id), len(s_ood)],
            n_resamples=n_resamples, seed=seed))
        result["ood_images"][name] = int(len(s_ood))
        result["ood_auroc_by_score"][name] = {m: ood.auroc(id_all[m], np.asarray(v, float))
                                              for m, v in by_method.items() if m in id_all and len(v)}
    result["ood_auroc_min"] = min(result["ood_auroc"].values()) if result["ood_auroc"] else None
    return result


# --------------------------------------------------------------------------- two states in one photo

COMPOSITE_KINDS = ("halves", "patch")


def two_state_composites(a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """Four photos showing both states of two same-size uint8 HWC photos ``a`` and ``b``.

    ``halves_ab`` / ``halves_ba``: the left half of one beside the right half of the other;
    ``patch_ab`` / ``patch_ba``: CutMix-style, a central square of the second photo covering
    half of the first one's area pasted into the first.
    """
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"composites need two HWC photos of one size, got {a.shape} and {b.shape}")
    h, w = a.shape[:2]
    out = {}
    for tag, (p, q) in {"ab": (a, b), "ba": (b, a)}.items():
        half = p.copy()
        half[:, w // 2:] = q[:, w // 2:]
        out[f"halves_{tag}"] = half
        ph, pw = int(round(h / np.sqrt(2))), int(round(w / np.sqrt(2)))
        y0, x0 = (h - ph) // 2, (w - pw) // 2
        patch = p.copy()
        patch[y0:y0 + ph, x0:x0 + pw] = q[y0:y0 + ph, x0:x0 + pw]
        out[f"patch_{tag}"] = patch
    return out


def composite_set(arrays: Sequence[np.ndarray], labels: Sequence[int], pair: tuple[int, int], *,
                  max_pairs: int | None = None, seed: int = 0) -> tuple[list[np.ndarray], list[set[int]], list[str]]:
    """Composites of every (class ``pair[0]`` photo, class ``pair[1]`` photo) pair (at most
    ``max_pairs``, drawn with ``seed``): arrays, label sets ``{pair[0], pair[1]}`` and each
    composite's kind (``halves`` / ``patch``). ``arrays`` may be a dict holding only the rows
    of the two classes."""
    y = np.asarray(labels)
    pairs = [(i, j) for i in np.flatnonzero(y == pair[0]) for j in np.flatnonzero(y == pair[1])]
    if max_pairs is not None and len(pairs) > max_pairs:
        keep = np.random.default_rng(seed).choice(len(pairs), max_pairs, replace=False)
        pairs = [pairs[k] for k in sorted(keep)]
    out, sets, kinds = [], [], []
    for i, j in pairs:
        for name, img in two_state_composites(arrays[i], arrays[j]).items():
            out.append(img)
            sets.append({int(pair[0]), int(pair[1])})
            kinds.append(name.split("_")[0])
    return out, sets, kinds


def composite_report(logits: np.ndarray, label_sets: Sequence[set[int]], kinds: Sequence[str], *,
                     label_set_mask: np.ndarray | None = None) -> dict:
    """Top-2 joint hit rate on two-state composites, overall and per kind; with the label sets'
    membership mask (N, C) also their joint coverage (share of sets holding both labels) and
    mean size."""
    if not len(label_sets):
        return {"images": 0}
    kinds_arr = np.asarray(kinds)
    by_kind = {k: np.flatnonzero(kinds_arr == k) for k in dict.fromkeys(kinds)}
    out = {"images": len(label_sets), "top2_joint_hit_rate": metrics.top2_joint_hit_rate(logits, label_sets),
           "by_kind": {k: metrics.top2_joint_hit_rate(logits[i], [label_sets[j] for j in i])
                       for k, i in by_kind.items()}}
    if label_set_mask is not None:
        out["label_set_joint_coverage"] = float(np.mean([all(label_set_mask[i, c] for c in s)
                                                         for i, s in enumerate(label_sets)]))
        out["label_set_mean_size"] = float(label_set_mask.sum(axis=1).mean())
    return out


def composite_evaluation(model, dataset: Dataset, labels: Sequence[int], pairs: Sequence[tuple[int, int]], *,
                         temperature: float = 1.0, rule=None, device: str = "cpu", max_pairs: int = 200) -> dict:
    """Two states in one photo without new photos, for ``model_evaluation``: composites of the
    (test) ``dataset``'s single-label photos (``(uint8 CHW, label)`` items) for each class pair
    (e.g. the tasks' positive labels, defect + dirt), :func:`composite_report` per pair (keyed
    ``"a+b"`` by class index) and pooled; ``rule``: the version's ``conformal.LabelSets``."""
    y = np.asarray(labels)
    wanted = sorted({c for p in pairs for c in p})
    rows = np.flatnonzero(np.isin(y, wanted))
    arrays = {int(i): dataset[int(i)][0].permute(1, 2, 0).numpy() for i in rows}
    per_pair, pooled = {}, ([], [], [], [])
    for a, b in pairs:
        comp, sets, kinds = composite_set(arrays, y, (a, b), max_pairs=max_pairs)
        if not comp:
            continue
        logits = predict_logits(model, ArrayDataset(comp, [0] * len(comp)), device=device)
        mask = rule.mask(ood.softmax(logits, temperature)) if rule is not None else None
        per_pair[f"{a}+{b}"] = composite_report(logits, sets, kinds, label_set_mask=mask)
        for acc, v in zip(pooled, (logits, sets, kinds, mask), strict=True):
            acc.append(v)
    if not per_pair:
        return {"images": 0}
    logits, masks = np.concatenate(pooled[0]), pooled[3]
    out = composite_report(logits, [s for ss in pooled[1] for s in ss], [k for kk in pooled[2] for k in kk],
                           label_set_mask=np.concatenate(masks) if rule is not None else None)
    return {**out, "pairs": per_pair}


# --------------------------------------------------------------------------- unfamiliar car photos vs irrelevant


def leave_one_class_out(arrays: Sequence[np.ndarray], labels: Sequence[int], ood_arrays: dict[str, list[np.ndarray]],
                        spec: ModelSpec, train_cfg: TrainConfig, left_out: Sequence[int], *, folds: int = 5,
                        val_fraction: float = 0.15, seed: int = 0, knn_k: int = 1, target_tpr: float = 0.95,
                        calibration_set: str | None = None, log: Callable[[str], object] = print) -> dict:
    """How often car photos of a state the model never trained on are flagged OOD, per score.

    For each class in ``left_out``: its photos leave the data; the other classes are split by
    stratified k-fold as :func:`cross_validate` does (train / val / test); a model trains on
    train. Every score (the package's, on the fine-tuned features, plus ``knn_pretrained``:
    kNN in the frozen pretrained backbone's feature space) is thresholded on val two ways:
    ``tpr`` (:func:`ood.threshold_at_tpr`, today's rule) and ``between``
    (:func:`ood.threshold_between` against ``calibration_set``, one of ``ood_arrays``, as the
    calibration would use a configured OOD set). Reported per score and rule: the left-out
    class's flag rate, the ID test photos' flag rate and each irrelevant set's rejected share;
    per score the AUROC of the ID test photos against each irrelevant set (mean over folds).
    """
    y = np.asarray(labels, dtype=np.int64)
    frozen = frozen_feature_model(spec)
    pre = predict_logits_and_features(frozen, ArrayDataset(arrays, y), device="cpu")[1]
    pre_ood = {k: predict_logits_and_features(frozen, ArrayDataset(v, [0] * len(v)), device="cpu")[1]
               for k, v in ood_arrays.items()}
    acc: dict[str, dict[str, list[float]]] = {}

    def add(method: str, key: str, value: float) -> None:
        acc.setdefault(method, {}).setdefault(key, []).append(float(value))

    for c in left_out:
        keep = np.flatnonzero(y != c)
        kept_classes = sorted(set(y[keep].tolist()))
        yk = np.searchsorted(kept_classes, y[keep])
        spec_c = dataclasses.replace(spec, num_classes=len(kept_classes))
        skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        for k, (rest, test) in enumerate(skf.split(np.zeros(len(keep)), yk)):
            n_val = max(len(np.unique(yk[rest])), int(round(val_fraction * len(rest))))
            train, val = train_test_split(rest, test_size=n_val, stratify=yk[rest], random_state=seed + k)
            res = train_classifier(spec_c, ArrayDataset([arrays[i] for i in keep[train]], yk[train]),
                                   ArrayDataset([arrays[i] for i in keep[val]], yk[val]), train_cfg,
                                   log=lambda s, c=c, k=k: log(f"  left out {c}, fold {k + 1}: {s}"))
            stats = ood.fit_feature_stats(res.train_features, res.train_labels)
            bank = ood.fit_feature_stats(pre[keep[train]], yk[train])["knn_bank"]
            groups = {"val": keep[val], "test": keep[test], "left_out": np.flatnonzero(y == c)}
            scored: dict[str, dict[str, np.ndarray]] = {}
            for g, idx in groups.items():
                lg, f = predict_logits_and_features(res.model, ArrayDataset([arrays[i] for i in idx], [0] * len(idx)),
                                                    device="cpu")
                scored[g] = {**ood.all_scores(lg, f, 1.0, stats, knn_k=knn_k),
                             "knn_pretrained": ood.knn_score(pre[idx], bank, knn_k)}
            for name, v in ood_arrays.items():
                lg, f = predict_logits_and_features(res.model, ArrayDataset(v, [0] * len(v)), device="cpu")
                scored[f"ood:{name}"] = {**ood.all_scores(lg, f, 1.0, stats, knn_k=knn_k),
                                         "knn_pretrained": ood.knn_score(pre_ood[name], bank, knn_k)}
            cal = calibration_set or next(iter(ood_arrays))
            for method in scored["val"]:
                thresholds = {"tpr": ood.threshold_at_tpr(scored["val"][method], target_tpr),
                              "between": ood.threshold_between(scored["val"][method], scored[f"ood:{cal}"][method],
                                                               target_tpr)}
                for rule, t in thresholds.items():
                    add(method, f"{rule}/left_out_flagged", np.mean(scored["left_out"][method] < t))
                    add(method, f"{rule}/test_flagged", np.mean(scored["test"][method] < t))
                    for name in ood_arrays:
                        add(method, f"{rule}/{name}_rejected", np.mean(scored[f"ood:{name}"][method] < t))
                for name in ood_arrays:
                    add(method, f"auroc/{name}", ood.auroc(scored["test"][method], scored[f"ood:{name}"][method]))
            log(f"left out class {c}, fold {k + 1}/{folds}: best epoch {res.best_epoch}, left-out flagged by knn "
                f"{acc['knn']['tpr/left_out_flagged'][-1]:.2f} (tpr rule)")
    return {"left_out": [int(c) for c in left_out], "folds": folds, "calibration_set": calibration_set,
            "target_tpr": target_tpr, "scores": {m: {k: _mean(v) for k, v in d.items()} for m, d in acc.items()}}


# -- one registered version: what ood_calibration and model_evaluation compute -------------------
@dataclass(frozen=True)
class CalibrationSettings:
    """The ``ood:`` and ``conformal:`` settings a calibration needs (plain values, not the config)."""

    score_method: str
    target_tpr: float
    threshold_rule: str
    knn_k: int
    coverage: float
    conformal_method: str
    task_positives: dict[str, int]
    device: str = "auto"


@dataclass(frozen=True)
class VersionCalibration:
    """The calibration report (per-image scores included), the label-set rule, the ROC figure
    and what a person should be warned about."""

    report: dict
    label_sets: conformal.LabelSets
    roc_png: bytes | None
    warnings: list[str]


def ood_set_features(model, uris_by_set: dict[str, list[str]], size: int, *, cache=None, device: str = "auto",
                     log: Callable[[str], Any] = print) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(logits, features) of every readable image of every OOD set; unreadable images and empty
    sets are skipped, each with a message to ``log``."""
    out = {}
    for name, uris in uris_by_set.items():
        arrays, errors = calibration.read_images(uris, size, cache=cache)
        for err in errors:
            log(f"OOD set {name!r}: image skipped: {shown(err, 400)}")
        if not arrays:
            log(f"OOD set {name!r} has no readable images; skipped")
            continue
        out[name] = predict_logits_and_features(model, ArrayDataset(arrays, [0] * len(arrays)), device=device)
    return out


def calibrate_version(model, meta: dict, val_ds: Dataset, val_y: np.ndarray,
                      ood_features: dict[str, tuple[np.ndarray, np.ndarray]],
                      settings: CalibrationSettings) -> VersionCalibration:
    """Temperature, OOD threshold and every OOD score side by side (``calibration.calibrate``) on
    the val split, then the conformal label-set rule on the tempered val probabilities."""
    logits, feats = predict_logits_and_features(model, val_ds, device=settings.device)
    report = calibration.calibrate(
        logits, val_y, feats, meta["ood_stats"], ood_features, score_method=settings.score_method,
        target_tpr=settings.target_tpr, knn_k=ood.package_knn_k(meta, settings.knn_k),  # the k serving uses
        threshold_rule=settings.threshold_rule, task_positives=settings.task_positives)
    warn = []
    if report["temperature_at_bound"]:
        warn.append(f"temperature hit its lower bound {calibration.TEMPERATURE_MIN}: the val NLL keeps "
                    "falling as it sharpens (val split perfectly separated, or the model underconfident); "
                    "probabilities use the bound")
    label_sets = conformal.calibrate(ood.softmax(logits, report["temperature"]), val_y,
                                     coverage=settings.coverage, method=settings.conformal_method)
    if np.isinf(label_sets.qhat):
        warn.append(f"{len(val_y)} val images are too few for label sets at coverage {settings.coverage}: "
                    "every set holds every label")
    curves = {name: (*ood.roc_curve(report["val_scores"], s), report["ood_sets"][name]["auroc"])
              for name, s in report["ood_scores"].items()}
    return VersionCalibration(report, label_sets, plots.roc_png(curves) if curves else None, warn)


def model_is_the_probe(*, freeze_backbone: bool, linear_probe: bool | None, arch: str,
                       pretrained: bool) -> bool:
    """A frozen pretrained backbone with the linear probe as the ``linear`` head: the model IS the
    frozen-feature probe (LP on the same features, same split, same C): no second fit."""
    return freeze_backbone and linear_probe is True and arch == "linear" and pretrained


def probe_figures(frozen, train_ds: Dataset, train_y: np.ndarray, test_ds: Dataset, y: np.ndarray,
                  ood_features: dict[str, np.ndarray], num_classes: int, *, c: float, knn_k: int,
                  device: str = "auto", log: Callable[[str], Any] = print) -> dict:
    """The frozen-feature probe baseline on the same train/test split (and OOD set features of
    ``frozen``): accuracy, macro-F1 and every score's OOD AUROC; ``{"skipped": why}`` if unfittable."""
    _, train_f = predict_logits_and_features(frozen, train_ds, device=device)
    _, test_f = predict_logits_and_features(frozen, test_ds, device=device)
    try:
        pb = probe_baseline(train_f, train_y, test_f, ood_features, num_classes, c=c, knn_k=knn_k)
    except ValueError as exc:  # e.g. a train split with one class
        log(f"probe baseline skipped: {exc}")
        return {"skipped": str(exc)}
    pred = pb.test_logits.argmax(1)
    return {"accuracy": metrics.accuracy(y, pred), "macro_f1": metrics.macro_f1(y, pred, num_classes),
            "ood_auroc_by_score": {name: {m: ood.auroc(pb.test_scores[m], v) for m, v in by.items()}
                                   for name, by in pb.ood_scores.items()}}


@dataclass(frozen=True)
class EvaluationSettings:
    """What an evaluation needs from the config, as plain values."""

    classes: list[str]
    tasks: dict[str, tuple[int, set[int]]]  # name -> (positive class, the task's own classes)
    positives: list[int]  # the tasks' positive classes: the composites' pairs
    knn_k: int = 1
    n_resamples: int = 1000
    device: str = "auto"


@dataclass(frozen=True)
class HeldOut:
    """The held-out images: single-label test photos and the multi-label ones (labels as index sets)."""

    dataset: Dataset
    y: np.ndarray
    multi: Dataset | None = None
    multi_sets: list[set[int]] = field(default_factory=list)


@dataclass(frozen=True)
class VersionEvaluation:
    result: dict  # model_evaluation's output and evaluation.json (the gate reads it)
    figures: dict[str, bytes]  # tracking.FIGURES keys


def ood_scores_by_method(report: dict) -> dict[str, dict[str, list]]:
    """The OOD sets' per-image scores of every method from a calibration report (an older report
    has the configured method's only)."""
    return report.get("ood_scores_by_method") or {
        k: {report["score_method"]: v} for k, v in report.get("ood_scores", {}).items()}


def _conformal(rule, probs, y, classes, multi_logits, multi_sets, temperature) -> dict:
    out = conformal.evaluate(rule, probs, y, classes)
    if multi_logits is not None:
        multi_probs = ood.softmax(multi_logits, temperature)
        out["multi_label"] = conformal.joint_hit_rate(rule, multi_probs, multi_sets)
    return out


def evaluate_version(model, meta: dict, *, temperature: float, score_method: str,
                     label_sets: conformal.LabelSets | None, ood_scores: dict[str, dict[str, list]],
                     test: HeldOut, settings: EvaluationSettings,
                     probe: Callable[[], dict] | None) -> VersionEvaluation:
    """One version on the test split: per-task and overall metrics with CIs, OOD AUROC of every
    score, top-2 and label sets on multi-label photos, two-state composites, and the probe
    baseline (``probe()``; ``{"same_as_model": True, ...}`` when :func:`model_is_the_probe`,
    signalled by ``probe=None``). The champion's re-score is the caller's (:func:`rescore`)."""
    classes, n = settings.classes, len(settings.classes)
    logits, feats = predict_logits_and_features(model, test.dataset, device=settings.device)
    multi_logits = None if test.multi is None else predict_logits(model, test.multi, device=settings.device)
    result = evaluate_test(
        test.y, logits, feats, num_classes=n, temperature=temperature, score_method=score_method,
        stats=meta["ood_stats"], knn_k=ood.package_knn_k(meta, settings.knn_k),
        ood_scores_by_method=ood_scores, tasks=settings.tasks, multi_logits=multi_logits,
        multi_label_sets=test.multi_sets, n_resamples=settings.n_resamples)
    probs = ood.softmax(logits, temperature)
    if label_sets is not None:
        result["conformal"] = _conformal(label_sets, probs, test.y, classes, multi_logits, test.multi_sets,
                                         temperature)
    pos = settings.positives
    result["composites"] = composite_evaluation(  # two states in one photo, from single-state ones
        model, test.dataset, test.y, [(a, b) for k, a in enumerate(pos) for b in pos[k + 1:]],
        temperature=temperature, device=settings.device, rule=label_sets)
    result["probe"] = probe() if probe is not None else {
        "accuracy": result["accuracy"], "macro_f1": result["macro_f1"],
        "ood_auroc_by_score": result["ood_auroc_by_score"], "same_as_model": True}
    figures = {"test_confusion_matrix": plots.confusion_matrix_png(
                   metrics.confusion_matrix(test.y, logits.argmax(1), n), classes),
               "reliability": plots.reliability_png(metrics.reliability_bins(probs, test.y))}
    return VersionEvaluation(result, figures)


def rescore(model, model_classes: Sequence[str], classes: Sequence[str], test_ds: Dataset, y: np.ndarray, *,
            device: str = "auto") -> float | None:
    """Another version's (the champion's) macro-F1 on the same test split; None when its classes
    differ (not comparable)."""
    if list(model_classes) != list(classes):
        return None
    return metrics.macro_f1(y, predict_logits(model, test_ds, device=device).argmax(1), len(classes))
