"""Calibrated label sets (lib/model/conformal.py): coverage on synthetic data within sampling error, the
finite-sample quantile, the registry tags, and the day's review queue selected in the warehouse
(DuckDB, and the BigQuery emulator)."""

from __future__ import annotations

import datetime as dt
import math
import uuid
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from test_warehouse_api import rows

from sofar_assets.config import ConfigError, parse_config
from sofar_assets.lib.model import conformal
from sofar_assets.lib.review.queue import (
    AMBIGUOUS_SET,
    EMPTY_SET,
    OOD,
    QUEUE_COLUMNS,
    review_queue,
    review_queue_counts,
    review_sheet_png,
)
from sofar_assets.lib.serving import registry
from sofar_assets.lib.warehouse import (
    PREDICTIONS,
    BigQueryWarehouse,
    DuckDBWarehouse,
    ParquetSpool,
    TableSchema,
)

C = 7


def draw(rng, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A known distribution: softmax of N(0, 2^2) logits, the true label drawn from those very
    probabilities (a perfectly calibrated model, so coverage is a property of the rule alone)."""
    logits = rng.normal(0.0, 2.0, size=(n, C))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    y = (probs.cumsum(1) < rng.uniform(size=(n, 1))).sum(1)
    return probs, np.minimum(y, C - 1)


@pytest.mark.parametrize("method", conformal.METHODS)
def test_coverage_on_a_synthetic_set_is_within_sampling_error_of_the_target(method):
    rng = np.random.default_rng(7)
    n_cal, n_test, target = 1000, 5000, 0.9
    rule = conformal.calibrate(*draw(rng, n_cal), coverage=target, method=method)
    probs, y = draw(rng, n_test)
    report = conformal.evaluate(rule, probs, y, [f"c{i}" for i in range(C)])
    # the coverage given one calibration set is Beta-distributed (variance ~ a(1-a)/(n_cal+2)),
    # and the test share adds binomial noise a(1-a)/n_test
    sigma = math.sqrt(target * (1 - target) * (1 / (n_cal + 2) + 1 / n_test))
    assert report["images"] == n_test and rule.n_cal == n_cal
    if method == "lac":
        assert abs(report["coverage"] - target) <= 3 * sigma, (report["coverage"], sigma)
    else:  # aps keeps the label that crosses qhat: at least the target, never empty
        assert report["coverage"] >= target - 3 * sigma and 0 not in report["set_size_counts"]
    lo, hi = report["coverage_ci"]
    assert lo < report["coverage"] < hi
    assert 1.0 < report["mean_set_size"] < C - 1  # informative sets: neither top-1 only nor everything
    assert sum(report["set_size_counts"].values()) == n_test
    assert sum(pc["images"] for pc in report["per_class"].values()) == n_test
    # per class, the coverage averages back to the overall figure
    weighted = sum(pc["coverage"] * pc["images"] for pc in report["per_class"].values()) / n_test
    assert weighted == pytest.approx(report["coverage"])


def test_lac_has_smaller_sets_than_aps_on_the_same_data():
    rng = np.random.default_rng(3)
    cal, test = draw(rng, 1000), draw(rng, 3000)
    sizes = {m: conformal.evaluate(conformal.calibrate(*cal, method=m), *test, list("abcdefg"))["mean_set_size"]
             for m in conformal.METHODS}
    assert sizes["lac"] < sizes["aps"]


def test_the_finite_sample_quantile_gives_the_target_in_expectation_where_the_plain_one_falls_short():
    rng = np.random.default_rng(0)
    n, target, reps = 19, 0.9, 4000  # ceil(20 * 0.9) = 18: the 18th of 19 scores, E[coverage] = 18/20
    finite, plain = [], []
    for _ in range(reps):
        cal, test = rng.uniform(size=n), rng.uniform(size=50)
        finite.append((test <= conformal.quantile(cal, target)).mean())
        plain.append((test <= np.quantile(cal, target)).mean())
    sigma = math.sqrt((np.var(finite) + 1e-12) / reps)
    assert abs(np.mean(finite) - 0.9) <= 3 * sigma
    assert np.mean(plain) < 0.9 - 0.02  # ~0.86: the uncorrected quantile under-covers on 19 images
    assert conformal.quantile(rng.uniform(size=8), 0.9) == math.inf  # 8 < 0.9 / 0.1: no such quantile
    every = conformal.LabelSets("lac", 0.9, math.inf, 8).mask(np.array([[0.98, 0.01, 0.01]]))
    assert every.all()
    with pytest.raises(ValueError, match="coverage must be in"):
        conformal.quantile(np.ones(10), 1.0)


def test_lac_sets_are_the_conformal_p_value_sets():
    rng = np.random.default_rng(1)
    (pc, yc), (pt, _) = draw(rng, 200), draw(rng, 500)
    rule = conformal.calibrate(pc, yc, coverage=0.9)
    cal = 1.0 - pc[np.arange(len(yc)), yc]
    p_values = ((cal[None, None, :] >= (1.0 - pt)[:, :, None]).sum(2) + 1) / (len(cal) + 1)
    assert (rule.mask(pt) == (p_values > 1 - 0.9)).all()


def test_set_text_is_in_descending_probability_order_and_empty_sets_are_empty_strings():
    probs = np.array([[0.05, 0.47, 0.48], [0.01, 0.98, 0.01], [0.34, 0.33, 0.33]])
    rule = conformal.LabelSets("lac", 0.9, 0.6, 100)  # keep labels with p >= 0.4
    text, sizes = conformal.set_labels(rule.mask(probs), probs, ["normal", "defect", "dirt"])
    assert text == ["dirt|defect", "defect", ""] and sizes.tolist() == [2, 1, 0]
    with pytest.raises(ValueError, match="unknown conformal method 'raps'"):
        conformal.LabelSets("raps", 0.9, 0.5, 10)


def test_the_rule_round_trips_through_the_model_version_tags():
    ls = conformal.LabelSets("aps", 0.9, 0.9371234567890123, 412)
    cal = registry.Calibration("energy", 1.25, -3.5, ls)
    tags = cal.as_tags(target_tpr=0.95)
    assert tags["conformal_qhat"] == repr(ls.qhat) and tags["conformal_n_cal"] == "412"
    mv = SimpleNamespace(name="m", version="3", tags=tags)
    assert registry.read_calibration(mv) == cal  # exact floats: repr round-trips
    inf = registry.Calibration("max_logit", 1.0, 2.0, conformal.LabelSets("lac", 0.95, math.inf, 5))
    assert registry.read_calibration(SimpleNamespace(name="m", version="4", tags=inf.as_tags())) == inf
    # a version calibrated before label sets existed: OOD calibration, no rule
    old = {k: v for k, v in tags.items() if not k.startswith("conformal_")}
    back = registry.read_calibration(SimpleNamespace(name="m", version="2", tags=old))
    assert back.label_sets is None and back.threshold == -3.5


def test_config_names_the_conformal_key_it_refuses():
    base = {"tasks": {"d": {"folder": "t", "labels": {"0": "normal"}}}, "uploads": {"folder": "u"},
            "partitions": {"start_date": "2026-11-01"}}
    assert parse_config(base, base_dir=".").conformal.coverage == 0.9
    with pytest.raises(ConfigError, match=r"conformal\.coverage: Input should be less than 1"):
        parse_config({**base, "conformal": {"coverage": 1.0}}, base_dir=".")
    with pytest.raises(ConfigError, match=r"gate\.coverage_tolerance"):
        parse_config({**base, "gate": {"coverage_tolerance": -0.1}}, base_dir=".")


# -- the review queue, in the warehouse -------------------------------------------------------------------
D1, D2 = dt.date(2026, 11, 1), dt.date(2026, 11, 2)


def _day(day, spec: dict[str, tuple]) -> pd.DataFrame:
    """``spec[id] = (is_ood, ood_score, top1_prob, label_set, error)``, rows of the table."""
    df = rows(day, list(spec))
    df["is_ood"] = [s[0] for s in spec.values()]
    df["ood_score"] = [s[1] for s in spec.values()]
    df["top1_prob"] = [s[2] for s in spec.values()]
    df["label_set"] = [s[3] for s in spec.values()]
    df["label_set_size"] = pd.array([None if s[3] is None else len([x for x in s[3].split("|") if x])
                                     for s in spec.values()], dtype="Int64")
    df["error"] = [s[4] for s in spec.values()]
    return df


def _load(wh, tmp_path, day, df, schema=PREDICTIONS) -> None:
    path = tmp_path / f"{uuid.uuid4().hex[:6]}.parquet"
    with ParquetSpool(schema, path) as spool:
        spool.append(df)
    wh.replace_day(schema, day, [str(path)])


@pytest.fixture(params=["duckdb", pytest.param("bigquery", marks=pytest.mark.bigquery)])
def engine(request, tmp_path):
    """The same queue SQL on DuckDB and on the BigQuery emulator."""
    if request.param == "duckdb":
        return DuckDBWarehouse(tmp_path / "w.duckdb")
    emulator = request.getfixturevalue("emulator")
    bq = BigQueryWarehouse(emulator.project, f"sofar_{uuid.uuid4().hex[:8]}", client=emulator.client(),
                           partition_decorator=False)
    bq.ensure_dataset()
    return bq


def test_review_queue_is_selected_and_ordered_in_the_warehouse(engine, tmp_path):
    wh = engine
    _load(wh, tmp_path, D1, _day(D1, {
        "ood_a": (True, 0.5, 0.40, "dirt|normal", None),
        "ood_b": (True, -1.0, 0.90, "dirt", None),  # the lowest OOD score: first
        "sure": (False, 6.0, 0.97, "dirt", None),  # one label, not OOD: not in the queue
        "empty": (False, 4.0, 0.30, "", None),
        "two": (False, 4.0, 0.50, "dirt|normal", None),
        "three": (False, 4.0, 0.50, "dirt|normal|defect", None),  # same top-1 prob: larger set first
        "broken": (False, None, None, None, "ImageDecodeError: x"),  # error rows are not review material
        "no_rule": (False, 4.0, 0.20, None, None),  # a model without label sets: NULL size
    }))
    _load(wh, tmp_path, D2, _day(D2, {"other_day": (True, -5.0, 0.5, "", None)}))
    queue = review_queue(wh, "predictions", D1)
    assert queue.columns.tolist() == QUEUE_COLUMNS
    assert queue["image_id"].tolist() == ["ood_b", "ood_a", "empty", "three", "two"]
    assert queue["reason"].tolist() == [OOD, OOD, EMPTY_SET, AMBIGUOUS_SET, AMBIGUOUS_SET]
    assert queue.loc[2, "label_set"] == "" and queue.loc[2, "label_set_size"] == 0
    assert review_queue(wh, "predictions", D1, limit=3)["image_id"].tolist() == ["ood_b", "ood_a", "empty"]
    assert review_queue_counts(wh, "predictions", D1) == {OOD: 2, EMPTY_SET: 1, AMBIGUOUS_SET: 2}
    sheet = review_sheet_png(queue, lambda uri: (_ for _ in ()).throw(FileNotFoundError(uri)), title="q")
    assert sheet.startswith(b"\x89PNG")  # photos gone: grey cells, the sheet is still drawn


def test_an_older_predictions_table_gets_the_label_set_columns_on_the_next_write(tmp_path):
    wh = DuckDBWarehouse(tmp_path / "w.duckdb")
    before = {c: t for c, t in PREDICTIONS.columns.items() if not c.startswith("label_set")}
    old = TableSchema("predictions", before, PREDICTIONS.partition_column, PREDICTIONS.clustering)
    _load(wh, tmp_path, D1, _day(D1, {"old_ood": (True, 0.1, 0.5, None, None), "old": (False, 5.0, 0.5, None, None)})
          .drop(columns=["label_set", "label_set_size"]), schema=old)
    _load(wh, tmp_path, D2, _day(D2, {"new": (False, 5.0, 0.5, "dirt|normal", None)}))
    assert wh.table_columns("predictions")["label_set_size"] == "INT64"
    back = wh.read_range("predictions", "prediction_date", D1, D2)
    assert back["label_set"].isna().all() and back["label_set_size"].isna().all()
    assert review_queue(wh, "predictions", D1)["image_id"].tolist() == ["old_ood"]
    assert review_queue(wh, "predictions", D2)["reason"].tolist() == [AMBIGUOUS_SET]


def test_one_grouped_query_answers_the_read_back_the_queue_counts_and_drift(engine, tmp_path):
    """lib/review/run_counts.py: the run's ONE GROUP BY gives what count_range, review_queue_counts
    and two separate GROUP BYs fed to the drift functions give, a photo with a verdict out of the
    queue included."""
    from sofar_assets.lib.review import drift
    from sofar_assets.lib.review.run_counts import run_counts
    from sofar_assets.lib.warehouse import LABEL_CORRECTIONS, PREDICTION_DATE

    wh = engine
    _load(wh, tmp_path, D1, _day(D1, {
        "ood_a": (True, 0.5, 0.40, "dirt|normal", None), "ood_b": (True, -1.0, 0.90, "dirt", None),
        "sure": (False, 6.0, 0.97, "dirt", None), "empty": (False, 4.0, 0.30, "", None),
        "two": (False, 4.0, 0.50, "dirt|normal", None),
        "broken": (False, None, None, None, "ImageDecodeError: x"),
        "no_rule": (False, 4.0, 0.20, None, None),
    }))
    _load(wh, tmp_path, D2, _day(D2, {"other_day": (True, -5.0, 0.5, "", None),
                                      "fine": (False, 6.0, 0.9, "dirt", None)}))
    counts = run_counts(wh, "predictions", [D1, D2])
    assert counts.queue(D1) == {OOD: 2, EMPTY_SET: 1, AMBIGUOUS_SET: 1}
    wh.append_rows(LABEL_CORRECTIONS, pd.DataFrame({
        "image_id": ["ood_a", "other_day"], "image_uri": ["u", "u"], "label": ["dirt", "dirt"],
        "inspector": ["i", "i"], "corrected_at": [pd.Timestamp("2026-11-03")] * 2,
        PREDICTION_DATE: [D1, D1]}))  # other_day's verdict names another day: it stays in D2's queue
    counts = run_counts(wh, "predictions", [D1, D2])
    for day in (D1, D2):
        nxt = day + dt.timedelta(days=1)
        assert counts.rows(day) == wh.count_range("predictions", PREDICTION_DATE, day, nxt)
        assert counts.queue(day) == review_queue_counts(wh, "predictions", day)
    assert counts.rows(D1) == 7 and counts.queue(D1) == {OOD: 1, EMPTY_SET: 1, AMBIGUOUS_SET: 1}
    assert counts.queue(D2) == {OOD: 1, EMPTY_SET: 0, AMBIGUOUS_SET: 0}
    ood, mix = counts.drift()
    start, end = drift.trailing_window(D1)[0], D2 + dt.timedelta(days=1)
    by = {c: wh.count_by("predictions", PREDICTION_DATE, start, end, [PREDICTION_DATE, c], where_null=("error",))
          for c in ("is_ood", "top1_label")}
    assert ood == drift.ood_vs_trailing(by["is_ood"], [D1, D2], PREDICTION_DATE)
    assert mix == drift.label_mix_vs_trailing(by["top1_label"], [D1, D2], PREDICTION_DATE)
    assert set(ood) == {D2} and ood[D2]["ood_rate"] == 0.5
