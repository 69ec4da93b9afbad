"""Training loop, prediction, packages and the MLflow registry round trip.

mlflow is imported inside the tests that need it, so the GPU test also runs where only
torch/timm are installed.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from sofar_assets.lib.models import ModelSpec, build_model
from sofar_assets.lib.training import TrainConfig, predict_logits, resolve_device, train_classifier

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
    cfg = TrainConfig(epochs=3, batch_size=8, freeze_backbone=True, device="cpu")
    res = train_classifier(_spec(), train, val, cfg, log=lines.append, on_epoch=rows.append)

    assert [r["epoch"] for r in res.history] == [1, 2, 3] and rows == res.history
    assert res.history[-1]["train_loss"] < 0.5 * res.history[0]["train_loss"]
    assert res.best_val_macro_f1 == pytest.approx(1.0)
    assert res.best_val_metrics["val_acc"] == pytest.approx(1.0)
    best = max(r["val_macro_f1"] for r in res.history)
    assert res.best_epoch == next(r["epoch"] for r in res.history if r["val_macro_f1"] == best)
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
    res = train_classifier(_spec(), train, val, TrainConfig(epochs=3, batch_size=8, freeze_backbone=True,
                                                            device="cpu"), log=lambda s: None)
    f1s = [r["val_macro_f1"] for r in res.history]
    assert res.best_epoch == 1 and f1s[0] >= max(f1s)
    losses = [r["val_loss"] for r in res.history]
    assert abs(losses[0] - losses[-1]) > 0.1  # the epochs really differ
    assert _val_loss(res.model, val) == pytest.approx(losses[0], abs=1e-4)


def test_pmg_trains_one_epoch_with_backbone_updates():
    train, val = Stripes(16, seed=2), Stripes(8, seed=3)
    res = train_classifier(_spec("pmg"), train, val, TrainConfig(epochs=1, batch_size=8, device="cpu"),
                           log=lambda s: None)
    (row,) = res.history
    assert all(math.isfinite(row[k]) for k in ("train_loss", "train_loss_total", "val_loss", "val_macro_f1"))
    # total = l1 + l2 + l3 + 2 * l_concat, so it exceeds the concat CE alone
    assert row["train_loss_total"] > 2 * row["train_loss"]
    fresh = build_model(_spec("pmg"))
    w = "blocks.5.0.conv_pw.weight"
    assert not torch.equal(res.model.backbone.state_dict()[w], fresh.backbone.state_dict()[w])
    assert predict_logits(res.model, val, device="cpu").shape == (8, 2)


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
    from sofar_assets.lib.packaging import load_package, save_package

    torch.manual_seed(0)
    spec = ModelSpec(num_classes=3, arch="pmg", pretrained=False, image_size=SIZE, pmg_feature_dim=16)
    model = build_model(spec).eval()
    save_package(model, spec, ["normal", "defect", "dirt"], tmp_path / "pkg", extra={"val_macro_f1": 0.5})
    meta = json.loads((tmp_path / "pkg" / "sofar_model.json").read_text())
    assert meta["format"] == "sofar-model/1" and meta["classes"] == ["normal", "defect", "dirt"]
    assert meta["spec"] == spec.to_dict() and meta["extra"] == {"val_macro_f1": 0.5}
    loaded, meta2 = load_package(tmp_path / "pkg")
    assert meta2 == meta and not loaded.training
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(ValueError, match="3 class names|class names"):
        save_package(model, spec, ["a", "b"], tmp_path / "bad")


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

    from sofar_assets.lib.packaging import load_registered, log_and_register

    train, val = Stripes(16, seed=0), Stripes(8, seed=1)
    res = train_classifier(_spec(), train, val, TrainConfig(epochs=1, batch_size=8, freeze_backbone=True,
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

    pyfunc = mlflow.pyfunc.load_model("models:/sofar-clf/1")
    pred = pyfunc.predict(x.numpy())
    assert pred.shape == (4, 2) and np.allclose(pred, want.numpy(), atol=1e-5)

    client.set_registered_model_alias("sofar-clf", "champion", "1")
    champ, _ = load_registered("models:/sofar-clf@champion")
    with torch.no_grad():
        assert torch.allclose(champ(x), want, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_training_agrees_with_cpu_inference():
    train, val = Stripes(32, seed=0), Stripes(16, seed=1)
    for arch in ("linear", "pmg"):
        res = train_classifier(_spec(arch), train, val, TrainConfig(epochs=2, batch_size=8, device="cuda",
                                                                    freeze_backbone=arch == "linear"),
                               log=lambda s: None)
        assert next(res.model.parameters()).device.type == "cuda"
        on_gpu = predict_logits(res.model, val, device="cuda")
        on_cpu = predict_logits(res.model, val, device="cpu")
        assert on_gpu.dtype == np.float32 and on_gpu.shape == (16, 2)
        assert np.abs(on_gpu - on_cpu).max() < 0.5  # bf16 autocast vs fp32
        assert (on_gpu.argmax(1) == on_cpu.argmax(1)).mean() >= 0.9
