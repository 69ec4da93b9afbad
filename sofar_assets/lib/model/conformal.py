"""Calibrated label sets: split conformal prediction over the model's softmax probabilities.

Beside its top-2, every scored photo gets the set of labels that, at the configured coverage
(say 90 %), contains the true label of a photo from the same distribution at least 90 % of the
time. One label is a confident answer; two ("dirt|defect") is the honest answer for a photo
that is both dirty and damaged, or that the model cannot tell apart; none means no label
reaches the bar. ``ood_calibration`` calibrates the threshold on the val split (the same
probabilities the daily rows use: the model's fitted temperature applied) and tags it on the
model version (lib/serving/registry.py); ``predict_images`` applies it to every row.

Two conformity scores (``conformal.method``):

- ``lac`` (least ambiguous set-valued classifier, Sadinle et al. 2019): ``s(x, y) = 1 - p_y``;
  the set is every label with ``1 - p_c <= qhat``. Smallest sets on average; may be empty.
- ``aps`` (adaptive prediction sets, Romano et al. 2020, not randomised): ``s(x, y)`` is the
  probability mass of the labels ranked at or above ``y``; the set is the top labels up to and
  including the one whose mass crosses ``qhat`` (Angelopoulos & Bates 2021, §2.1), so it is
  never empty. Larger sets, sized to how spread the probabilities are.

``qhat`` is the ``ceil((n + 1) * coverage)``-th smallest of the ``n`` val scores (the
finite-sample quantile, level ``ceil((n + 1) * coverage) / n``); with fewer than
``coverage / (1 - coverage)`` val images it does not exist and every set holds every label.

Why ~20 lines of numpy and not a library: MAPIE's and puncc's split-conformal classifiers are
built around a model object to call; crepes takes precomputed probabilities, but keeps the whole calibration
score array and computes p-values against it for every row, smoothed (randomised) by default,
and exposes no threshold. The daily rows need ONE number on the registry tag that every shard
applies the same way, deterministically. The LAC sets are the conformal p-value sets
``{c : (#{cal >= s_c} + 1) / (n + 1) > 1 - coverage}`` (the tests check that with their own
count). Checked once against crepes 0.9.1 (``hinge`` scores, ``smoothing=False``) on 500
calibration and 2,000 test rows of 7 classes at coverage 0.8 / 0.9 / 0.95: identical sets;
when ``(n + 1) * (1 - coverage)`` is a whole number crepes' ``p >= 1 - confidence`` keeps one
more calibration rank (larger sets than the guarantee needs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import binomtest

METHODS = ("lac", "aps")
SEPARATOR = "|"  # label_set: the set's labels joined by "|", in descending probability order


def _order(probs: np.ndarray) -> np.ndarray:
    """Labels by descending probability; ties: the lower class index first (as the top-2)."""
    return np.argsort(-probs, axis=1, kind="stable")


def scores(probs: np.ndarray, method: str = "lac") -> np.ndarray:
    """``(n, C)`` nonconformity of every label of every row (lower: more plausible)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probabilities must be (rows, classes), got shape {probs.shape}")
    if method == "lac":
        return 1.0 - probs
    if method == "aps":
        order = _order(probs)
        mass = np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1)  # through each rank
        out = np.empty_like(probs)
        np.put_along_axis(out, order, mass, axis=1)
        return out
    raise ValueError(f"unknown conformal method {method!r}; valid: {', '.join(METHODS)}")


def quantile(cal_scores: np.ndarray, coverage: float) -> float:
    """The ``ceil((n + 1) * coverage)``-th smallest score; ``inf`` when that exceeds ``n``."""
    if not 0.0 < coverage < 1.0:
        raise ValueError(f"coverage must be in (0, 1), got {coverage}")
    s = np.sort(np.asarray(cal_scores, dtype=np.float64).ravel())
    k = math.ceil((len(s) + 1) * coverage)
    return float(s[k - 1]) if k <= len(s) else math.inf


@dataclass(frozen=True)
class LabelSets:
    """A calibrated label-set rule: ``qhat`` on ``method``'s scores for ``coverage``, from
    ``n_cal`` val images."""

    method: str
    coverage: float
    qhat: float
    n_cal: int

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown conformal method {self.method!r}; valid: {', '.join(METHODS)}")

    def mask(self, probs: np.ndarray) -> np.ndarray:
        """``(n, C)`` bool: which labels are in each row's set."""
        s = scores(probs, self.method)
        if self.method == "aps":  # the mass ranked above the label is still short of qhat
            return s - np.asarray(probs, dtype=np.float64) < self.qhat
        return s <= self.qhat

    def as_dict(self) -> dict:
        return asdict(self)


def calibrate(probs: np.ndarray, y: np.ndarray, *, coverage: float = 0.9, method: str = "lac") -> LabelSets:
    """The label-set rule from calibration probabilities ``probs`` and true labels ``y``."""
    probs, y = np.asarray(probs, dtype=np.float64), np.asarray(y, dtype=np.int64)
    if len(probs) != len(y):
        raise ValueError(f"{len(probs)} probability rows but {len(y)} labels")
    true_scores = scores(probs, method)[np.arange(len(y)), y]
    return LabelSets(method, float(coverage), quantile(true_scores, coverage), int(len(y)))


def set_labels(mask: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Each row's set as ``label_set`` text (labels by descending probability, joined by "|";
    "" for an empty set) and its size."""
    order = _order(probs)
    kept = np.take_along_axis(mask, order, axis=1)
    names = np.asarray(classes, dtype=object)
    text = [SEPARATOR.join(names[o[k]]) for o, k in zip(order, kept, strict=True)]
    return text, mask.sum(axis=1).astype(np.int64)


def _coverage_figures(covered: np.ndarray, sizes: np.ndarray, confidence: float = 0.95) -> dict:
    n, k = int(len(covered)), int(covered.sum())
    if n == 0:
        return {"images": 0, "coverage": None, "coverage_ci": [None, None], "mean_set_size": None}
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return {"images": n, "coverage": k / n, "coverage_ci": [float(ci.low), float(ci.high)],
            "mean_set_size": float(sizes.mean())}


def evaluate(rule: LabelSets, probs: np.ndarray, y: np.ndarray, classes: Sequence[str]) -> dict:
    """Empirical coverage (Wilson 95 % interval) and mean set size of ``rule`` on a labelled
    split, overall and per true class, with the count of rows per set size."""
    probs, y = np.asarray(probs, dtype=np.float64), np.asarray(y, dtype=np.int64)
    mask = rule.mask(probs) if len(y) else np.zeros((0, len(classes)), bool)
    covered, sizes = mask[np.arange(len(y)), y], mask.sum(axis=1)
    return {
        **rule.as_dict(), "target": rule.coverage, **_coverage_figures(covered, sizes),
        "set_size_counts": {int(s): int(c) for s, c in zip(*np.unique(sizes, return_counts=True), strict=True)},
        "per_class": {name: _coverage_figures(covered[y == i], sizes[y == i]) for i, name in enumerate(classes)
                      if (y == i).any()},
    }


def joint_hit_rate(rule: LabelSets, probs: np.ndarray, label_sets: Sequence[set[int]]) -> dict:
    """On multi-label photos: the share whose set holds ALL their labels, and the mean set size."""
    if not len(label_sets):
        return {"images": 0, "all_labels_in_set": None, "mean_set_size": None}
    mask = rule.mask(probs)
    hits = [all(mask[i, c] for c in labels) for i, labels in enumerate(label_sets)]
    return {"images": len(label_sets), "all_labels_in_set": float(np.mean(hits)),
            "mean_set_size": float(mask.sum(axis=1).mean())}
