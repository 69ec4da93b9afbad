"""Decode memory is bounded by pixels in flight: a day of small files with huge rasters decodes
within the per-process budget (the peak RSS is a benchmark figure: bench/bench_decode_memory.py)."""

from __future__ import annotations

import datetime as dt
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from sofar_assets.lib.data import images
from sofar_assets.lib.data.images import PixelBudget
from sofar_assets.lib.serving import daily
from sofar_assets.lib.warehouse import PREDICTIONS, ParquetSpool


def _png(side: int) -> bytes:
    buf = io.BytesIO()
    row = np.arange(side, dtype=np.uint32) % 256
    Image.fromarray(np.broadcast_to(row.astype(np.uint8), (side, side))).save(buf, "PNG")
    return buf.getvalue()


def test_decoded_pixels_reads_only_the_header_and_counts_the_jpeg_draft():
    png = _png(1500)
    assert len(png) < 100_000 and images.decoded_pixels(png, 224) == 1500 * 1500
    buf = io.BytesIO()
    Image.new("RGB", (4000, 3000), (9, 9, 9)).save(buf, "JPEG")
    assert images.decoded_pixels(buf.getvalue(), 224) == 500 * 375  # 1/8 scale still covers 224
    assert images.decoded_pixels(buf.getvalue()) == 4000 * 3000
    assert images.decoded_pixels(b"not an image") == 0  # the decode names it; nothing reserved


def test_the_budget_holds_at_most_its_pixels_and_a_big_one_runs_alone():
    budget = PixelBudget(100)
    live, peak, lock = [0], [0], threading.Lock()

    def work(n: int) -> None:
        with budget.hold(n) as got:
            with lock:
                live[0] += got
                peak[0] = max(peak[0], live[0])
            time.sleep(0.002)
            with lock:
                live[0] -= got

    sizes = [30, 500, 40, 60, 10, 100, 70] * 6  # 500: larger than the whole budget
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(work, sizes))
    assert peak[0] <= 100 and budget.peak <= 100 and budget.in_use == 0


def test_a_day_of_huge_pngs_decodes_within_the_budget(tmp_path, monkeypatch):
    """The daily scoring path (score_days: 32 reads in flight per worker) over a day of small PNGs
    with big rasters: the full-size rasters alive at once never exceed the budget."""
    side = 1500  # 2.25 MP each; the budget below admits one at a time
    day = dt.date(2026, 11, 1)
    folder = tmp_path / day.isoformat()
    folder.mkdir()
    png = folder / "0.png"
    png.write_bytes(_png(side))
    for i in range(1, 12):
        (folder / f"{i}.png").symlink_to(png)
    monkeypatch.setattr(images, "DECODE_BUDGET", PixelBudget(3_000_000))
    live, peak, lock = [0], [0], threading.Lock()
    real_decode, real_resize = images.decode_image, images.resize_center_crop

    def decode(*a, **kw):  # a full-size raster now exists ...
        img = real_decode(*a, **kw)
        with lock:
            live[0] += img.size[0] * img.size[1]
            peak[0] = max(peak[0], live[0])
        return img

    def resize(img, size):  # ... until it is resized and dropped
        try:
            return real_resize(img, size)
        finally:
            with lock:
                live[0] -= img.size[0] * img.size[1]

    monkeypatch.setattr(images, "decode_image", decode)
    monkeypatch.setattr(images, "resize_center_crop", resize)
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 2))

    tallies = daily.score_days(
        net,
        [(day, ((f"{day}/{p.name}", str(p)) for p in sorted(folder.iterdir())))],
        open_spool=lambda d: ParquetSpool(PREDICTIONS, str(tmp_path / "spool.parquet")),
        columns={"model_name": "stub", "model_version": "1", "predicted_at": pd.Timestamp("2026-11-02")},
        classes=["a", "b"],
        image_size=32,
        threshold=0.0,
        batch_size=32,
        num_workers=0,
        device="cpu",
        max_bytes=50_000_000,
        reads_in_flight=32,
    )

    assert tallies[day].rows == 12 and tallies[day].errors == 0
    assert 0 < peak[0] <= 3_000_000, f"{peak[0] / 1e6:.1f} MP of full-size rasters alive at once"


def test_the_decode_memory_benchmark_runs_in_quick_mode(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_decode_memory

    assert bench_decode_memory.main(["--quick"]) == 0
    assert "RESULT peak_rss_mib_budget=" in capsys.readouterr().out
