"""Images/s of the naive full decode vs. the draft decode path vs. a warm preprocess cache.

    python bench/bench_decode.py [--samples DIR] [--repeat N] [--size 224] [--quick]

All three paths run in one process on the same in-memory bytes (storage reads are excluded),
in interleaved rounds with the order rotated each round, so machine noise hits them alike.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from sofar_assets.lib.data.images import PreprocessCache, load_image_array, sha256_hex  # noqa: E402

DEFAULT_SAMPLES = next((p / "shared/data/sofar-public-samples" for p in Path(__file__).resolve().parents[2:4]
                        if (p / "shared/data/sofar-public-samples").is_dir()),
                       # a worktree: one level deeper
                       Path(__file__).resolve().parents[2] / "shared/data/sofar-public-samples")


def naive(data: bytes, size: int) -> np.ndarray:
    """What one writes without thinking: full-resolution decode, then resize and crop."""
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BILINEAR)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=Path, default=DEFAULT_SAMPLES, help="folder searched for *.jpg")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds over all photos")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--quick", action="store_true", help="a smoke run: 1 round over 4 photos (no figures)")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeat = 1

    paths = sorted(args.samples.rglob("*.jpg"))[: 4 if args.quick else None]
    if not paths:
        print(f"no *.jpg under {args.samples}", file=sys.stderr)
        return 2
    blobs = [(str(p), p.read_bytes()) for p in paths]
    shas = [sha256_hex(b) for _, b in blobs]
    size = args.size

    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        cache = PreprocessCache(tmp, size)
        for (src, data), sha in zip(blobs, shas, strict=True):
            cache.get(sha, lambda d=data: d, src)  # warm it; the timed gets must all hit

        methods = {
            "a naive full decode": lambda: [naive(d, size) for _, d in blobs],
            "b draft decode path": lambda: [load_image_array(d, s, size) for s, d in blobs],
            "c warm cache get": lambda: [
                cache.get(sha, lambda d=d: d, s) for (s, d), sha in zip(blobs, shas, strict=True)
            ],
        }
        names = list(methods)
        seconds = dict.fromkeys(names, 0.0)
        for r in range(args.repeat):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                t0 = time.perf_counter()
                methods[name]()
                seconds[name] += time.perf_counter() - t0
        hits_expected = len(blobs) * (args.repeat + 1) - len(blobs)
        assert cache.hits == hits_expected and cache.misses == len(blobs), (cache.hits, cache.misses)

        # sanity: the fast path frames the same picture as the naive one
        diffs = [
            np.abs(naive(d, size).astype(np.int16) - load_image_array(d, s, size).astype(np.int16)).mean()
            for s, d in blobs
        ]

    n = len(blobs) * args.repeat
    rate = {k: n / v for k, v in seconds.items()}
    print(f"{len(blobs)} photos from {args.samples}, size {size}, {args.repeat} interleaved rounds")
    print(f"{'path':<22}{'images/s':>10}{'ms/image':>10}{'vs a':>8}")
    for name in names:
        print(f"{name:<22}{rate[name]:>10.1f}{1000 / rate[name]:>10.2f}{rate[name] / rate[names[0]]:>7.1f}x")
    print(f"ratio b/a = {rate[names[1]] / rate[names[0]]:.2f}, c/a = {rate[names[2]] / rate[names[0]]:.1f}")
    print(f"mean |a - b| per pixel: {np.mean(diffs):.2f} (max over photos {np.max(diffs):.2f}) of 255")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
