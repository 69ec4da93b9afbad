import math

import numpy as np
import pytest

from sofar_assets.lib.model import ood
from sofar_assets.lib.model.ood import (
    all_scores,
    auroc,
    fit_feature_stats,
    fit_temperature,
    fpr_at_tpr,
    knn_score,
    log_softmax,
    mahalanobis_score,
    nll,
    one_vs_rest_auroc,
    roc_curve,
    score,
    scores,
    softmax,
    threshold_at_tpr,
)

LOGITS_2x3 = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])


def test_score_definitions_on_2x3():
    np.testing.assert_allclose(scores(LOGITS_2x3, "max_logit"), [3.0, 0.0])
    # energy = log(e^1 + e^2 + e^3) = 3 + log(1 + e^-1 + e^-2); row 2: log 3
    np.testing.assert_allclose(
        scores(LOGITS_2x3, "energy"), [3 + math.log(1 + math.exp(-1) + math.exp(-2)), math.log(3)]
    )
    # max softmax = e^3 / (e^1 + e^2 + e^3) = 1 / (1 + e^-1 + e^-2); row 2: 1/3
    np.testing.assert_allclose(
        scores(LOGITS_2x3, "max_softmax"), [1 / (1 + math.exp(-1) + math.exp(-2)), 1 / 3]
    )


def test_score_definitions_with_temperature_2():
    # logits / 2 = [0.5, 1, 1.5]: energy = 2 * (1.5 + log(1 + e^-0.5 + e^-1)); row 2: 2 log 3
    np.testing.assert_allclose(
        scores(LOGITS_2x3, "energy", temperature=2.0),
        [2 * (1.5 + math.log(1 + math.exp(-0.5) + math.exp(-1))), 2 * math.log(3)],
    )
    np.testing.assert_allclose(
        scores(LOGITS_2x3, "max_softmax", temperature=2.0),
        [1 / (1 + math.exp(-0.5) + math.exp(-1)), 1 / 3],
    )
    # max_logit is on raw logits by design: T does not move it
    np.testing.assert_allclose(scores(LOGITS_2x3, "max_logit", temperature=2.0), [3.0, 0.0])


def test_unknown_method_and_bad_temperature_raise():
    with pytest.raises(ValueError, match="max_logit, energy, max_softmax"):
        scores(LOGITS_2x3, "entropy")
    with pytest.raises(ValueError, match="temperature"):
        scores(LOGITS_2x3, "energy", temperature=0.0)


def test_softmax_is_stable_for_huge_logits():
    p = softmax(np.array([[1000.0, 1000.0, -1000.0]]))
    np.testing.assert_allclose(p, [[0.5, 0.5, 0.0]])
    np.testing.assert_allclose(log_softmax(np.array([[1000.0, 1000.0]])), [[-math.log(2)] * 2])
    assert np.isfinite(scores(np.array([[1e4, 0.0]]), "energy")).all()


def test_auroc_by_hand_with_a_tie():
    # pairs (id, ood): (3,2)=1 (3,0)=1 (2,2)=0.5 (2,0)=1 (1,2)=0 (1,0)=1 -> 4.5 / 6
    assert auroc([3, 2, 1], [2, 0]) == pytest.approx(0.75)
    assert auroc([1, 1], [1]) == pytest.approx(0.5)
    assert auroc([5, 6], [1, 2]) == 1.0
    assert auroc([1, 2], [5, 6]) == 0.0


def test_auroc_matches_brute_force_on_random_data():
    rng = np.random.default_rng(7)
    # rounded to integers so many ties occur
    pos = np.round(rng.normal(1.0, 2.0, 300))
    neg = np.round(rng.normal(0.0, 2.0, 200))
    diff = pos[:, None] - neg[None, :]
    brute = (np.sum(diff > 0) + 0.5 * np.sum(diff == 0)) / diff.size
    assert auroc(pos, neg) == pytest.approx(brute, abs=1e-12)


def test_threshold_at_tpr_20_scores_picks_second_smallest():
    # 19 of 20 must be accepted: the largest such threshold is the 2nd-smallest score
    rng = np.random.default_rng(0)
    id_scores = rng.permutation(np.arange(20) * 1.5)
    t = threshold_at_tpr(id_scores, 0.95)
    assert t == 1.5
    assert np.mean(id_scores >= t) == 0.95


def test_threshold_at_tpr_edge_rules():
    s = np.arange(10.0)  # 0..9
    # 0.7 * 10 == 7.000000000000001 must still mean "7 accepted" -> s[3]
    assert threshold_at_tpr(s, 0.7) == 3.0
    assert threshold_at_tpr(s, 1.0) == 0.0
    assert threshold_at_tpr(s, 0.0) == 9.0  # stays inside [min, max]
    # ties: [1,1,1,2] at 0.5 -> need 2 accepted -> s[2] = 1, which accepts 4
    assert threshold_at_tpr([2, 1, 1, 1], 0.5) == 1.0
    with pytest.raises(ValueError):
        threshold_at_tpr([], 0.95)


def test_fpr_at_tpr_by_hand():
    id_scores = [1.0, 2.0, 3.0, 4.0]
    ood_scores = [0.0, 2.0, 2.5, 5.0]
    # tpr 0.75 -> keep 3 of 4 -> t = 2; OOD >= 2: {2, 2.5, 5} -> 3/4
    assert fpr_at_tpr(id_scores, ood_scores, 0.75) == pytest.approx(0.75)
    # tpr 0.5 -> t = 3; OOD >= 3: {5} -> 1/4
    assert fpr_at_tpr(id_scores, ood_scores, 0.5) == pytest.approx(0.25)


def test_roc_curve_by_hand_and_area_equals_auroc():
    fpr, tpr = roc_curve([3, 2, 1], [2, 0])
    # thresholds 3, 2, 1, 0 after the (0, 0) start
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 1.0, 1.0])
    # trapezoids: 0.5 * (1/3 + 2/3) / 2 + 0.5 * 1 = 0.75 = auroc (ties become diagonal segments)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc([3, 2, 1], [2, 0]))


def test_one_vs_rest_auroc_by_hand():
    # with the other logits 0, p(class 1) rises with its logit: scores 2, 1, 0, 3
    logits = np.array([[0, 2, 0], [0, 1, 0], [0, 0, 0], [0, 3, 0]], dtype=float)
    y = [1, 0, 1, 2]
    # positives {2, 0}, negatives {1, 3}: (2,1)=1 (2,3)=0 (0,1)=0 (0,3)=0 -> 1/4
    assert one_vs_rest_auroc(logits, y, 1) == pytest.approx(0.25)
    assert math.isnan(one_vs_rest_auroc(logits, [0, 0, 0, 0], 1))


def test_one_vs_rest_auroc_separates_saturated_probabilities():
    # both softmax probs of class 1 round to exactly 1.0; the ranking must still see 50 > 40
    logits = np.array([[0.0, 50.0], [0.0, 40.0]])
    assert softmax(logits)[0, 1] == softmax(logits)[1, 1] == 1.0
    assert one_vs_rest_auroc(logits, [1, 0], 1) == 1.0


def _calibrated_logits(n: int, c: int, a: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    # y uniform, z | y ~ N(a * e_y, I)  =>  p(y | z) = softmax(a * z): a * z is calibrated
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    z = rng.normal(size=(n, c))
    z[np.arange(n), y] += a
    return a * z, y


def test_temperature_fixes_overconfident_logits():
    logits, y = _calibrated_logits(4000, 5, 1.5, seed=1)
    hot = 5.0 * logits
    t = fit_temperature(hot, y)
    assert 4.0 < t < 6.0
    assert nll(hot, y, t) < 0.7 * nll(hot, y, 1.0)
    np.testing.assert_array_equal(softmax(hot, t).argmax(1), hot.argmax(1))


def test_temperature_near_one_on_calibrated_logits():
    logits, y = _calibrated_logits(4000, 5, 1.5, seed=2)
    t = fit_temperature(logits, y)
    assert 0.85 < t < 1.15
    assert nll(logits, y, t) <= nll(logits, y, 1.0)


def test_temperature_below_one_for_underconfident_logits_and_never_worse():
    logits, y = _calibrated_logits(2000, 4, 2.0, seed=3)
    cold = 0.25 * logits
    t = fit_temperature(cold, y)
    assert 0.15 < t < 0.4
    for seed in range(5):
        lg, yy = _calibrated_logits(50, 3, 0.5, seed=10 + seed)
        assert nll(lg, yy, fit_temperature(lg, yy)) <= nll(lg, yy, 1.0)


def test_nll_by_hand():
    # row 1: -log(e^3 / (e^1 + e^2 + e^3)); row 2: -log(1/3)
    expected = (math.log(1 + math.exp(-1) + math.exp(-2)) + math.log(3)) / 2
    assert nll(LOGITS_2x3, [2, 0]) == pytest.approx(expected)
    with pytest.raises(ValueError, match="outside"):
        nll(LOGITS_2x3, [3, 0])


# ---------------------------------------------------------------- feature scores (Mahalanobis, kNN)


def test_knn_score_is_minus_the_kth_nearest_normalised_distance():
    bank = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    f = np.array([[2.0, 0.0], [1.0, 1.0]])  # normalised: (1, 0) and (1, 1)/sqrt2
    np.testing.assert_allclose(knn_score(f, bank, k=1), [0.0, -math.sqrt(2 - math.sqrt(2))])
    # 2nd nearest of (1, 0): (0, 1) and (0, -1) both at distance sqrt(2)
    np.testing.assert_allclose(knn_score(f[:1], bank, k=2), [-math.sqrt(2)])
    assert knn_score(f[:1], bank, k=99)[0] == pytest.approx(-math.sqrt(2))  # k capped at the bank size


def test_mahalanobis_score_by_hand_and_feature_stats():
    means, precision = np.array([[0.0, 0.0], [4.0, 0.0]]), np.diag([1.0, 4.0])
    f = np.array([[1.0, 1.0], [3.0, 0.0]])
    # row 1: to mean 0: 1 + 4 = 5, to mean 1: 9 + 4 = 13 -> -5; row 2: to mean 1: 1 -> -1
    np.testing.assert_allclose(mahalanobis_score(f, means, precision), [-5.0, -1.0])
    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(size=(20, 5)), rng.normal(size=(20, 5)) + 5]
    stats = fit_feature_stats(x, [0] * 20 + [1] * 20)
    assert stats["knn_bank"].dtype == np.float32 and np.allclose(np.linalg.norm(stats["knn_bank"], axis=1), 1)
    np.testing.assert_allclose(stats["maha_means"][1], x[20:].mean(0), rtol=1e-5)
    far = rng.normal(size=(10, 5)) * 3 + np.array([20, -20, 0, 0, 0])
    for method in ("mahalanobis", "knn"):
        assert auroc(score(None, x, method, 1.0, stats), score(None, far, method, 1.0, stats)) > 0.95


def test_feature_scores_need_features_and_stats():
    with pytest.raises(ValueError, match="needs penultimate features"):
        scores(LOGITS_2x3, "knn")
    with pytest.raises(ValueError, match="knn_bank"):
        score(LOGITS_2x3, np.zeros((2, 4)), "knn", 1.0, {})
    assert set(all_scores(LOGITS_2x3, None)) == {"max_logit", "energy", "max_softmax"}


def test_threshold_between_keeps_unfamiliar_in_and_irrelevant_out():
    val = np.linspace(0.8, 1.0, 20)
    docs = np.array([0.1, 0.2, 0.3])
    unfamiliar = np.array([0.6, 0.7])  # further than any val photo, far closer than a document
    t_id = ood.threshold_at_tpr(val, 0.95)
    assert (unfamiliar < t_id).all()  # today's rule flags them
    t = ood.threshold_between(val, docs, 0.95)
    assert t == pytest.approx((t_id + 0.3) / 2) and (unfamiliar >= t).all() and (docs < t).all()
    # overlapping sets, or none: the ID threshold itself
    assert ood.threshold_between(val, np.array([0.9]), 0.95) == t_id
    assert ood.threshold_between(val, np.array([]), 0.95) == t_id
