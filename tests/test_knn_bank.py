"""The kNN OOD score on the inference device (torch, batched) and its bounded bank."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sofar_assets.lib.model import ood

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _bank_and_queries(seed=0, n=700, d=48):
    rng = np.random.default_rng(seed)
    bank = _unit(rng.standard_normal((n, d))).astype(np.float32)
    queries = np.concatenate([
        rng.standard_normal((40, d)) * 3,  # anywhere
        bank[:10].astype(np.float64),  # photos that are in the bank
        bank[10:20] + 1e-5 * rng.standard_normal((10, d)),  # near-duplicates: sqrt(2 - 2 a.b) is ill-conditioned
    ])
    return bank, queries


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 3, 50])
@pytest.mark.parametrize("bank_rows", [64, 10_000])
def test_device_knn_gives_the_numpy_scores(device, k, bank_rows):
    bank, q = _bank_and_queries()
    want = ood.knn_score(q, bank, k)
    got = ood.DeviceKnn(bank, device, bank_rows=bank_rows).score(torch.as_tensor(q, dtype=torch.float32), k)
    np.testing.assert_allclose(got, ood.knn_score(q.astype(np.float32), bank, k), atol=1e-5, rtol=0)
    np.testing.assert_allclose(ood.DeviceKnn(bank, device, bank_rows=bank_rows).score(q, k), want, atol=1e-5, rtol=0)


def test_knn_score_is_the_distance_to_the_kth_nearest_row():
    """Today's formula, sqrt(2 - 2 a.b) on a float32 product, is kept where it is well-conditioned
    (1e-5) and replaced by the exact distance where it is not (a photo that is in the bank)."""
    bank, q = _bank_and_queries()
    qn = _unit(q)
    exact = np.sort(np.linalg.norm(qn[:, None, :] - bank[None].astype(np.float64), axis=2), axis=1)
    for k in (1, 3):
        got = ood.knn_score(q, bank, k)
        np.testing.assert_allclose(got, -exact[:, k - 1], atol=1e-6)
        old = -np.sqrt(np.clip(2 - 2 * np.sort((qn.astype(np.float32) @ bank.T).astype(np.float64), axis=1)[:, -k],
                               0, None))
        np.testing.assert_allclose(got[:40], old[:40], atol=1e-5)  # the well-conditioned queries: as before
    assert np.abs(ood.knn_score(q[40:50], bank, 1)).max() < 1e-7  # in the bank: distance ~0 (was up to ~5e-4)


def test_predict_images_scores_knn_on_the_device_with_the_same_scores(tmp_path, monkeypatch):
    from PIL import Image

    from sofar_assets.lib.serving.inference import predict_frame

    class Net(torch.nn.Module):
        def forward_features(self, x):
            f = torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)
            return f[:, :3] * 5, f

        def forward(self, x):
            return self.forward_features(x)[0]

    rng = np.random.default_rng(1)
    items = []
    for i in range(12):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(p)
        items.append((f"img{i}", str(p)))
    bank = _unit(rng.standard_normal((30, 6))).astype(np.float32)
    used = []
    real = ood.DeviceKnn.score

    def spy(self, features, k=1):
        used.append(type(features))
        return real(self, features, k)

    monkeypatch.setattr(ood.DeviceKnn, "score", spy)
    df = predict_frame(Net(), items, classes=["a", "b", "c"], image_size=16, threshold=-0.5, score_method="knn",
                       ood_stats={"knn_bank": bank}, knn_k=2, batch_size=5, num_workers=0, device="cpu")
    assert used == [torch.Tensor] * 3  # every batch searched on the device, from the features tensor
    feats = []
    for _, p in items:
        x = torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
        feats.append(Net().forward_features(x)[1][0].numpy())
    np.testing.assert_allclose(df["ood_score"].to_numpy(), ood.knn_score(np.stack(feats), bank, 2), atol=1e-5)


def test_reduce_bank_keeps_at_most_the_cap_of_the_banks_rows():
    bank, _ = _bank_and_queries(n=300)
    for method in ood.BANK_REDUCTIONS:
        small = ood.reduce_bank(bank, 50, method)
        assert small.shape == (50, bank.shape[1]) and small.dtype == bank.dtype
        rows = {r.tobytes() for r in bank}
        assert all(r.tobytes() in rows for r in small) and len({r.tobytes() for r in small}) == 50
        np.testing.assert_array_equal(small, ood.reduce_bank(bank, 50, method))  # deterministic
    assert ood.reduce_bank(bank, 1000) is bank or np.array_equal(ood.reduce_bank(bank, 1000), bank)
    with pytest.raises(ValueError, match="unknown kNN bank reduction"):
        ood.reduce_bank(bank, 5, "pca")
    stats = ood.fit_feature_stats(np.random.default_rng(0).standard_normal((80, 8)), np.arange(80) % 2,
                                  knn_bank_max=20)
    assert stats["knn_bank"].shape == (20, 8)


def test_the_coreset_covers_every_cluster():
    """Greedy k-center keeps one row of each of 8 tight clusters of very different sizes; a random
    subset of the same size misses the small ones."""
    rng = np.random.default_rng(0)
    centres = _unit(rng.standard_normal((8, 32)))
    sizes = [500, 200, 50, 10, 5, 3, 2, 1]
    bank = _unit(np.concatenate([c + 0.01 * rng.standard_normal((n, 32)) for c, n in zip(centres, sizes,
                                                                                        strict=True)])).astype(np.float32)
    covered = lambda b: len({int(np.argmax(centres @ r)) for r in b})  # noqa: E731
    assert covered(ood.reduce_bank(bank, 8, "coreset")) == 8
    assert covered(ood.reduce_bank(bank, 8, "random")) < 8


def test_a_capped_bank_keeps_the_auroc_on_the_demo(tmp_path):
    """On the demo (SYNTHETIC) photos with frozen efficientnet_lite0 features: the bank cut to 25%
    by the coreset keeps the kNN AUROC (held-out ID vs the demo's OOD sets) within 0.01 of the full
    bank's (bench/bench_knn_bank.py reports both data sets at 50 / 25 / 10%)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_knn_bank as bench

    id_imgs, ood_imgs = bench.demo_photos(64, tmp_path)
    feats = bench.features(id_imgs + ood_imgs, 64)
    r = bench.compare(feats[:len(id_imgs)], feats[len(id_imgs):], [0.25], seeds=1)
    assert r["bank"] > 200 and r["caps"][0.25]["rows"] < 60
    assert abs(r["caps"][0.25]["coreset"] - r["full"]) <= 0.01
    assert r["device_max_abs_diff"] <= 1e-5
