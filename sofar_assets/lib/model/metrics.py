"""Classification metrics over sklearn.metrics, with the conventions below, and bootstrap CIs.

Conventions shared by every function here:
- labels are integer class indices in ``[0, num_classes)``;
- empty inputs give ``nan`` rather than raising, so an empty evaluation split shows up as a
  missing number in the UI instead of crashing a materialization.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
from scipy.stats import bootstrap
from sklearn.metrics import confusion_matrix as _sk_confusion_matrix
from sklearn.metrics import f1_score


def _labels(y, name: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        as_int = arr.astype(np.int64)
        if not np.array_equal(as_int, arr):
            raise ValueError(f"{name} must hold integer class indices")
        arr = as_int
    return arr.astype(np.int64, copy=False)


def _pair(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    t, p = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.shape[0]} vs {p.shape[0]}")
    return t, p


def accuracy(y_true, y_pred) -> float:
    """Share of exact matches; ``nan`` for empty input."""
    t, p = _pair(y_true, y_pred)
    if t.size == 0:
        return float("nan")
    return float(np.mean(t == p))


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Counts (int64, ``num_classes x num_classes``): rows = true class, columns = predicted."""
    t, p = _pair(y_true, y_pred)
    if num_classes < 1:
        raise ValueError("num_classes must be >= 1")
    for name, arr in (("y_true", t), ("y_pred", p)):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(f"{name} holds labels outside [0, {num_classes})")
    if t.size == 0:
        return np.zeros((num_classes, num_classes), dtype=np.int64)
    return _sk_confusion_matrix(t, p, labels=np.arange(num_classes)).astype(np.int64)


def per_class_f1(y_true, y_pred, num_classes: int) -> np.ndarray:
    """F1 per class; ``nan`` for a class absent from both ``y_true`` and ``y_pred``."""
    t, p = _pair(y_true, y_pred)
    confusion_matrix(t, p, num_classes)  # validates the label range
    if t.size == 0:
        return np.full(num_classes, np.nan)
    f1 = f1_score(t, p, labels=np.arange(num_classes), average=None, zero_division=0.0).astype(np.float64)
    seen = np.isin(np.arange(num_classes), np.r_[t, p])
    f1[~seen] = np.nan  # 0/0: neither true nor predicted (sklearn would say 0)
    return f1


def macro_f1(y_true, y_pred, num_classes: int) -> float:
    """Unweighted mean F1 over the classes that occur in ``y_true`` or ``y_pred``.

    A class absent from both has an undefined F1 (0/0) and is skipped, so adding unused slots
    to the label space does not drag the score down; a class that is only predicted (or only
    true) counts with F1 = 0. ``nan`` for empty input.
    """
    f1 = per_class_f1(y_true, y_pred, num_classes)
    if np.all(np.isnan(f1)):
        return float("nan")
    return float(np.nanmean(f1))


def _as_class_set(classes: Iterable[int] | int) -> set[int]:
    if isinstance(classes, (int, np.integer)):
        return {int(classes)}
    return {int(c) for c in classes}


def binary_task_metrics(
    y_true,
    y_pred,
    positive_classes: set[int] | int,
    task_classes: set[int] | None = None,
) -> dict:
    """Score an N-class prediction on one task's yes/no question (e.g. "is this a defect?").

    truth = ``y_true in positive_classes``, prediction = ``y_pred in positive_classes``.
    With ``task_classes`` only samples whose *true* label is in that set (the task's own
    label set) are scored; a prediction of another task's label then counts as "negative".
    Precision/recall/F1 with a zero denominator are 0.0; everything but ``n`` is ``nan``
    when no sample is left.
    """
    t, p = _pair(y_true, y_pred)
    pos = _as_class_set(positive_classes)
    if task_classes is not None:
        keep = np.isin(t, sorted(_as_class_set(task_classes)))
        t, p = t[keep], p[keep]
    n = int(t.size)
    if n == 0:
        nan = float("nan")
        return {"accuracy": nan, "precision": nan, "recall": nan, "f1": nan, "n": 0}
    truth = np.isin(t, sorted(pos))
    pred = np.isin(p, sorted(pos))
    tp = int(np.sum(truth & pred))
    fp = int(np.sum(~truth & pred))
    fn = int(np.sum(truth & ~pred))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return {
        "accuracy": float(np.mean(truth == pred)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "n": n,
    }


def _probs_and_labels(probs, y_true) -> tuple[np.ndarray, np.ndarray]:
    pr = np.asarray(probs, dtype=np.float64)
    if pr.ndim != 2:
        raise ValueError(f"probs must be (N, C), got shape {pr.shape}")
    t = _labels(y_true, "y_true")
    if t.shape[0] != pr.shape[0]:
        raise ValueError(f"probs has {pr.shape[0]} rows but y_true has {t.shape[0]} labels")
    return pr, t


def _bin_index(conf: np.ndarray, edges: np.ndarray) -> np.ndarray:
    # Bins are (edges[k], edges[k+1]]; confidence 0 joins the first bin. Searching the very
    # edges that are reported keeps a confidence equal to an edge in the bin the plot shows
    # (ceil(conf * n) would put 0.7 into (0.7, 0.8] because 0.7 * 10 == 7.000000000000001).
    return np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, edges.size - 2)


def reliability_bins(probs, y_true, n_bins: int = 15) -> dict:
    """Per-bin statistics for a reliability diagram.

    Returns ``edges`` (n_bins+1), and per bin ``accuracy``, ``confidence`` (mean top-1
    probability; ``nan`` for an empty bin) and ``counts``.
    """
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    pr, t = _probs_and_labels(probs, y_true)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    counts = np.zeros(n_bins, dtype=np.int64)
    acc = np.full(n_bins, np.nan)
    conf_mean = np.full(n_bins, np.nan)
    if t.size:
        conf = pr.max(axis=1)
        correct = (pr.argmax(axis=1) == t).astype(np.float64)
        idx = _bin_index(conf, edges)
        counts = np.bincount(idx, minlength=n_bins).astype(np.int64)
        nz = counts > 0
        acc[nz] = np.bincount(idx, weights=correct, minlength=n_bins)[nz] / counts[nz]
        conf_mean[nz] = np.bincount(idx, weights=conf, minlength=n_bins)[nz] / counts[nz]
    return {"edges": edges, "accuracy": acc, "confidence": conf_mean, "counts": counts}


def expected_calibration_error(probs, y_true, n_bins: int = 15) -> float:
    """ECE: sum over equal-width confidence bins of ``count/N * |accuracy - confidence|``."""
    bins = reliability_bins(probs, y_true, n_bins)
    counts = bins["counts"]
    total = counts.sum()
    if total == 0:
        return float("nan")
    nz = counts > 0
    gap = np.abs(bins["accuracy"][nz] - bins["confidence"][nz])
    return float(np.sum(counts[nz] / total * gap))


def top2_joint_hit_rate(logits, label_sets: Sequence[Iterable[int]]) -> float:
    """Share of samples whose whole set of true labels lies within the top-2 predictions.

    A photo with two true labels (e.g. dirty *and* dented) hits only if both are the two
    highest logits; a single-label sample hits if its label is among the top 2. Label sets
    must hold 1 or 2 labels. Ties between logits are broken by the lower class index.
    """
    lg = np.asarray(logits, dtype=np.float64)
    if lg.ndim != 2:
        raise ValueError(f"logits must be (N, C), got shape {lg.shape}")
    if len(label_sets) != lg.shape[0]:
        raise ValueError(f"logits has {lg.shape[0]} rows but {len(label_sets)} label sets were given")
    if lg.shape[0] == 0:
        return float("nan")
    k = min(2, lg.shape[1])
    # stable sort on -logits keeps lower indices first among ties
    top = np.argsort(-lg, axis=1, kind="stable")[:, :k]
    hits = 0
    for row, labels in zip(top, label_sets, strict=True):
        s = _as_class_set(labels)
        if not 1 <= len(s) <= 2:
            raise ValueError(f"each label set must hold 1 or 2 labels, got {sorted(s)}")
        hits += s.issubset({int(c) for c in row})
    return hits / lg.shape[0]


def bootstrap_ci(statistic: Callable[[np.ndarray], float], n: int | Sequence[int], *, confidence: float = 0.95,
                 n_resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over resampled row indices.

    ``n`` is the sample size, or a sequence of sizes for independent samples (e.g. ID and OOD
    scores for an AUROC): each is resampled on its own and ``statistic`` receives one index
    array per sample. ``(nan, nan)`` when a sample has fewer than 2 rows. Uses ``scipy.stats.bootstrap``;
    percentile intervals because BCa is undefined for the degenerate resamples small
    evaluation splits produce (e.g. every resample's F1 = 1.0).
    """
    sizes = [int(n)] if isinstance(n, (int, np.integer)) else [int(k) for k in n]
    if min(sizes) < 2:  # one observation has no spread to resample
        return float("nan"), float("nan")
    res = bootstrap(tuple(np.arange(k) for k in sizes), lambda *idx: statistic(*idx), vectorized=False,
                    paired=False, n_resamples=n_resamples, confidence_level=confidence, method="percentile",
                    rng=np.random.default_rng(seed))
    lo, hi = res.confidence_interval
    return float(lo), float(hi)
