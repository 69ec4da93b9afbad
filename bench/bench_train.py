"""Training throughput (images/s) of the `linear` and `pmg` heads and their data-wait share.

    python bench/bench_train.py [--steps 6] [--warmup 2] [--batch 16] [--size 224] [--workers 0] [--quick]

EfficientNet-Lite0 with the offline ImageNet weights, fed exactly like training: a DataLoader
over images.ImageDataset reading the real sample photos through a warm PreprocessCache (the
photo list is repeated to fill the steps). One "step" is training.train_step on a batch:
forward + backward + optimizer step for `linear`, PMG's four progressive steps for `pmg`.
The data-wait share is the time blocked in the DataLoader over total step time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from sofar_assets.lib.data.images import ImageDataset, PreprocessCache, sha256_hex  # noqa: E402
from sofar_assets.lib.model.models import ModelSpec, build_model  # noqa: E402
from sofar_assets.lib.model.training import (  # noqa: E402
    TrainConfig,
    make_optimizer,
    resolve_device,
    to_input,
    train_step,
)

DEFAULT_SAMPLES = next((p / "shared/data/sofar-public-samples" for p in Path(__file__).resolve().parents[2:4]
                        if (p / "shared/data/sofar-public-samples").is_dir()),
                       # a worktree: one level deeper
                       Path(__file__).resolve().parents[2] / "shared/data/sofar-public-samples")


def measure(arch: str, ds: ImageDataset, num_classes: int, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    spec = ModelSpec(num_classes=num_classes, arch=arch, pretrained=True, image_size=args.size)
    model = build_model(spec).to(device, memory_format=torch.channels_last).train()
    opt = make_optimizer(model, TrainConfig())
    jig = torch.Generator().manual_seed(1)
    loader = DataLoader(ds, batch_size=args.batch, shuffle=False, drop_last=True, num_workers=args.workers,
                        pin_memory=device.type == "cuda")
    it = iter(loader)
    wait = total = 0.0
    images = 0
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        xb, yb = next(it)
        t1 = time.perf_counter()
        train_step(model, opt, to_input(xb, device), yb.to(device).long(), jig, device)
        t2 = time.perf_counter()
        if step >= args.warmup:
            wait += t1 - t0
            total += t2 - t0
            images += xb.shape[0]
    return {"arch": arch, "images": images, "seconds": total, "images_per_s": images / total,
            "data_wait_share": wait / total}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=Path, default=DEFAULT_SAMPLES, help="folder searched for *.jpg")
    ap.add_argument("--steps", type=int, default=6, help="measured steps per head")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    ap.add_argument("--archs", default="linear,pmg")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 1 step of batch 2 at 64 px per head")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.batch, args.size = 1, 0, 2, 64

    paths = sorted(args.samples.rglob("*.jpg"))
    if not paths:
        print(f"no *.jpg under {args.samples}", file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    folders = sorted({p.parent.name for p in paths})
    n_needed = (args.warmup + args.steps) * args.batch
    reps = -(-n_needed // len(paths))
    uris = [str(p) for p in paths] * reps
    labels = [folders.index(p.parent.name) for p in paths] * reps
    shas = [sha256_hex(p.read_bytes()) for p in paths] * reps

    with tempfile.TemporaryDirectory(prefix="bench-train-cache-") as tmp:
        cache = PreprocessCache(tmp, args.size)
        for uri, sha in zip(uris[: len(paths)], shas[: len(paths)], strict=True):
            cache.get(sha, lambda u=uri: Path(u).read_bytes(), uri)  # warm: timed reads all hit
        ds = ImageDataset(uris, labels, args.size, cache=cache, sha256s=shas)
        rows = [measure(a, ds, len(folders), args, device) for a in args.archs.split(",")]

    print(f"training throughput, efficientnet_lite0 (offline ImageNet weights) {args.size}px, batch {args.batch}, "
          f"{args.steps} measured steps after {args.warmup} warm-up, device {device}, "
          f"torch threads {torch.get_num_threads()}, DataLoader workers {args.workers}, "
          f"{len(paths)} real photos via warm PreprocessCache")
    print(f"{'head':<8} {'images':>7} {'seconds':>8} {'images/s':>9} {'data wait':>10}")
    for r in rows:
        print(f"{r['arch']:<8} {r['images']:>7d} {r['seconds']:>8.2f} {r['images_per_s']:>9.2f} "
              f"{r['data_wait_share']:>10.1%}")
    if len(rows) == 2:
        a, b = rows
        print(f"{a['arch']} / {b['arch']} throughput ratio: {a['images_per_s'] / b['images_per_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
