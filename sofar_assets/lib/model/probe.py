"""The frozen-feature linear probe: logistic regression on pretrained backbone features.

Two uses: the first half of LP-FT (the probe's weights initialise the classifier head before
fine-tuning; Kumar et al., ICLR 2022) and the built-in baseline every trained model is
compared with in ``model_evaluation`` (the simplest model that could work, on the same splits).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression

from sofar_assets.lib.model.metrics import _labels

# Logits of a class the probe never saw in training: far below any seen class, still finite.
UNSEEN_CLASS_BIAS = -30.0


@dataclass(frozen=True)
class LinearProbe:
    """``logits = features @ weight.T + bias`` over all ``num_classes`` (unseen ones get a low bias)."""

    weight: np.ndarray  # (C, D)
    bias: np.ndarray  # (C,)

    def logits(self, features) -> np.ndarray:
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != self.weight.shape[1]:
            raise ValueError(f"features must be (N, {self.weight.shape[1]}), got shape {f.shape}")
        return (f @ self.weight.T + self.bias).astype(np.float32)


def fit_probe(features, labels, num_classes: int, *, c: float = 1.0, seed: int = 0) -> LinearProbe:
    """Multinomial L2 logistic regression (sklearn, lbfgs) on frozen features.

    ``c`` is sklearn's inverse regularisation strength. Classes absent from ``labels`` get a
    zero weight row and the bias :data:`UNSEEN_CLASS_BIAS`, so they are never predicted.
    """
    f = np.asarray(features, dtype=np.float64)
    y = _labels(labels, "labels")
    if f.ndim != 2 or f.shape[0] != y.shape[0]:
        raise ValueError(f"features {f.shape} and {y.shape[0]} labels do not match")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels outside [0, {num_classes})")
    seen = np.unique(y)
    if seen.size < 2:
        raise ValueError(f"a linear probe needs training images of at least 2 classes, got {seen.tolist()}")
    clf = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(f, y)
    coef, intercept = clf.coef_, clf.intercept_
    if seen.size == 2:  # sklearn's binary case: one row for class seen[1]; make it symmetric
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.r_[-intercept / 2, intercept / 2]
    weight = np.zeros((num_classes, f.shape[1]))
    bias = np.full(num_classes, UNSEEN_CLASS_BIAS)
    weight[seen], bias[seen] = coef, intercept
    return LinearProbe(weight=weight, bias=bias)
