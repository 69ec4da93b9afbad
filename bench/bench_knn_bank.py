"""The kNN OOD score with a capped bank (``ood.knn_bank_max``) vs the full bank: AUROC, and the
device search vs numpy.

    python bench/bench_knn_bank.py [--size 64] [--caps 0.5,0.25,0.1] [--seeds 5] [--quick]

Two data sets, each: in-distribution photos split 70/30 (seed 0) into the bank (the "training"
features) and held-out ID photos; the kNN score (k = ``ood.knn_k``, default 1) of the held-out
ID photos against the OOD images gives the AUROC, with the full bank and with the bank cut to
each fraction in ``--caps`` by ``ood.reduce_bank`` (greedy k-center ``coreset``, and a
``random`` subset: the median over ``--seeds`` seeds). Since an AUROC of 1.0 cannot move,
the Spearman correlation of all the photos' scores with the full bank's is printed beside it.
Features: efficientnet_lite0's pooled features with the offline ImageNet weights (frozen, no
fine-tuning) at ``--size`` px.

- **the 20 shared photos** (../shared/data/sofar-public-samples; ID), against scikit-image's
  page and text images and 10 synthetic documents (OOD), as bench_recipe.py;
- **the demo** (SYNTHETIC, ``lib/data/synthetic.generate_demo_data``: 326 task photos; OOD: its
  documents and receipts).

It also checks that ``ood.DeviceKnn`` (torch, on the inference device) gives the numpy scores.
The last line is ``RESULT knn_auroc_full_demo=<x> knn_auroc_coreset_demo=<x> ... `` (at the
first cap).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from sofar_assets.lib.data import storage, synthetic  # noqa: E402
from sofar_assets.lib.data.images import load_image_array, resize_center_crop  # noqa: E402
from sofar_assets.lib.model import ood  # noqa: E402
from sofar_assets.lib.model.models import ModelSpec, build_model  # noqa: E402

SAMPLES = next((p / "shared/data/sofar-public-samples" for p in Path(__file__).resolve().parents[2:4]
                if (p / "shared/data/sofar-public-samples").is_dir()),
               Path(__file__).resolve().parents[2] / "shared/data/sofar-public-samples")  # a worktree: one deeper


def features(arrays: list[np.ndarray], size: int, batch: int = 32) -> np.ndarray:
    """Frozen efficientnet_lite0 features (offline ImageNet weights) of HWC uint8 arrays."""
    torch.manual_seed(0)
    model = build_model(ModelSpec(num_classes=2, image_size=size)).eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(arrays), batch):
            x = torch.from_numpy(np.stack(arrays[i:i + batch])).permute(0, 3, 1, 2).float().div_(255)
            out.append(model.forward_features(x)[1].float().numpy())
    return np.concatenate(out)


def photos(folder: Path, size: int, limit: int | None = None) -> list[np.ndarray]:
    exts = (".jpg", ".jpeg", ".png")
    files = sorted(f for f in storage.iter_files(str(folder), recursive=True) if f.lower().endswith(exts))[:limit]
    return [load_image_array(storage.read_bytes(f), f, size) for f in files]


def shared_photos(size: int, n_docs: int = 10) -> tuple[list, list] | None:
    if not SAMPLES.is_dir():
        return None
    from PIL import Image
    from skimage import data

    ood_imgs = [resize_center_crop(Image.fromarray(img).convert("RGB"), size) for img in (data.page(), data.text())]
    ood_imgs += [resize_center_crop(synthetic.document(random.Random(1000 + i)), size) for i in range(n_docs)]
    return photos(SAMPLES, size), ood_imgs


def demo_photos(size: int, tmp: Path, limit: int | None = None) -> tuple[list, list]:
    synthetic.generate_demo_data(tmp / "demo")
    return photos(tmp / "demo" / "tasks", size, limit), photos(tmp / "demo" / "ood", size)


def compare(id_feats: np.ndarray, ood_feats: np.ndarray, caps: list[float], seeds: int, k: int = 1) -> dict:
    """AUROC of the held-out ID vs OOD with the full bank and each capped bank."""
    rng = np.random.default_rng(0)
    order = rng.permutation(len(id_feats))
    n_bank = int(round(0.7 * len(id_feats)))
    bank = ood.fit_feature_stats(id_feats[order[:n_bank]], np.zeros(n_bank, dtype=int))["knn_bank"]
    test = id_feats[order[n_bank:]]

    both = np.concatenate([test, ood_feats])
    full_scores = ood.knn_score(both, bank, k)

    def auroc(b: np.ndarray) -> float:
        return ood.auroc(ood.knn_score(test, b, k), ood.knn_score(ood_feats, b, k))

    def rank_corr(b: np.ndarray) -> float:  # how much of the full bank's ordering of the photos survives
        return float(spearmanr(full_scores, ood.knn_score(both, b, k)).statistic)

    out = {"bank": len(bank), "test_id": len(test), "ood": len(ood_feats), "full": auroc(bank), "caps": {}}
    for frac in caps:
        m = max(1, int(round(frac * len(bank))))
        core = ood.reduce_bank(bank, m, "coreset")
        rand = [ood.reduce_bank(bank, m, "random", seed=s) for s in range(seeds)]
        out["caps"][frac] = {
            "rows": m, "coreset": auroc(core), "random": float(np.median([auroc(b) for b in rand])),
            "coreset_rank": rank_corr(core), "random_rank": float(np.median([rank_corr(b) for b in rand])),
        }
    # the device search gives the numpy scores
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out["device_max_abs_diff"] = float(np.abs(
        ood.DeviceKnn(bank, dev, bank_rows=max(1, len(bank) // 3)).score(both, k) - ood.knn_score(both, bank, k)).max())
    out["device"] = dev
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64, help="image size of the features (the demo config's)")
    ap.add_argument("--caps", default="0.5,0.25,0.1", help="bank caps as fractions of the full bank")
    ap.add_argument("--seeds", type=int, default=5, help="random subsets per cap (median AUROC)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 80 demo photos, 2 seeds (no figures)")
    args = ap.parse_args(argv)
    caps = [float(c) for c in args.caps.split(",")]
    limit = None
    if args.quick:
        args.seeds, limit = 2, 80
    t0 = time.perf_counter()
    sets = {}
    with tempfile.TemporaryDirectory(prefix="bench-knn-") as tmp:
        shared = shared_photos(args.size)
        if shared is not None and not args.quick:
            sets["shared"] = shared
        sets["demo"] = demo_photos(args.size, Path(tmp), limit)
    results = {}
    for name, (id_imgs, ood_imgs) in sets.items():
        feats = features(id_imgs + ood_imgs, args.size)
        results[name] = r = compare(feats[:len(id_imgs)], feats[len(id_imgs):], caps, args.seeds)
        print(f"{name}: bank {r['bank']} ID photos, held-out ID {r['test_id']}, OOD {r['ood']}; kNN AUROC "
              f"full bank {r['full']:.4f}; device ({r['device']}) vs numpy scores: max |diff| "
              f"{r['device_max_abs_diff']:.2e}")
        for frac, c in r["caps"].items():
            print(f"    cap {frac:>5.0%} ({c['rows']:>4} rows): coreset {c['coreset']:.4f} "
                  f"({c['coreset'] - r['full']:+.4f}), random (median of {args.seeds}) {c['random']:.4f} "
                  f"({c['random'] - r['full']:+.4f}); Spearman of the scores vs the full bank's: coreset "
                  f"{c['coreset_rank']:.3f}, random {c['random_rank']:.3f}")
    print(f"({time.perf_counter() - t0:.0f} s, frozen efficientnet_lite0 features at {args.size} px, k=1)")
    first = caps[0]
    print("RESULT " + " ".join(
        f"knn_auroc_full_{n}={r['full']:.4f} knn_auroc_coreset_{n}={r['caps'][first]['coreset']:.4f} "
        f"knn_auroc_random_{n}={r['caps'][first]['random']:.4f}" for n, r in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
