"""predict_images: per-image errors, top-2 and OOD columns, identical across workers and batch sizes."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from sofar_assets.lib.data.images import load_image_array
from sofar_assets.lib.model import ood
from sofar_assets.lib.serving.inference import PREDICTION_COLUMNS, predict_frame, predict_images

CLASSES = ["red", "green", "blue"]
SCALE = 5.0


class MeanColour(torch.nn.Module):
    """logits = SCALE * mean RGB in [0, 1]: a solid colour image has hand-computable outputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.float32 and x.shape[1] == 3 and float(x.max()) <= 1.0
        return SCALE * x.mean(dim=(2, 3))


def solid(path, rgb, size=(40, 30)):
    Image.new("RGB", size, rgb).save(path)
    return str(path)


@pytest.fixture()
def items(tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is no jpeg")
    return [
        ("r", solid(tmp_path / "r.png", (255, 0, 0))),
        ("missing", str(tmp_path / "nope.jpg")),
        ("g", solid(tmp_path / "g.png", (0, 255, 0))),
        ("grey", solid(tmp_path / "grey.png", (102, 102, 102))),
        ("corrupt", str(corrupt)),
        ("b2", solid(tmp_path / "b2.png", (0, 102, 255))),
    ]


def run(items, **kw):
    args = dict(classes=CLASSES, image_size=16, threshold=3.0, num_workers=0, batch_size=4)
    return predict_frame(MeanColour(), items, **(args | kw))


def test_rows_labels_and_errors(items):
    df = run(items)
    assert df.columns.tolist() == list(PREDICTION_COLUMNS)
    assert df["image_id"].tolist() == ["r", "missing", "g", "grey", "corrupt", "b2"]

    r = df.set_index("image_id")
    e5 = math.exp(SCALE)
    assert r.loc["r", "top1_label"] == "red"
    assert r.loc["r", "top1_prob"] == pytest.approx(e5 / (e5 + 2))
    assert r.loc["r", "top2_label"] == "green"  # tie between green and blue: lower index first
    assert r.loc["r", "top2_prob"] == pytest.approx(1 / (e5 + 2))
    assert r.loc["r", "ood_score"] == pytest.approx(SCALE)
    assert not r.loc["r", "is_ood"]
    assert r.loc["g", "top1_label"] == "green"
    # grey: all logits 2.0 -> uniform, max logit 2.0 < threshold 3.0 -> OOD
    assert r.loc["grey", "top1_prob"] == pytest.approx(1 / 3)
    assert r.loc["grey", "ood_score"] == pytest.approx(SCALE * 102 / 255)
    assert r.loc["grey", "is_ood"]
    # (0, 102, 255): blue first, green second with logits 5.0 and 2.0
    assert (r.loc["b2", "top1_label"], r.loc["b2", "top2_label"]) == ("blue", "green")
    assert r.loc["b2", "top2_prob"] == pytest.approx(math.exp(2) / (math.exp(5) + math.exp(2) + 1))

    assert r.loc["missing", "error"] == f"ImageReadError: {items[1][1]}: file not found"
    assert r.loc["corrupt", "error"].startswith(f"ImageDecodeError: {items[4][1]}: ")
    for bad in ("missing", "corrupt"):
        assert r.loc[bad, "top1_label"] is None and r.loc[bad, "top2_label"] is None
        assert np.isnan(r.loc[bad, "top1_prob"]) and np.isnan(r.loc[bad, "ood_score"])
        assert not r.loc[bad, "is_ood"]
    good = df[df["error"].isna()]
    assert len(good) == 4
    assert (good["top1_prob"] >= good["top2_prob"]).all()
    assert (good["top1_prob"] + good["top2_prob"] <= 1 + 1e-12).all()
    assert (good["is_ood"] == (good["ood_score"] < 3.0)).all()
    assert df["is_ood"].dtype == bool


def test_label_sets_beside_the_top2_and_null_on_error_rows(items):
    from sofar_assets.lib.model.conformal import LabelSets

    df = run(items, label_sets=LabelSets("lac", 0.9, 0.96, 500)).set_index("image_id")  # keep p >= 0.04
    # r: (0.987, 0.007, 0.007); b2: blue 0.947, green 0.047; grey: uniform thirds
    assert (df.loc["r", "label_set"], df.loc["r", "label_set_size"]) == ("red", 1)
    assert (df.loc["b2", "label_set"], df.loc["b2", "label_set_size"]) == ("blue|green", 2)
    assert (df.loc["grey", "label_set"], df.loc["grey", "label_set_size"]) == ("red|green|blue", 3)
    for bad in ("missing", "corrupt"):
        assert df.loc[bad, "label_set"] is None and pd.isna(df.loc[bad, "label_set_size"])
    strict = run(items, label_sets=LabelSets("lac", 0.9, 0.5, 500)).set_index("image_id")  # keep p >= 0.5
    assert (strict.loc["grey", "label_set"], strict.loc["grey", "label_set_size"]) == ("", 0)
    assert strict.loc["b2", "label_set"] == "blue"
    # without a rule (a model calibrated before label sets): NULL on every row
    assert run(items)["label_set"].isna().all() and run(items)["label_set_size"].isna().all()


def test_same_result_for_workers_and_batch_sizes(items):
    base = run(items, batch_size=4, num_workers=0)
    for kw in (dict(batch_size=1, num_workers=0), dict(batch_size=3, num_workers=2), dict(batch_size=32)):
        pd.testing.assert_frame_equal(run(items, **kw), base, check_exact=False, rtol=1e-6)


def test_batches_stream_in_order_and_log_progress(items):
    lines = []
    frames = list(
        predict_images(
            MeanColour(), items, classes=CLASSES, image_size=16, threshold=3.0,
            batch_size=4, num_workers=0, log=lines.append, log_every=4, total=6,
        )
    )  # fmt: skip
    assert [len(f) for f in frames] == [4, 2]
    assert lines[0].startswith("predicted 4/6 images (67%)")
    assert lines[-1].startswith("predicted 6/6 images (100%)") and lines[-1].endswith("2 errors")


def test_too_large_all_bad_batch_and_empty(items, tmp_path):
    df = run(items[:1], max_bytes=10)
    size = len(open(items[0][1], "rb").read())
    too_large = f"ImageReadError: {items[0][1]}: too large: {size} bytes > max_bytes=10"
    assert df["error"].tolist() == [too_large]
    # a custom reader that does not bound itself is checked after reading
    df = run(items[:1], max_bytes=10, read_bytes=lambda uri: open(uri, "rb").read())
    assert df["error"].tolist() == [too_large]
    assert run([items[1], items[4]])["error"].notna().all()
    empty = run([])
    assert empty.empty and empty.columns.tolist() == list(PREDICTION_COLUMNS)


def test_temperature_and_score_method(items):
    df = run(items[:1], temperature=2.0, score_method="energy", threshold=10.0)
    logits = np.array([[SCALE, 0.0, 0.0]])
    assert df["top1_prob"].item() == pytest.approx(ood.softmax(logits, 2.0)[0, 0])
    assert df["ood_score"].item() == pytest.approx(ood.scores(logits, "energy", 2.0)[0])
    assert df["is_ood"].item()
    with pytest.raises(ValueError, match=r"logits of shape \(1, 3\) for 1 images, but there are 4 classes"):
        run(items[:1], classes=["a", "b", "c", "d"])


def test_real_photos(samples, tmp_path):
    paths = sorted(str(p) for p in samples.rglob("*.jpg"))
    assert len(paths) >= 20
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(open(paths[0], "rb").read()[:20_000])
    items = [(f"img{i}", p) for i, p in enumerate(paths)] + [("cut", str(truncated))]
    df = run(items, image_size=64, batch_size=8, num_workers=2)
    assert len(df) == len(paths) + 1 and df["error"].iloc[:-1].isna().all()
    assert df["error"].iloc[-1].startswith(f"ImageDecodeError: {truncated}: truncated or corrupt")
    # the same preprocess by hand: logits are SCALE * the mean colour of the 64 x 64 input
    for p, (_, row) in zip(paths[:3], df.iterrows(), strict=False):
        arr = load_image_array(open(p, "rb").read(), p, 64)
        logits = SCALE * arr.reshape(-1, 3).astype(np.float64).mean(0)[None] / 255
        probs = ood.softmax(logits)[0]
        assert row["top1_label"] == CLASSES[int(np.argmax(probs))]
        assert row["top1_prob"] == pytest.approx(probs.max(), rel=1e-5)
        assert row["ood_score"] == pytest.approx(logits.max(), rel=1e-5)


@pytest.mark.gpu
def test_cuda_matches_cpu(items):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pd.testing.assert_frame_equal(
        run(items, device="cuda", num_workers=2), run(items), check_exact=False, rtol=1e-5
    )


@pytest.mark.parametrize("method", ["knn", "mahalanobis"])
def test_feature_scores_serve_what_the_calibration_scored(tmp_path, method):
    """A package calibrated with a feature score: predict_images scores with forward_features and
    the package's ood_stats, equal to the calibration's score of the same images."""
    from sofar_assets.lib.model import calibration, evaluation
    from sofar_assets.lib.model.models import ModelSpec, build_model
    from sofar_assets.lib.model.training import predict_logits_and_features
    from sofar_assets.lib.serving.packaging import load_package, save_package

    torch.manual_seed(0)
    # timm's tiny test network: the real SofarNet and package code, 256 features instead of 1280
    spec = ModelSpec(num_classes=3, backbone="test_efficientnet", image_size=32, pretrained=False)
    rng = np.random.default_rng(0)

    def photo(name, k):  # noisy images around one colour per class
        base = np.eye(3)[k % 3] * 160 + 40
        pix = np.clip(base + rng.normal(0, 50, (30, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pix).save(tmp_path / name)
        return str(tmp_path / name)

    train = [photo(f"t{i}.png", i) for i in range(12)]
    val = [photo(f"v{i}.png", i) for i in range(9)]
    arrays = {p: load_image_array(open(p, "rb").read(), p, 32) for p in train + val}
    model = build_model(spec).eval()
    _, f = predict_logits_and_features(model, evaluation.ArrayDataset([arrays[p] for p in train], [0] * 12), device="cpu")
    save_package(model, spec, CLASSES, tmp_path / "pkg", extra={"ood_knn_k": 2},
                 ood_stats=ood.fit_feature_stats(f, np.arange(12) % 3))
    served, meta = load_package(tmp_path / "pkg")
    val_y = np.arange(9) % 3
    lg, vf = predict_logits_and_features(served, evaluation.ArrayDataset([arrays[p] for p in val], val_y), device="cpu")
    rep = calibration.calibrate(lg, val_y, vf, meta["ood_stats"], {}, score_method=method, target_tpr=0.6,
                                knn_k=ood.package_knn_k(meta))
    kw = dict(classes=CLASSES, image_size=32, threshold=rep["threshold"], score_method=method,
              temperature=rep["temperature"], num_workers=0, batch_size=4)
    df = predict_frame(served, [(p, p) for p in val], ood_stats=meta["ood_stats"], knn_k=ood.package_knn_k(meta), **kw)
    np.testing.assert_allclose(df["ood_score"], rep["val_scores"], rtol=1e-5, atol=1e-6)
    assert (df["is_ood"] == (df["ood_score"] < rep["threshold"])).all()
    assert df["is_ood"].any() and not df["is_ood"].all()  # the threshold cuts through these scores
    with pytest.raises(ValueError, match=rf"OOD score '{method}' needs the model package's feature statistics"):
        predict_frame(served, [(val[0], val[0])], ood_stats={}, **kw)
    with pytest.raises(ValueError, match="MeanColour has no forward_features"):
        predict_frame(MeanColour(), [(val[0], val[0])], ood_stats=meta["ood_stats"], **kw)


def test_each_row_carries_its_items_day_through_the_model(items):
    """An item's day rides through the DataLoader into its own row (``prediction_date``), also in a
    batch that straddles two days and for error rows; an item without a day gets a NULL day."""
    import datetime as dt

    from sofar_assets.lib.serving.inference import as_item

    d1, d2 = dt.date(2026, 11, 1), dt.date(2026, 11, 2)
    dated = [as_item(x, d1 if k < 3 else d2) for k, x in enumerate(items)]  # batch 1 holds both days
    frames = list(predict_images(MeanColour(), dated, classes=CLASSES, image_size=16, threshold=3.0,
                                 num_workers=2, batch_size=4))
    assert [f["prediction_date"].tolist() for f in frames] == [[d1, d1, d1, d2], [d2, d2]]
    assert [i for f in frames for i in f["image_id"]] == [x[0] for x in items]
    assert run(items)["prediction_date"].isna().all()
