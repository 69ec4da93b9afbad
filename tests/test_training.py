"""Training loop, prediction, packages and the MLflow registry round trip.

mlflow is imported inside the tests that need it, so the GPU test also runs where only
torch/timm are installed.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from sofar_assets.lib.model.models import ModelSpec, build_model
from sofar_assets.lib.model.training import (
    Augmented,
    TrainConfig,
    better,
    predict_logits,
    resolve_device,
    train_classifier,
)

SIZE = 64


class Stripes(Dataset):
    """Two clearly separable classes: horizontal (0) vs vertical (1) sine stripes, uint8 CHW.

    Random period, phase and pixel noise per image; ImageNet features separate the two
    orientations easily, which keeps the runs short.
    """

    def __init__(self, n: int, seed: int, flip_labels: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.labels = [i % 2 for i in range(n)]
        coord = torch.arange(SIZE).float()
        images = []
        for y in self.labels:
            period = 1.5 + torch.rand(1, generator=g).item()
            phase = torch.rand(1, generator=g).item() * 6.28
            wave = torch.sin(coord / period + phase)
            plane = wave.view(-1, 1).expand(SIZE, SIZE) if y == 0 else wave.view(1, -1).expand(SIZE, SIZE)
            img = plane.expand(3, -1, -1) * 80 + 128 + torch.randn(3, SIZE, SIZE, generator=g) * 20
            images.append(img.clamp(0, 255).to(torch.uint8))
        self.images = torch.stack(images)
        if flip_labels:
            self.labels = [1 - y for y in self.labels]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


# the plain SGD loop without the recipe's LP step, augmentation and early stopping
SGD_ONLY = {"linear_probe": False, "augment": False, "patience": None}
# no CutMix / mixup: what these tests trained with before the one TrainConfig took the config's defaults
NO_MIX = {"mixup": 0.0, "cutmix": 0.0}


def _spec(arch: str = "linear") -> ModelSpec:
    return ModelSpec(num_classes=2, arch=arch, pretrained=True, image_size=SIZE, pmg_feature_dim=32)


def _val_loss(model, ds) -> float:
    logits = predict_logits(model, ds, device="cpu")
    return F.cross_entropy(torch.from_numpy(logits), torch.tensor(ds.labels)).item()


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA"):
            resolve_device("cuda")


def test_frozen_linear_probe_learns_and_keeps_backbone_untouched():
    train, val = Stripes(32, seed=0), Stripes(16, seed=1)
    lines, rows = [], []
    cfg = TrainConfig(**NO_MIX, epochs=3, batch_size=8, freeze_backbone=True, device="cpu", **SGD_ONLY)
    res = train_classifier(_spec(), train, val, cfg, log=lines.append, on_epoch=rows.append)

    assert [r["epoch"] for r in res.history] == [1, 2, 3] and rows == res.history
    assert res.history[-1]["train_loss"] < 0.5 * res.history[0]["train_loss"]
    assert res.best_val_macro_f1 == pytest.approx(1.0)
    assert res.best_val_metrics["val_acc"] == pytest.approx(1.0)
    best = max(r["val_macro_f1"] for r in res.history)
    assert res.best_epoch == min((r for r in res.history if r["val_macro_f1"] == best),
                                 key=lambda r: r["val_loss"])["epoch"]
    assert res.images_per_s > 0 and 0.0 <= res.data_wait_share < 1.0
    # cosine schedule: epoch 2 starts at lr/2*(1+cos(pi/3)) = 0.75*lr
    assert res.history[1]["lr"] == pytest.approx(0.75 * cfg.lr)
    assert len(lines) == 3 and all("val_macro_f1" in s and "ETA" in s and "img/s" in s for s in lines)

    # frozen means frozen: weights AND BatchNorm running statistics equal the offline weights
    fresh = build_model(_spec())
    for (k, v), (k2, v2) in zip(res.model.backbone.state_dict().items(), fresh.backbone.state_dict().items(),
                                strict=True):
        assert k == k2 and torch.equal(v, v2), k
    assert not res.model.training


def test_best_epoch_weights_are_restored_not_the_last():
    # Validation labels are the opposite of training labels: the better the model learns, the
    # worse its val macro-F1, so the best epoch is the first one and must be what comes back.
    train, val = Stripes(32, seed=0), Stripes(16, seed=1, flip_labels=True)
    res = train_classifier(_spec(), train, val, TrainConfig(**NO_MIX, epochs=3, batch_size=8, freeze_backbone=True,
                                                            device="cpu", **SGD_ONLY), log=lambda s: None)
    f1s = [r["val_macro_f1"] for r in res.history]
    assert res.best_epoch == 1 and f1s[0] >= max(f1s)
    losses = [r["val_loss"] for r in res.history]
    assert abs(losses[0] - losses[-1]) > 0.1  # the epochs really differ
    assert _val_loss(res.model, val) == pytest.approx(losses[0], abs=1e-4)


def test_pmg_trains_one_epoch_with_backbone_updates():
    train, val = Stripes(16, seed=2), Stripes(8, seed=3)
    res = train_classifier(_spec("pmg"), train, val,
                           TrainConfig(**NO_MIX, epochs=1, batch_size=8, device="cpu", **SGD_ONLY),
                           log=lambda s: None)
    (row,) = res.history
    assert all(math.isfinite(row[k]) for k in ("train_loss", "train_loss_total", "val_loss", "val_macro_f1"))
    # total = l1 + l2 + l3 + 2 * l_concat, so it exceeds the concat CE alone
    assert row["train_loss_total"] > 2 * row["train_loss"]
    fresh = build_model(_spec("pmg"))
    w = "blocks.5.0.conv_pw.weight"
    assert not torch.equal(res.model.backbone.state_dict()[w], fresh.backbone.state_dict()[w])
    assert predict_logits(res.model, val, device="cpu").shape == (8, 2)


def test_better_prefers_f1_then_lower_val_loss():
    best = {"val_macro_f1": 1.0, "val_loss": 0.5}
    assert better({"val_macro_f1": 1.0, "val_loss": 0.4}, best)
    assert not better({"val_macro_f1": 1.0, "val_loss": 0.6}, best)
    assert better({"val_macro_f1": 0.9 + 0.1, "val_loss": 0.49}, best)  # float noise still ties
    assert not better({"val_macro_f1": 0.9, "val_loss": 0.01}, best)
    assert not better({"val_macro_f1": math.nan, "val_loss": 0.01}, best)
    assert better({"val_macro_f1": 0.1, "val_loss": 9.0}, {"val_macro_f1": math.nan, "val_loss": 0.1})
    assert better({"val_macro_f1": 0.1, "val_loss": 9.0}, None)


def test_val_macro_f1_ties_are_broken_by_val_loss():
    # Both classes are learnt at once, so val macro-F1 is 1.0 at every epoch while val loss
    # keeps falling: the kept epoch must be the lowest-loss one, not the first F1 = 1.0.
    train, val = Stripes(32, seed=0), Stripes(16, seed=1)
    res = train_classifier(_spec(), train, val, TrainConfig(**NO_MIX, epochs=4, batch_size=8, freeze_backbone=True,
                                                            device="cpu", **SGD_ONLY), log=lambda s: None)
    f1s = [r["val_macro_f1"] for r in res.history]
    losses = [r["val_loss"] for r in res.history]
    assert f1s == [1.0] * 4, f1s
    assert res.best_epoch == 1 + int(np.argmin(losses)) > 1
    assert _val_loss(res.model, val) == pytest.approx(min(losses), abs=1e-4)


def test_lp_ft_starts_from_the_logistic_regression_probe_then_fine_tunes():
    from sofar_assets.lib.model import probe

    train, val = Stripes(24, seed=0), Stripes(8, seed=1)
    rows = []
    cfg = TrainConfig(**NO_MIX, epochs=2, batch_size=8, device="cpu", patience=None)
    res = train_classifier(_spec(), train, val, cfg, log=lambda s: None, on_epoch=rows.append)
    assert [(r["epoch"], r["phase"]) for r in res.history] == [(0, "lp"), (1, "ft"), (2, "ft")]
    assert res.history[0]["val_acc"] == 1.0  # the probe alone already separates the stripes
    # epoch 0's head IS the sklearn probe on the pretrained features
    fresh = build_model(_spec()).eval()
    with torch.no_grad():
        feats = fresh.backbone(fresh.normalize(train.images.float() / 255)).numpy()
    lp = probe.fit_probe(feats, train.labels, 2, c=cfg.probe_c)
    np.testing.assert_allclose(res.train_features if res.best_epoch == 0 else feats, feats, atol=1e-4)
    want_loss = F.cross_entropy(torch.from_numpy(lp.logits(feats)), torch.tensor(train.labels)).item()
    assert res.history[0]["train_loss"] == pytest.approx(want_loss, rel=1e-3)
    # fine-tuning moved the backbone weights, but not its BatchNorm statistics
    if res.best_epoch > 0:
        sd, ref = res.model.backbone.state_dict(), fresh.backbone.state_dict()
        assert not torch.equal(sd["blocks.5.0.conv_pw.weight"], ref["blocks.5.0.conv_pw.weight"])
        assert torch.equal(sd["bn1.running_mean"], ref["bn1.running_mean"])
    assert res.train_features.shape == (24, 1280) and list(res.train_labels) == train.labels


def test_patience_stops_fine_tuning_when_val_stops_improving():
    # flipped val labels: every fine-tuning epoch only gets worse on val
    train, val = Stripes(16, seed=0), Stripes(8, seed=1, flip_labels=True)
    res = train_classifier(_spec(), train, val,
                           TrainConfig(**NO_MIX, epochs=10, batch_size=8, device="cpu", patience=2),
                           log=lambda s: None)
    assert [r["phase"] for r in res.history] == ["lp", "ft", "ft"]
    assert res.best_epoch == 0


def test_augmentation_is_random_but_reproducible_and_keeps_uint8():
    ds = Augmented(Stripes(2, seed=0), SIZE)
    torch.manual_seed(3)
    a = ds[0][0]
    torch.manual_seed(3)
    b = ds[0][0]
    assert a.dtype == torch.uint8 and a.shape == (3, SIZE, SIZE)
    assert torch.equal(a, b) and not torch.equal(a, ds.ds[0][0])


def test_predict_logits_keeps_dataset_order():
    torch.manual_seed(0)
    model = build_model(ModelSpec(num_classes=3, backbone="resnet10t", pretrained=False, image_size=SIZE)).eval()
    ds = Stripes(5, seed=4)
    got = predict_logits(model, ds, batch_size=2, device="cpu")
    with torch.no_grad():
        want = torch.cat([model(ds[i][0][None].float() / 255) for i in range(5)]).numpy()
    assert got.dtype == np.float32 and got.shape == (5, 3)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_package_round_trip(tmp_path):
    from sofar_assets.lib.serving.packaging import load_package, save_package

    torch.manual_seed(0)
    spec = ModelSpec(num_classes=3, arch="pmg", pretrained=False, image_size=SIZE, pmg_feature_dim=16)
    model = build_model(spec).eval()
    save_package(model, spec, ["normal", "defect", "dirt"], tmp_path / "pkg", extra={"val_macro_f1": 0.5})
    meta = json.loads((tmp_path / "pkg" / "sofar_model.json").read_text())
    assert meta["format"] == "sofar-model/1" and meta["classes"] == ["normal", "defect", "dirt"]
    assert meta["spec"] == spec.to_dict() and meta["extra"] == {"val_macro_f1": 0.5}
    loaded, meta2 = load_package(tmp_path / "pkg")
    onnx_model = meta2.pop("onnx_model")
    assert meta2 == {**meta, "ood_stats": {}, "calibration": None} and not loaded.training
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        ref_logits, ref_feats = model.forward_features(x)
    # the package's ONNX export (PMG here) gives the same logits and features on ONNX Runtime
    from sofar_assets.lib.serving.predictor import OnnxRunner

    logits, feats = OnnxRunner(onnx_model)(torch.from_numpy((x.numpy() * 255).round().astype(np.uint8))
                                           .permute(0, 2, 3, 1), features=True)
    with torch.no_grad():
        want, want_f = model.forward_features(torch.from_numpy((x.numpy() * 255).round() / 255).float())
    np.testing.assert_allclose(logits, want.numpy(), atol=1e-4)
    np.testing.assert_allclose(feats, want_f.numpy(), atol=1e-4)
    assert ref_logits.shape == want.shape and ref_feats.shape == want_f.shape
    with pytest.raises(ValueError, match="3 class names|class names"):
        save_package(model, spec, ["a", "b"], tmp_path / "bad")


def test_package_carries_the_feature_score_statistics(tmp_path):
    from sofar_assets.lib.model import ood
    from sofar_assets.lib.serving.packaging import OOD_STATS_FILE, load_package, save_package

    spec = ModelSpec(num_classes=2, backbone="resnet10t", pretrained=False, image_size=SIZE)
    model = build_model(spec).eval()
    rng = np.random.default_rng(0)
    stats = ood.fit_feature_stats(rng.normal(size=(12, 8)), [0, 1] * 6)
    save_package(model, spec, ["a", "b"], tmp_path / "pkg", extra={"ood_knn_k": 2}, ood_stats=stats)
    assert (tmp_path / "pkg" / OOD_STATS_FILE).is_file()
    _, meta = load_package(tmp_path / "pkg")
    assert set(meta["ood_stats"]) == {"knn_bank", "maha_means", "maha_precision"}
    for k, v in stats.items():
        np.testing.assert_array_equal(meta["ood_stats"][k], v)
    f = rng.normal(size=(3, 8))
    np.testing.assert_allclose(ood.package_score(np.zeros((3, 2)), f, "knn", 1.0, meta),
                               ood.knn_score(f, stats["knn_bank"], k=2))


@pytest.fixture
def mlflow_sqlite(tmp_path):
    import mlflow

    old_tracking, old_registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    exp_id = mlflow.create_experiment("sofar-test", artifact_location=str(tmp_path / "artifacts"))
    yield exp_id
    if mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(old_tracking)
    mlflow.set_registry_uri(old_registry)


def test_mlflow_register_and_load_round_trip(mlflow_sqlite, tmp_path):
    import mlflow

    from sofar_assets.lib.serving.packaging import load_registered, log_and_register

    train, val = Stripes(16, seed=0), Stripes(8, seed=1)
    res = train_classifier(_spec(), train, val, TrainConfig(**NO_MIX, epochs=1, batch_size=8, freeze_backbone=True,
                                                            device="cpu"), log=lambda s: None)
    model = res.model.eval()
    with pytest.raises(RuntimeError, match="active mlflow run"):
        log_and_register(model, _spec(), ["horizontal", "vertical"], "sofar-clf")
    with mlflow.start_run(experiment_id=mlflow_sqlite) as run:
        out = log_and_register(model, _spec(), ["horizontal", "vertical"], "sofar-clf",
                               extra={"best_epoch": res.best_epoch}, tags={"arch": "linear", "val_macro_f1": 1.0})
    assert out == {"model_uri": "models:/sofar-clf/1", "version": 1, "run_id": run.info.run_id}
    client = mlflow.MlflowClient()
    mv = client.get_model_version("sofar-clf", "1")
    assert mv.tags == {"arch": "linear", "val_macro_f1": "1.0"}

    x = torch.rand(4, 3, SIZE, SIZE)
    with torch.no_grad():
        want = model.cpu()(x)
    loaded, meta = load_registered("models:/sofar-clf/1")
    assert meta["classes"] == ["horizontal", "vertical"] and meta["extra"] == {"best_epoch": res.best_epoch}
    assert meta["spec"]["arch"] == "linear"
    with torch.no_grad():
        assert torch.allclose(loaded(x), want, atol=1e-5)

    # the served pyfunc: photo bytes in, the prediction rows out, once the version is calibrated
    from sofar_assets.lib.serving import registry
    from sofar_assets.lib.serving.inference import predict_frame

    with pytest.raises(Exception, match="no calibration.json"):
        mlflow.pyfunc.load_model("models:/sofar-clf/1")
    registry.write_calibration(client, "sofar-clf", "1", registry.Calibration("max_logit", 1.5, 0.0))
    photos = []
    for i in range(4):
        buf = io.BytesIO()
        Image.fromarray(val[i][0].permute(1, 2, 0).numpy()).save(buf, format="PNG")
        photos.append(buf.getvalue())
    pyfunc = mlflow.pyfunc.load_model("models:/sofar-clf/1", model_config={"runtime": "torch"})
    rows = pyfunc.predict(pd.DataFrame({"image": photos, "image_id": list("abcd")}))
    files = [tmp_path / f"{k}.png" for k in "abcd"]
    for f, b in zip(files, photos, strict=True):
        f.write_bytes(b)
    daily = predict_frame(model, [(k, str(f)) for k, f in zip("abcd", files, strict=True)],
                          classes=["horizontal", "vertical"],
                          image_size=SIZE, threshold=0.0, temperature=1.5, num_workers=0, device="cpu")
    assert list(rows["image_id"]) == list("abcd") and set(rows["model_version"]) == {"1"}
    assert list(rows["top1_label"]) == list(daily["top1_label"])
    np.testing.assert_allclose(rows["top1_prob"].astype(float), daily["top1_prob"], atol=1e-6)
    np.testing.assert_allclose(rows["ood_score"].astype(float), daily["ood_score"], atol=1e-6)

    client.set_registered_model_alias("sofar-clf", "champion", "1")
    champ, _ = load_registered("models:/sofar-clf@champion")
    with torch.no_grad():
        assert torch.allclose(champ(x), want, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_training_agrees_with_cpu_inference():
    train, val = Stripes(32, seed=0), Stripes(16, seed=1)
    for arch in ("linear", "pmg"):
        res = train_classifier(_spec(arch), train, val, TrainConfig(**NO_MIX, epochs=2, batch_size=8, device="cuda",
                                                                    freeze_backbone=arch == "linear"),
                               log=lambda s: None)
        assert next(res.model.parameters()).device.type == "cuda"
        on_gpu = predict_logits(res.model, val, device="cuda")
        on_cpu = predict_logits(res.model, val, device="cpu")
        assert on_gpu.dtype == np.float32 and on_gpu.shape == (16, 2)
        assert np.abs(on_gpu - on_cpu).max() < 0.5  # bf16 autocast vs fp32
        assert (on_gpu.argmax(1) == on_cpu.argmax(1)).mean() >= 0.9


def test_batch_mixer_cutmix_and_mixup_give_targets_matching_the_pixels():
    from sofar_assets.lib.model.training import BatchMixer

    x = torch.stack([torch.full((3, 32, 32), float(v)) for v in (0.0, 1.0, 2.0)])  # odd batch: timm's Mixup refuses
    y = torch.tensor([0, 1, 2])
    xc, tc = BatchMixer(3, cutmix=1.0, seed=0)(x, y)
    # image 0 took a box from image 2 (the batch reversed): its target shares = the pixel shares
    share = (xc[0, 0] == 2.0).float().mean().item()
    assert 0 < share < 1 and tc[0, 2].item() == pytest.approx(share) and tc[0, 0].item() == pytest.approx(1 - share)
    assert torch.allclose(tc.sum(1), torch.ones(3)) and torch.equal(xc[1], x[1])  # the middle one mixes with itself
    xm, tm = BatchMixer(3, mixup=0.4, seed=1)(x, y)
    lam = tm[0, 0].item()
    assert 0 < lam < 1 and torch.allclose(xm[0], x[0] * lam + x[2] * (1 - lam))
    assert torch.equal(BatchMixer(3)(x, y)[1], y) and not BatchMixer(3).active  # alphas 0: off, labels untouched
    with pytest.raises(ValueError, match="mix_prob"):
        BatchMixer(3, mixup=0.2, prob=1.5)


@pytest.mark.parametrize("arch", ["linear", "pmg"])
def test_mixed_sample_training_changes_the_training_not_the_interfaces(arch):
    train, val = Stripes(12, seed=4), Stripes(6, seed=5)
    runs = {}
    for name, mix in {"plain": NO_MIX, "mixed": {"mixup": 0.4, "cutmix": 1.0}}.items():
        cfg = TrainConfig(epochs=1, batch_size=6, device="cpu", **SGD_ONLY, **mix)
        runs[name] = train_classifier(_spec(arch), train, val, cfg, log=lambda s: None)
    # soft targets make the training loss differ from the plain run's, same seed, same batches
    assert runs["mixed"].history[-1]["train_loss"] != pytest.approx(runs["plain"].history[-1]["train_loss"], abs=1e-4)
    assert math.isfinite(runs["mixed"].history[-1]["val_loss"])
    assert predict_logits(runs["mixed"].model, val, device="cpu").shape == (6, 2)
