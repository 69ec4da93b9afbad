"""Out-of-distribution scores, thresholds and ranking metrics (numpy, scipy, sklearn).

Everything follows one sign convention: a *higher* score means *more in-distribution*, the
ID samples are the positives of every ROC quantity, and a sample is rejected as OOD when
``score < threshold``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax as _log_softmax
from scipy.special import logsumexp
from scipy.special import softmax as _softmax
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as _sk_roc_curve

from sofar_assets.lib.model.metrics import _labels

LOGIT_METHODS = ("max_logit", "energy", "max_softmax")
# Scores on the penultimate features; they need the statistics of the training features
# (:func:`fit_feature_stats`), which travel in the model package as safetensors.
FEATURE_METHODS = ("mahalanobis", "knn")
METHODS = LOGIT_METHODS + FEATURE_METHODS
# what each feature score reads from the package's ``ood_stats``
FEATURE_STATS = {"knn": ("knn_bank",), "mahalanobis": ("maha_means", "maha_precision")}


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


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown OOD score method {method!r}; valid: {', '.join(METHODS)}")


def log_softmax(logits, temperature: float = 1.0) -> np.ndarray:
    """Row-wise ``log softmax(logits / T)``, stable for large logits."""
    return _log_softmax(_logits2d(logits) / _check_temperature(temperature), axis=1)


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    """Row-wise ``softmax(logits / T)``, stable for large logits."""
    return _softmax(_logits2d(logits) / _check_temperature(temperature), axis=1)


def scores(logits, method: str = "max_logit", temperature: float = 1.0) -> np.ndarray:
    """Per-sample in-distribution score from logits alone (higher = more in-distribution).

    - ``max_logit``: ``max_c logits[c]`` on the raw logits. ``temperature`` is validated but
      not applied: dividing by a positive T does not change the ranking, and raw logits keep
      a threshold fitted before temperature scaling valid afterwards.
    - ``energy``: ``T * logsumexp(logits / T)`` (the negative free energy).
    - ``max_softmax``: ``max_c softmax(logits / T)[c]``.

    The feature scores (``mahalanobis``, ``knn``) need features: use :func:`score`.
    """
    _check_method(method)
    if method in FEATURE_METHODS:
        raise ValueError(f"OOD score {method!r} needs penultimate features and the package's feature "
                         "statistics: call ood.score(logits, features, method, temperature, stats)")
    t = _check_temperature(temperature)
    lg = _logits2d(logits)
    if method == "max_logit":
        return lg.max(axis=1)
    if method == "energy":
        return t * logsumexp(lg / t, axis=1)
    return softmax(lg, t).max(axis=1)


# --------------------------------------------------------------------------- feature scores


def _features2d(features, name: str = "features") -> np.ndarray:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[1] == 0:
        raise ValueError(f"{name} must be (N, D) with D > 0, got shape {f.shape}")
    return f


def _l2_normalize(f: np.ndarray) -> np.ndarray:
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def fit_feature_stats(features, labels, *, knn_bank_max: int | None = None,
                      knn_bank_reduction: str = "coreset", seed: int = 0) -> dict[str, np.ndarray]:
    """What the feature scores need at prediction time, from the TRAINING split's features.

    - ``knn_bank``: the L2-normalised training features (Sun et al., ICML 2022), at most
      ``knn_bank_max`` rows (:func:`reduce_bank`: a greedy k-center coreset or a random subset;
      None keeps them all);
    - ``maha_means`` / ``maha_precision``: per-class means of the classes present and the
      precision of the shared, class-centred covariance (Lee et al., NeurIPS 2018), estimated
      with Ledoit-Wolf shrinkage because there are usually fewer photos than dimensions.

    float32 arrays, ready for safetensors.
    """
    f = _features2d(features, "training features")
    y = _labels(labels, "labels")
    if y.shape[0] != f.shape[0]:
        raise ValueError(f"{f.shape[0]} feature rows but {y.shape[0]} labels")
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 training feature rows, got {f.shape[0]}")
    classes = np.unique(y)
    means = np.stack([f[y == c].mean(axis=0) for c in classes])
    centred = f - means[np.searchsorted(classes, y)]
    precision = LedoitWolf(assume_centered=True).fit(centred).precision_
    bank = _l2_normalize(f).astype(np.float32)
    if knn_bank_max is not None:
        bank = reduce_bank(bank, knn_bank_max, knn_bank_reduction, seed=seed)
    return {
        "knn_bank": bank,
        "maha_means": means.astype(np.float32),
        "maha_precision": precision.astype(np.float32),
    }


def knn_score(features, bank, k: int = 1) -> np.ndarray:
    """Minus the distance to the ``k``-th nearest normalised training feature (higher = ID)."""
    f = _l2_normalize(_features2d(features))
    b = np.asarray(bank)
    if b.ndim != 2 or b.shape[0] == 0 or not np.issubdtype(b.dtype, np.floating):
        raise ValueError(f"knn_bank must be a non-empty float (N, D) array, got {b.dtype} {b.shape}")
    if f.shape[1] != b.shape[1]:
        raise ValueError(f"features have {f.shape[1]} dimensions but the kNN bank has {b.shape[1]}")
    k = max(1, min(int(k), b.shape[0]))
    # unit vectors: |a - b|^2 = 2 - 2 a.b, so the k-th largest similarity is the k-th nearest.
    # The ranking uses the product in the bank's own dtype (float32 in a package): converting a
    # bank of many thousand rows on every batch would cost more than the product. The distance
    # to the neighbour found is then taken on the difference, in float64: sqrt(2 - 2 a.b) in
    # float32 is off by up to ~5e-4 for a photo (nearly) in the bank (a.b rounds within 6e-8
    # of 1), which is also where the device search (DeviceKnn) would round differently.
    sim = f.astype(b.dtype) @ b.T
    kth = np.argpartition(-sim, k - 1, axis=1)[:, k - 1]
    return -np.linalg.norm(f - b[kth].astype(np.float64), axis=1)


BANK_REDUCTIONS = ("coreset", "random")


def reduce_bank(bank, max_rows: int, method: str = "coreset", *, seed: int = 0,
                projection_dim: int = 128) -> np.ndarray:
    """At most ``max_rows`` rows of a kNN bank (rows kept in their original order).

    - ``coreset``: greedy k-center selection (the coreset subsampling of PatchCore, Roth et
      al., CVPR 2022): start at a random row, then repeatedly add the row farthest from the
      rows kept, so every dropped row lies close to a kept one and the nearest-neighbour
      distances, hence the kNN score's ranking, change little. Distances are taken on a
      Johnson-Lindenstrauss random projection to ``projection_dim`` dimensions (O(N x max_rows x
      projection_dim), seconds for 100k rows).
    - ``random``: a uniform random subset.
    """
    b = np.asarray(bank)
    if max_rows < 1:
        raise ValueError(f"knn_bank_max must be at least 1, got {max_rows}")
    if method not in BANK_REDUCTIONS:
        raise ValueError(f"unknown kNN bank reduction {method!r}; valid: {', '.join(BANK_REDUCTIONS)}")
    n = b.shape[0]
    if n <= max_rows:
        return b
    rng = np.random.default_rng(seed)
    if method == "random":
        return b[np.sort(rng.choice(n, max_rows, replace=False))]
    x = b.astype(np.float32)
    if x.shape[1] > projection_dim:
        proj = rng.standard_normal((x.shape[1], projection_dim)).astype(np.float32) / np.sqrt(projection_dim)
        x = x @ proj
    sq = np.einsum("ij,ij->i", x, x)
    chosen = np.empty(max_rows, dtype=np.int64)
    chosen[0] = rng.integers(n)
    # squared distance of every row to its nearest chosen row
    nearest = sq - 2.0 * (x @ x[chosen[0]]) + sq[chosen[0]]
    for i in range(1, max_rows):
        c = int(np.argmax(nearest))
        chosen[i] = c
        np.minimum(nearest, sq - 2.0 * (x @ x[c]) + sq[c], out=nearest)
    return b[np.sort(chosen)]


class DeviceKnn:
    """The kNN score with the bank on a torch device (the inference device), searched in
    batches of ``bank_rows`` bank rows: the same scores as :func:`knn_score` (to float32
    rounding, ~1e-6), without a CPU round trip of the features or a numpy product per batch.
    The bank is copied to the device once."""

    def __init__(self, bank, device="cpu", *, bank_rows: int = 65_536):
        import torch

        b = np.asarray(bank)
        if b.ndim != 2 or b.shape[0] == 0 or not np.issubdtype(b.dtype, np.floating):
            raise ValueError(f"knn_bank must be a non-empty float (N, D) array, got {b.dtype} {b.shape}")
        self.device = torch.device(device)
        self.bank = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32)).to(self.device)
        self.bank_rows = int(bank_rows)

    def score(self, features, k: int = 1) -> np.ndarray:
        """Minus the distance to the ``k``-th nearest bank row, per row of ``features`` (a torch
        tensor on any device, or an array)."""
        import torch

        with torch.inference_mode():
            f = torch.as_tensor(features).to(self.device, torch.float64)
            if f.ndim != 2 or f.shape[1] == 0:
                raise ValueError(f"features must be (N, D) with D > 0, got shape {tuple(f.shape)}")
            if f.shape[1] != self.bank.shape[1]:
                raise ValueError(f"features have {f.shape[1]} dimensions but the kNN bank has {self.bank.shape[1]}")
            f64 = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
            f = f64.to(torch.float32)
            k = max(1, min(int(k), self.bank.shape[0]))
            best = best_idx = None  # the k largest similarities so far (and their bank rows), per feature row
            for start in range(0, self.bank.shape[0], self.bank_rows):
                sim = f @ self.bank[start:start + self.bank_rows].T
                idx = torch.arange(start, start + sim.shape[1], device=self.device).expand(sim.shape[0], -1)
                if best is not None:
                    sim, idx = torch.cat([best, sim], dim=1), torch.cat([best_idx, idx], dim=1)
                best, pos = sim.topk(min(k, sim.shape[1]), dim=1)
                best_idx = idx.gather(1, pos)
            kth = best_idx[:, k - 1]
            # the distance on the difference, in float64, as knn_score takes it
            return (-(f64 - self.bank[kth].double()).norm(dim=1)).cpu().numpy()


def device_knn(method: str, stats: dict | None, device) -> DeviceKnn | None:
    """A :class:`DeviceKnn` over the package's bank when ``method`` is ``knn``, else None."""
    if method != "knn" or not stats or "knn_bank" not in stats:
        return None
    return DeviceKnn(stats["knn_bank"], device)


def mahalanobis_score(features, means, precision) -> np.ndarray:
    """Minus the smallest Mahalanobis distance (squared) to a class mean (higher = ID)."""
    f = _features2d(features)
    mu = _features2d(means, "maha_means")
    p = np.asarray(precision, dtype=np.float64)
    if mu.shape[1] != f.shape[1] or p.shape != (f.shape[1], f.shape[1]):
        raise ValueError(f"features have {f.shape[1]} dimensions but the Mahalanobis statistics are "
                         f"{mu.shape} / {p.shape}")
    # (f - m)' P (f - m) = f'Pf - 2 f'Pm + m'Pm (P symmetric): two products with P instead of
    # one per (image, class) pair
    fp, mp = f @ p, mu @ p
    d2 = (fp * f).sum(axis=1)[:, None] - 2.0 * (f @ mp.T) + (mp * mu).sum(axis=1)[None, :]
    return -d2.min(axis=1)


def score(logits, features, method: str = "max_logit", temperature: float = 1.0,
          stats: dict | None = None, *, knn_k: int = 1) -> np.ndarray:
    """Any OOD score of :data:`METHODS` for one batch (higher = more in-distribution).

    Logit scores ignore ``features``/``stats``; ``knn`` and ``mahalanobis`` need the batch's
    penultimate features (``SofarNet.forward_features``) and the package's feature statistics
    (:func:`fit_feature_stats`).
    """
    _check_method(method)
    if method in LOGIT_METHODS:
        return scores(logits, method, temperature)
    missing = missing_stats(method, stats)
    if features is None or missing:
        raise ValueError(f"OOD score {method!r} needs features and the model package's {list(FEATURE_STATS[method])}; "
                         f"missing: {missing or ['features']} (a package trained before feature scores existed?)")
    if method == "knn":
        return knn_score(features, stats["knn_bank"], knn_k)
    return mahalanobis_score(features, stats["maha_means"], stats["maha_precision"])


def missing_stats(method: str, stats: dict | None) -> list[str]:
    """The ``ood_stats`` entries ``method`` needs that ``stats`` lacks (none for logit scores)."""
    _check_method(method)
    return [k for k in FEATURE_STATS.get(method, ()) if not stats or k not in stats]


def all_scores(logits, features, temperature: float = 1.0, stats: dict | None = None, *,
               knn_k: int = 1) -> dict[str, np.ndarray]:
    """Every score the inputs allow, by method (feature scores only with features + stats)."""
    methods = METHODS if features is not None and stats else LOGIT_METHODS
    return {m: score(logits, features, m, temperature, stats, knn_k=knn_k) for m in methods}


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


def fit_temperature(logits, y, t_min: float = 0.05, t_max: float = 20.0) -> float:
    """Temperature ``T`` in ``[t_min, t_max]`` minimising validation NLL (temperature scaling).

    Bounded scalar minimisation on ``log T`` (NLL is convex in ``1/T``, hence unimodal in
    ``log T``), with both bounds checked too. Returns 1.0 whenever the result would not lower
    the NLL below the one at T = 1, so fitting never makes the validation NLL worse. Argmax
    predictions are unchanged by any T.
    """
    if not 0 < t_min < 1 < t_max:
        raise ValueError("need 0 < t_min < 1 < t_max")
    lg = _logits2d(logits)
    base = nll(lg, y, 1.0)
    if not math.isfinite(base):
        return 1.0
    res = minimize_scalar(lambda u: nll(lg, y, math.exp(u)), bounds=(math.log(t_min), math.log(t_max)),
                          method="bounded", options={"xatol": 1e-6})
    best_u, best_f = float(res.x), float(res.fun)
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


def _id_vs_ood(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray]:
    pos = _scores1d(id_scores, "id_scores")
    neg = _scores1d(ood_scores, "ood_scores")
    return np.r_[np.ones(pos.size), np.zeros(neg.size)], np.r_[pos, neg]


def auroc(id_scores, ood_scores) -> float:
    """P(random ID score > random OOD score), ties counting 1/2 (sklearn's ROC AUC)."""
    truth, s = _id_vs_ood(id_scores, ood_scores)
    return float(roc_auc_score(truth, s))


def fpr_at_tpr(id_scores, ood_scores, tpr: float = 0.95) -> float:
    """Share of OOD scores accepted (``>= threshold_at_tpr(id_scores, tpr)``)."""
    t = threshold_at_tpr(id_scores, tpr)
    neg = _scores1d(ood_scores, "ood_scores")
    return float(np.mean(neg >= t))


def roc_curve(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` for every distinct threshold, from (0, 0) up to (1, 1).

    Point ``i`` accepts every sample with ``score >= thresholds[i]`` (thresholds descending).
    """
    truth, s = _id_vs_ood(id_scores, ood_scores)
    fpr, tpr, _ = _sk_roc_curve(truth, s, drop_intermediate=False)
    return fpr, tpr


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
    p = z[:, positive_class] - logsumexp(others, axis=1)
    is_pos = y == positive_class
    if is_pos.all() or not is_pos.any():
        return float("nan")
    return auroc(p[is_pos], p[~is_pos])


def package_knn_k(meta: dict, default: int = 1) -> int:
    """The k of the kNN score recorded in a model package (``meta["extra"]["ood_knn_k"]``)."""
    return int((meta.get("extra") or {}).get("ood_knn_k", default))


def package_score(logits, features, method: str, temperature: float, meta: dict) -> np.ndarray:
    """``score`` with what the model package carries: ``meta["ood_stats"]`` (the feature
    statistics) and ``meta["extra"]["ood_knn_k"]`` (the k the kNN score was calibrated with)."""
    return score(logits, features, method, temperature, meta.get("ood_stats"), knn_k=package_knn_k(meta))


# --------------------------------------------------------------------------- "not a car photo" (issue 26)


def threshold_between(id_scores, irrelevant_scores, tpr: float = 0.95) -> float:
    """A threshold that rejects what looks like the irrelevant images rather than what is merely
    unfamiliar: :func:`threshold_at_tpr` of the ID (val) scores, lowered to the midpoint between
    it and the highest irrelevant-image score when every irrelevant image scores below it.

    The ID threshold alone sits at the edge of the few val photos, so a car photo of a state
    never trained on (further from the train photos than any val photo, still far closer than a
    document) is flagged; the midpoint keeps the margin to the irrelevant sets on both sides.
    When the sets overlap (highest irrelevant score >= the ID threshold) it is the ID
    threshold. Never higher than the ID threshold, so the val TPR stays >= ``tpr``.
    """
    t_id = threshold_at_tpr(id_scores, tpr)
    irr = _scores1d(irrelevant_scores, "irrelevant_scores", allow_empty=True)
    if irr.size == 0:
        return t_id
    top = float(irr.max())
    return (t_id + top) / 2.0 if top < t_id else t_id
