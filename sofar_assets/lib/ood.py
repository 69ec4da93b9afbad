"""Out-of-distribution scores, thresholds and ranking metrics in plain numpy.

Everything follows one sign convention: a *higher* score means *more in-distribution*, the
ID samples are the positives of every ROC quantity, and a sample is rejected as OOD when
``score < threshold``.
"""

from __future__ import annotations

import math

import numpy as np

from .metrics import _labels

METHODS = ("max_logit", "energy", "max_softmax")


def _logits2d(logits) -> np.ndarray:
    lg = np.asarray(logits, dtype=np.float64)
    if lg.ndim != 2:
        raise ValueError(f"logits must be (N, C), got shape {lg.shape}")
    if lg.shape[1] == 0:
        raise ValueError("logits need at least one class column")
    return lg


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]


def log_softmax(logits, temperature: float = 1.0) -> np.ndarray:
    """Row-wise ``log softmax(logits / T)``, stable for large logits."""
    z = _logits2d(logits) / _check_temperature(temperature)
    return z - _logsumexp(z)[:, None]


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    """Row-wise ``softmax(logits / T)``, stable for large logits."""
    z = _logits2d(logits) / _check_temperature(temperature)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def scores(logits, method: str = "max_logit", temperature: float = 1.0) -> np.ndarray:
    """Per-sample in-distribution score (higher = more in-distribution).

    - ``max_logit``: ``max_c logits[c]`` on the raw logits. ``temperature`` is validated but
      not applied: dividing by a positive T does not change the ranking, and raw logits keep
      a threshold fitted before temperature scaling valid afterwards.
    - ``energy``: ``T * logsumexp(logits / T)`` (the negative free energy).
    - ``max_softmax``: ``max_c softmax(logits / T)[c]``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown OOD score method {method!r}; valid: {', '.join(METHODS)}")
    t = _check_temperature(temperature)
    lg = _logits2d(logits)
    if method == "max_logit":
        return lg.max(axis=1)
    if method == "energy":
        return t * _logsumexp(lg / t)
    return softmax(lg, t).max(axis=1)


def nll(logits, y, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true labels under ``softmax(logits / T)``."""
    lg = _logits2d(logits)
    yy = _labels(y, "y")
    if yy.shape[0] != lg.shape[0]:
        raise ValueError(f"logits has {lg.shape[0]} rows but y has {yy.shape[0]} labels")
    if yy.size == 0:
        return float("nan")
    if yy.min() < 0 or yy.max() >= lg.shape[1]:
        raise ValueError(f"y holds labels outside [0, {lg.shape[1]})")
    logp = log_softmax(lg, temperature)
    return float(-np.mean(logp[np.arange(yy.size), yy]))


def fit_temperature(logits, y, t_min: float = 0.05, t_max: float = 20.0, iters: int = 80) -> float:
    """Temperature ``T`` in ``[t_min, t_max]`` minimising validation NLL (temperature scaling).

    Golden-section search on ``log T``: NLL is convex in ``1/T``, hence unimodal in ``log T``.
    Returns 1.0 whenever the search result would not lower the NLL below the one at T = 1, so
    fitting never makes the validation NLL worse. Argmax predictions are unchanged by any T.
    """
    if not 0 < t_min < 1 < t_max:
        raise ValueError("need 0 < t_min < 1 < t_max")
    lg = _logits2d(logits)
    base = nll(lg, y, 1.0)
    if not math.isfinite(base):
        return 1.0
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = math.log(t_min), math.log(t_max)
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = nll(lg, y, math.exp(c)), nll(lg, y, math.exp(d))
    for _ in range(iters):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - inv_phi * (b - a)
            fc = nll(lg, y, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + inv_phi * (b - a)
            fd = nll(lg, y, math.exp(d))
    best_u, best_f = (c, fc) if fc <= fd else (d, fd)
    # the bracket ends are never evaluated by the interior probes; check them as well
    for u in (math.log(t_min), math.log(t_max)):
        f = nll(lg, y, math.exp(u))
        if f < best_f:
            best_u, best_f = u, f
    return float(math.exp(best_u)) if best_f < base else 1.0


def _scores1d(x, name: str, allow_empty: bool = False) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64).ravel()
    if arr.size == 0 and not allow_empty:
        raise ValueError(f"{name} is empty")
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN")
    return arr


def _required_count(n: int, tpr: float) -> int:
    if not 0.0 <= tpr <= 1.0:
        raise ValueError(f"tpr must lie in [0, 1], got {tpr}")
    # round first: 0.7 * 10 == 7.000000000000001 must still ask for 7 samples, not 8
    return max(1, math.ceil(round(tpr * n, 9)))


def threshold_at_tpr(id_scores, tpr: float = 0.95) -> float:
    """Largest ID score ``t`` with ``mean(id_scores >= t) >= tpr``.

    With ``n`` scores sorted ascending as ``s[0..n-1]`` and ``k = max(1, ceil(tpr * n))``,
    the result is ``s[n - k]`` (e.g. 20 scores at tpr 0.95 -> ``k = 19`` -> the 2nd
    smallest). It is always one of the ID scores, so it lies in ``[min, max]``; tpr 0 gives
    the maximum. Samples with ``score < t`` are called OOD.
    """
    s = np.sort(_scores1d(id_scores, "id_scores"))
    k = _required_count(s.size, tpr)
    return float(s[s.size - k])


def auroc(id_scores, ood_scores) -> float:
    """P(random ID score > random OOD score), ties counting 1/2 (Mann-Whitney U / (n*m)).

    O((n + m) log m) via binary search into the sorted OOD scores.
    """
    pos = _scores1d(id_scores, "id_scores")
    neg = np.sort(_scores1d(ood_scores, "ood_scores"))
    below = np.searchsorted(neg, pos, side="left")  # OOD strictly below each ID score
    not_above = np.searchsorted(neg, pos, side="right")  # OOD <= each ID score
    u = below.sum(dtype=np.float64) + 0.5 * (not_above - below).sum(dtype=np.float64)
    return float(u / (pos.size * neg.size))


def fpr_at_tpr(id_scores, ood_scores, tpr: float = 0.95) -> float:
    """Share of OOD scores accepted (``>= threshold_at_tpr(id_scores, tpr)``)."""
    t = threshold_at_tpr(id_scores, tpr)
    neg = _scores1d(ood_scores, "ood_scores")
    return float(np.mean(neg >= t))


def roc_curve(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` for every distinct threshold, from (0, 0) up to (1, 1).

    Point ``i`` accepts every sample with ``score >= thresholds[i]`` (thresholds descending).
    """
    pos = np.sort(_scores1d(id_scores, "id_scores"))
    neg = np.sort(_scores1d(ood_scores, "ood_scores"))
    thresholds = np.unique(np.concatenate([pos, neg]))[::-1]
    tpr = (pos.size - np.searchsorted(pos, thresholds, side="left")) / pos.size
    fpr = (neg.size - np.searchsorted(neg, thresholds, side="left")) / neg.size
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])


def one_vs_rest_auroc(logits, y_true, positive_class: int, temperature: float = 1.0) -> float:
    """AUROC of "is this ``positive_class``?" scored by that class's softmax probability.

    The paper's one-class recognition AUROC per task; ``nan`` when either side is empty.
    Ranks by the log-odds ``z_pos - logsumexp(z_others)`` (``p = sigmoid`` of it, so the same
    order as the probability) so confident samples do not all tie at a probability that
    rounds to 1.0.
    """
    lg = _logits2d(logits)
    y = _labels(y_true, "y_true")
    if y.shape[0] != lg.shape[0]:
        raise ValueError(f"logits has {lg.shape[0]} rows but y_true has {y.shape[0]} labels")
    if not 0 <= positive_class < lg.shape[1]:
        raise ValueError(f"positive_class {positive_class} outside [0, {lg.shape[1]})")
    if lg.shape[1] < 2:
        raise ValueError("one_vs_rest_auroc needs at least two classes")
    z = lg / _check_temperature(temperature)
    others = np.delete(z, positive_class, axis=1)
    p = z[:, positive_class] - _logsumexp(others)
    is_pos = y == positive_class
    if is_pos.all() or not is_pos.any():
        return float("nan")
    return auroc(p[is_pos], p[~is_pos])
