import math

import numpy as np
import pytest

from sofar_assets.lib.model.metrics import (
    accuracy,
    binary_task_metrics,
    confusion_matrix,
    expected_calibration_error,
    macro_f1,
    per_class_f1,
    reliability_bins,
    top2_joint_hit_rate,
)

Y_TRUE = [0, 0, 1, 1, 2, 2]
Y_PRED = [0, 1, 1, 1, 0, 2]


def test_confusion_matrix_rows_are_true_cols_are_pred():
    cm = confusion_matrix(Y_TRUE, Y_PRED, 3)
    # true 0 -> pred {0, 1}; true 1 -> pred {1, 1}; true 2 -> pred {0, 2}
    expected = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    np.testing.assert_array_equal(cm, expected)
    assert cm.dtype == np.int64


def test_confusion_matrix_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix([0, 3], [0, 1], 3)


def test_accuracy():
    # matches at positions 0, 2, 3, 5 -> 4 / 6
    assert accuracy(Y_TRUE, Y_PRED) == pytest.approx(4 / 6)
    assert math.isnan(accuracy([], []))
    with pytest.raises(ValueError, match="differ in length"):
        accuracy([0, 1], [0])


def test_macro_f1_three_classes_by_hand():
    # F1 = 2TP / (2TP + FP + FN)
    # class 0: TP 1 (pos 0), FP 1 (pos 4), FN 1 (pos 1) -> 2/4 = 0.5
    # class 1: TP 2, FP 1 (pos 1), FN 0                 -> 4/5 = 0.8
    # class 2: TP 1, FP 0, FN 1 (pos 4)                 -> 2/3
    expected = (0.5 + 0.8 + 2 / 3) / 3
    assert macro_f1(Y_TRUE, Y_PRED, 3) == pytest.approx(expected)
    np.testing.assert_allclose(per_class_f1(Y_TRUE, Y_PRED, 3), [0.5, 0.8, 2 / 3])


def test_macro_f1_skips_classes_absent_from_truth_and_prediction():
    # classes 3 and 4 never occur: 0/0 F1 is skipped, not counted as 0
    assert macro_f1(Y_TRUE, Y_PRED, 5) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_macro_f1_counts_a_class_that_is_only_predicted_as_zero():
    # class 0: TP 1, FN 1 -> 2/3 ; class 1: FP 1 -> 0 ; class 2 absent -> skipped
    assert macro_f1([0, 0], [0, 1], 3) == pytest.approx((2 / 3 + 0.0) / 2)
    assert math.isnan(macro_f1([], [], 3))


# label space: 0 defect/normal, 1 defect/defect, 2 dirt/normal, 3 dirt/dirt
TASK_TRUE = [0, 1, 1, 0, 2, 3, 1]
TASK_PRED = [0, 1, 0, 1, 2, 1, 3]


def test_binary_task_metrics_restricted_to_the_task_labels():
    # keep rows whose true label is in {0, 1}: (0,0) (1,1) (1,0) (0,1) (1,3)
    # truth "is 1":  F T T F T ; prediction "is 1": F T F T F
    # TP 1, FP 1, FN 2, TN 1 -> acc 2/5, precision 1/2, recall 1/3, F1 2/(2+1+2)
    m = binary_task_metrics(TASK_TRUE, TASK_PRED, positive_classes={1}, task_classes={0, 1})
    assert m["n"] == 5
    assert m["accuracy"] == pytest.approx(0.4)
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(0.4)


def test_binary_task_metrics_on_all_rows_and_int_positive():
    # the two extra rows: (2,2) is TN, (3,1) is FP -> TP 1, FP 2, FN 2, TN 2
    m = binary_task_metrics(TASK_TRUE, TASK_PRED, positive_classes=1)
    assert m == pytest.approx(
        {"accuracy": 3 / 7, "precision": 1 / 3, "recall": 1 / 3, "f1": 2 / 6, "n": 7}
    )


def test_binary_task_metrics_zero_denominators_and_empty_task():
    # nothing predicted positive and nothing truly positive: precision/recall/F1 fall back to 0
    m = binary_task_metrics([0, 0], [0, 0], positive_classes={1})
    assert (m["accuracy"], m["precision"], m["recall"], m["f1"]) == (1.0, 0.0, 0.0, 0.0)
    empty = binary_task_metrics([2, 3], [2, 3], positive_classes={1}, task_classes={0, 1})
    assert empty["n"] == 0 and math.isnan(empty["accuracy"])


# confidences 0.95, 0.85, 0.75, 0.55 (none on a bin edge); correct, wrong, correct, wrong
PROBS = np.array([[0.95, 0.05], [0.15, 0.85], [0.75, 0.25], [0.45, 0.55]])
LABELS = np.array([0, 0, 0, 0])


def test_ece_four_samples_by_hand():
    # 5 bins of width 0.2: (0.4,0.6] holds 0.55, (0.6,0.8] holds 0.75, (0.8,1] holds 0.95, 0.85
    # (0.8,1]:   acc 1/2, conf 0.90 -> |0.5 - 0.9| * 2/4 = 0.2
    # (0.6,0.8]: acc 1,   conf 0.75 -> 0.25 * 1/4       = 0.0625
    # (0.4,0.6]: acc 0,   conf 0.55 -> 0.55 * 1/4       = 0.1375
    assert expected_calibration_error(PROBS, LABELS, n_bins=5) == pytest.approx(0.4)


def test_reliability_bins_by_hand():
    b = reliability_bins(PROBS, LABELS, n_bins=5)
    np.testing.assert_allclose(b["edges"], [0, 0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_array_equal(b["counts"], [0, 0, 1, 1, 2])
    np.testing.assert_allclose(b["accuracy"], [np.nan, np.nan, 0.0, 1.0, 0.5])
    np.testing.assert_allclose(b["confidence"], [np.nan, np.nan, 0.55, 0.75, 0.9])


def test_reliability_bin_edges_are_right_closed():
    # 0.7 is the upper edge of (0.6, 0.7] even though 0.7 * 10 == 7.000000000000001 in floats
    b = reliability_bins(np.array([[0.7, 0.3]]), [0], n_bins=10)
    assert b["counts"][6] == 1 and b["counts"].sum() == 1


def test_ece_is_zero_when_confidence_matches_accuracy():
    # two samples at confidence 0.5 in one bin, one right and one wrong -> gap 0
    probs = np.array([[0.5, 0.5], [0.5, 0.5]])
    assert expected_calibration_error(probs, [0, 1]) == pytest.approx(0.0)


def test_top2_joint_hit_rate_by_hand():
    logits = np.array(
        [
            [5.0, 4.0, 0.0, 0.0],  # top2 {0,1} vs {0,1} -> hit
            [5.0, 0.0, 4.0, 0.0],  # top2 {0,2} vs {0,1} -> miss (only one of two)
            [0.0, 1.0, 3.0, 2.0],  # top2 {2,3} vs {3}   -> hit (single label in top 2)
            [3.0, 2.0, 1.0, 0.0],  # top2 {0,1} vs {2}   -> miss
        ]
    )
    assert top2_joint_hit_rate(logits, [{0, 1}, {0, 1}, {3}, {2}]) == pytest.approx(0.5)


def test_top2_ties_prefer_lower_index_and_bad_sets_raise():
    # all equal: top2 is {0, 1}
    assert top2_joint_hit_rate(np.zeros((1, 3)), [{2}]) == 0.0
    assert top2_joint_hit_rate(np.zeros((1, 3)), [{0, 1}]) == 1.0
    with pytest.raises(ValueError, match="1 or 2 labels"):
        top2_joint_hit_rate(np.zeros((1, 3)), [{0, 1, 2}])
