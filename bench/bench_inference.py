"""Daily inference: end-to-end vs model-only throughput, one pass vs T task passes, memory vs N.

    python bench/bench_inference.py [--images 500] [--quick]

Measured in one run on this machine:

(a) end-to-end images/s of ``predict_images`` over the real sample photos repeated to
    ``--images`` items (full read + decode + preprocess in DataLoader workers + model);
(b) model-only images/s of the same network on pre-decoded batches of the same size -> a/b;
(c) the efficiency-centric system (ONE pass, one head over all tasks' classes) vs the
    task-centric one (T passes over the same photos, one binary model per task) -> time ratio;
(d) peak RSS of the path ``daily_predictions``' shard steps run (``daily.score_days``: the
    stream of ``predict_images`` batches staged into a ``ParquetSpool``, no frame kept) over
    1,000 vs 10,000 synthetic images (64 distinct 640x480 JPEGs behind distinct ids, 96 px, a
    tiny CNN), each count in a fresh subprocess -> ratio. ``bench_scale.py`` measures the same
    path at 10k / 100k / 1M uploads.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from sofar_assets.lib.data.images import load_image_array  # noqa: E402
from sofar_assets.lib.serving.inference import predict_images  # noqa: E402

DEFAULT_SAMPLES = next((p / "shared/data/sofar-public-samples" for p in Path(__file__).resolve().parents[2:4]
                        if (p / "shared/data/sofar-public-samples").is_dir()),
                       # a worktree: one level deeper
                       Path(__file__).resolve().parents[2] / "shared/data/sofar-public-samples")


def tiny_cnn(num_classes: int) -> torch.nn.Module:
    """A few-kFLOP network: (d) measures the streaming machinery's memory, not a backbone's."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, num_classes),
    )


def run_predict(model, items, classes, *, image_size, batch_size, num_workers) -> tuple[float, int, int]:
    """Seconds, rows and error rows of one full predict_images pass (frames kept: at most --images)."""
    t0 = time.perf_counter()
    frames = list(
        predict_images(
            model, items, classes=classes, image_size=image_size, threshold=0.0,
            batch_size=batch_size, num_workers=num_workers, device="cpu",
        )
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    return seconds, sum(len(f) for f in frames), sum(int(f["error"].notna().sum()) for f in frames)


def model_only(model, batch: torch.Tensor, n_images: int) -> float:
    """Images/s of forward passes on an already decoded uint8 batch (same conversion as predict)."""
    reps = max(1, round(n_images / len(batch)))
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _ in range(reps):
            x = batch.permute(0, 3, 1, 2).float().div_(255)
            model(x)
    return reps * len(batch) / (time.perf_counter() - t0)


def make_synthetic_jpegs(folder: Path, n: int = 64) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        # smooth colour fields + noise: JPEG sizes like a photo's (~60-100 kB), not a flat colour's
        yy, xx = np.mgrid[0:480, 0:640]
        base = rng.uniform(0, 255, 3)[None, None] + 60 * np.sin(
            xx[..., None] / rng.uniform(20, 90) + rng.uniform(0, 6, 3)
        )
        img = np.clip(base + rng.normal(0, 18, (480, 640, 3)), 0, 255).astype(np.uint8)
        p = folder / f"s{i:02d}.jpg"
        Image.fromarray(img).save(p, quality=90)
        paths.append(str(p))
    return paths


def rss_child(n: int, folder: str, num_workers: int) -> None:
    """Run in a fresh process: n synthetic images through ``daily.score_days`` into a parquet
    spool (what a ``score_shard`` step runs), print peak RSS of self and of workers."""
    import datetime as dt

    import pandas as pd

    from sofar_assets.lib.serving import daily
    from sofar_assets.lib.warehouse import PREDICTIONS, ParquetSpool

    paths = sorted(str(p) for p in Path(folder).glob("*.jpg"))
    items = ((f"id{i:06d}", paths[i % len(paths)]) for i in range(n))  # a stream, as a manifest slice gives
    day = dt.date(2026, 11, 1)
    spool = Path(folder) / f"spool-{n}.parquet"
    t0 = time.perf_counter()
    tallies = daily.score_days(
        tiny_cnn(4), [(day, items)], open_spool=lambda d: ParquetSpool(PREDICTIONS, str(spool)),
        columns={"model_name": "tiny", "model_version": "1", "predicted_at": pd.Timestamp("2026-11-02")},
        classes=["a", "b", "c", "d"], image_size=96, threshold=0.0, batch_size=64, num_workers=num_workers,
        device="cpu",
    )
    seconds = time.perf_counter() - t0
    tally = tallies.get(day, daily.DayTally())
    rows, errors = tally.staged_rows, tally.errors
    spool.unlink(missing_ok=True)
    status = Path("/proc/self/status").read_text()
    hwm_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
    workers_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # largest finished worker
    print(
        json.dumps(
            {
                "n": n,
                "rows": rows,
                "errors": errors,
                "seconds": seconds,
                "main_kib": hwm_kib,
                "worker_kib": workers_kib,
            }
        )
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=500, help="items for (a)-(c): the sample photos repeated")
    ap.add_argument("--samples", type=Path, default=DEFAULT_SAMPLES, help="folder searched for *.jpg")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=2, help="T: task-centric passes (binary heads)")
    ap.add_argument("--rss-counts", default="1000,10000", help="image counts for (d)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 8 images at 96 px, (d) at 100 vs 300")
    ap.add_argument("--rss-child", nargs=2, metavar=("N", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.rss_child:
        rss_child(int(args.rss_child[0]), args.rss_child[1], args.num_workers)
        return 0
    if args.quick:
        args.images, args.rss_counts, args.image_size, args.batch_size = 8, "100,300", 96, 4

    from sofar_assets.lib.model.models import ModelSpec, build_model

    paths = sorted(str(p) for p in args.samples.rglob("*.jpg"))
    if not paths:
        print(f"no *.jpg under {args.samples}", file=sys.stderr)
        return 2
    items = [(f"img{i:05d}", paths[i % len(paths)]) for i in range(args.images)]
    size, bs, nw, T = args.image_size, args.batch_size, args.num_workers, args.tasks
    print(f"machine: {torch.get_num_threads()} torch threads, {len(paths)} photos -> {len(items)} items, "
          f"{size} px, batch {bs}, {nw} workers, efficientnet_lite0 (untrained weights: same FLOPs)")  # fmt: skip

    # efficiency-centric: one head over the T tasks' 2 classes each; task-centric: T binary models
    classes = [f"task{t}/{c}" for t in range(T) for c in ("normal", "positive")]
    model = build_model(ModelSpec(num_classes=len(classes), pretrained=False, image_size=size)).eval()
    model = model.to(memory_format=torch.channels_last)
    batch = torch.from_numpy(
        np.stack([load_image_array(Path(p).read_bytes(), p, size) for p in (paths * bs)[:bs]])
    )
    model_only(model, batch, bs)  # warm-up: first-call allocations and kernel selection

    secs_a, rows, errors = run_predict(model, items, classes, image_size=size, batch_size=bs, num_workers=nw)
    assert rows == len(items) and errors == 0, (rows, errors)
    ips_a = len(items) / secs_a
    ips_b = model_only(model, batch, len(items))
    print(f"(a) end-to-end predict_images: {len(items)} images in {secs_a:.1f} s = {ips_a:.1f} images/s")
    print(f"(b) model-only forward on pre-decoded batches: {ips_b:.1f} images/s")
    print(f"    a/b = {ips_a / ips_b:.2f}  (share of the model's speed that survives read + decode)")

    task_secs = []
    for t in range(T):
        binary = build_model(ModelSpec(num_classes=2, pretrained=False, image_size=size)).eval()
        s, rows, _ = run_predict(binary, items, [f"task{t}/normal", f"task{t}/positive"], image_size=size,
                                 batch_size=bs, num_workers=nw)  # fmt: skip
        assert rows == len(items)
        task_secs.append(s)
    print(f"(c) efficiency-centric, 1 pass ({len(classes)} classes): {secs_a:.1f} s; "
          f"task-centric, {T} passes (binary heads): {sum(task_secs):.1f} s "
          f"({', '.join(f'{s:.1f}' for s in task_secs)})")  # fmt: skip
    print(f"    task-centric / efficiency-centric time = {sum(task_secs) / secs_a:.2f}")

    counts = [int(c) for c in args.rss_counts.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        make_synthetic_jpegs(Path(tmp))
        results = {}
        for n in [0, *counts]:  # 0: the imports alone (torch is ~600 MiB of RSS by itself)
            out = subprocess.run(
                [sys.executable, __file__, "--rss-child", str(n), tmp, "--num-workers", str(nw)],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            r = json.loads(out.stdout.strip().splitlines()[-1])
            assert r["rows"] == n and r["errors"] == 0, r
            results[n] = r
            if n == 0:
                print(f"(d) baseline (imports, no images): peak RSS {r['main_kib'] / 1024:.0f} MiB")
                continue
            grown = (r["main_kib"] - results[0]["main_kib"]) / 1024
            print(f"(d) {n} synthetic 640x480 JPEGs at 96 px, tiny CNN, score_days -> parquet spool: "
                  f"{r['seconds']:.1f} s, peak RSS main "
                  f"{r['main_kib'] / 1024:.0f} MiB (+{grown:.0f} over baseline), "
                  f"largest worker {r['worker_kib'] / 1024:.0f} MiB")  # fmt: skip
    lo, hi = results[counts[0]], results[counts[-1]]
    base = results[0]["main_kib"]
    print(f"    peak RSS ratio {counts[-1]} / {counts[0]} images: main {hi['main_kib'] / lo['main_kib']:.2f}, "
          f"main above baseline {(hi['main_kib'] - base) / max(lo['main_kib'] - base, 1):.2f}, "
          f"main + largest worker "
          f"{(hi['main_kib'] + hi['worker_kib']) / (lo['main_kib'] + lo['worker_kib']):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
