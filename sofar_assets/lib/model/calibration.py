"""OOD calibration math: temperature, threshold, and every OOD score side by side.

``ood_calibration`` (defs/model.py) feeds it the model's val logits/features and those of each
irrelevant image set; everything it decides is in the returned report. No Dagster here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from sofar_assets.lib.data import storage
from sofar_assets.lib.data.images import ImageDecodeError, PreprocessCache, load_image_array, sha256_hex
from sofar_assets.lib.model import ood

# A perfectly separated val split (or a very underconfident model) drives the NLL-optimal
# temperature towards 0, where every probability is 1.0; the bound keeps them informative.
TEMPERATURE_MIN = 0.5
THRESHOLD_RULES = ("target_tpr", "between")


def read_images(uris: Sequence[str], size: int, *, cache: PreprocessCache | None = None,
                read_bytes: Callable[[str], bytes] = storage.read_bytes) -> tuple[list[np.ndarray], list[str]]:
    """Preprocessed arrays of the readable images, and one message per unreadable one."""
    arrays, errors = [], []
    for uri in uris:
        try:
            data = read_bytes(uri)
            arrays.append(cache.get(sha256_hex(data), lambda d=data: d, uri) if cache is not None
                          else load_image_array(data, uri, size))
        except (ImageDecodeError, OSError) as exc:
            errors.append(f"{uri}: {exc}")
    return arrays, errors


def calibrate(val_logits: np.ndarray, val_y: np.ndarray, val_features: np.ndarray | None, stats: dict | None,
              ood_sets: dict[str, tuple[np.ndarray, np.ndarray | None]], *, score_method: str = "max_logit",
              target_tpr: float = 0.95, knn_k: int = 1, task_positives: dict[str, int] | None = None,
              temperature_min: float = TEMPERATURE_MIN, threshold_rule: str = "target_tpr") -> dict:
    """The calibration report of one model version.

    - ``temperature``: fitted on the val NLL (bounded below by ``temperature_min``;
      ``temperature_at_bound`` says when the bound decided);
    - ``threshold``: the configured score's value keeping ``target_tpr`` of the val images
      (``threshold_rule="target_tpr"``), or with ``"between"`` that value lowered to the
      midpoint between it and the highest score of any irrelevant image when all of them lie
      below it (:func:`ood.threshold_between`): irrelevant means "like the irrelevant sets",
      not merely "further than the few val photos" (README, Model quality);
      ``threshold_target_tpr`` is the plain rule's value either way;
    - ``ood_sets[name]``: images, AUROC / FPR@TPR / rejected share of the configured score,
      and ``scores[method] = {auroc, fpr_at_tpr}`` for every score the package allows;
    - ``ood_scores[name]``: the configured score on each OOD image (list), and
      ``ood_scores_by_method[name][method]``, reused by the evaluation on the test split;
    - ``task_auroc[task]``: one-vs-rest AUROC of the task's positive label on the val split.
    """
    temperature = ood.fit_temperature(val_logits, val_y, t_min=temperature_min)
    id_all = ood.all_scores(val_logits, val_features, temperature, stats, knn_k=knn_k)
    if score_method not in id_all:
        raise ValueError(f"ood.score {score_method!r} needs feature statistics the model package lacks")
    id_scores = id_all[score_method]
    if threshold_rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown ood threshold rule {threshold_rule!r}; valid: {', '.join(THRESHOLD_RULES)}")
    t_tpr = ood.threshold_at_tpr(id_scores, target_tpr)
    by_set = {name: ood.all_scores(logits, features, temperature, stats, knn_k=knn_k)
              for name, (logits, features) in ood_sets.items() if len(logits)}
    threshold = t_tpr
    if threshold_rule == "between" and by_set:
        threshold = ood.threshold_between(id_scores, np.concatenate([b[score_method] for b in by_set.values()]),
                                          target_tpr)
    report: dict = {
        "score_method": score_method, "temperature": temperature, "threshold": threshold, "target_tpr": target_tpr,
        "threshold_rule": threshold_rule, "threshold_target_tpr": t_tpr,
        "temperature_at_bound": bool(temperature <= temperature_min * 1.01),
        "val_images": int(len(val_y)), "val_tpr": float((id_scores >= threshold).mean()),
        "val_nll_before": ood.nll(val_logits, val_y, 1.0), "val_nll_after": ood.nll(val_logits, val_y, temperature),
        "val_score_min": float(id_scores.min()), "val_score_max": float(id_scores.max()),
        "val_scores": id_scores.tolist(),
        "ood_sets": {}, "ood_scores": {}, "ood_scores_by_method": {}, "task_auroc": {},
    }
    for name, by_method in by_set.items():
        s = by_method[score_method]
        report["ood_sets"][name] = {
            "images": int(len(s)), "auroc": ood.auroc(id_scores, s),
            "fpr_at_tpr": ood.fpr_at_tpr(id_scores, s, target_tpr), "rejected_share": float((s < threshold).mean()),
            "scores": {m: {"auroc": ood.auroc(id_all[m], v), "fpr_at_tpr": ood.fpr_at_tpr(id_all[m], v, target_tpr)}
                       for m, v in by_method.items()},
        }
        report["ood_scores"][name] = s.tolist()
        report["ood_scores_by_method"][name] = {m: v.tolist() for m, v in by_method.items()}
    for task, positive in (task_positives or {}).items():
        y = np.asarray(val_y)
        if (y == positive).any() and (y != positive).any():
            report["task_auroc"][task] = ood.one_vs_rest_auroc(val_logits, y, positive, temperature)
    return report


def scores_table(ood_sets: dict) -> str:
    """Markdown: one row per OOD set, AUROC / FPR@TPR of every score side by side."""
    methods = list(dict.fromkeys(m for r in ood_sets.values() for m in r["scores"]))
    lines = ["| OOD set | images | " + " | ".join(methods) + " |", "|---|---:|" + "---:|" * len(methods)]
    for name, r in ood_sets.items():
        cells = [f"{r['scores'][m]['auroc']:.3f} / {r['scores'][m]['fpr_at_tpr']:.2f}" if m in r["scores"] else "-"
                 for m in methods]
        lines.append(f"| {name} | {r['images']} | " + " | ".join(cells) + " |")
    return "AUROC / FPR@TPR\n\n" + "\n".join(lines)
