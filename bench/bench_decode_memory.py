"""Peak memory of a day of small files with huge rasters: the decode pixel budget at work.

    python bench/bench_decode_memory.py [--links 16] [--side 8900] [--workers 0] [--quick]

A 0.1 MB PNG of 8,900 x 8,900 pixels passes the 80-megapixel limit and needs ~300 MB to decode
and resize; a DataLoader worker decodes up to ``inference.reads_in_flight`` (32) images at once.
This makes a day folder of ``--links`` links to one such PNG and scores it through
``daily.score_days`` (the daily_predictions step's code: threaded reads, decode, a stub model,
rows staged as parquet) in a fresh subprocess, twice: with the decode budget
(``images.DECODE_PIXELS_IN_FLIGHT``) and with the budget lifted (the code before it). Each
run reports the peak RSS of its process tree (the scoring process, and with ``--workers`` its
largest DataLoader worker) and the most decoded pixels the budget saw held at once.

The last line is ``RESULT peak_rss_mib_budget=<a> peak_rss_mib_unbounded=<b> ratio=<b/a>``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(REPO))

DAY = dt.date(2026, 11, 1)
CLASSES = ["a", "b"]


def make_png(path: Path, side: int) -> int:
    """A grey ``side`` x ``side`` PNG with a gradient band: tiny file, huge raster."""
    import numpy as np
    from PIL import Image

    row = (np.arange(side, dtype=np.uint32) * 255 // max(side - 1, 1)).astype(np.uint8)
    Image.fromarray(np.broadcast_to(row, (side, side))).save(path, optimize=True)
    return path.stat().st_size


def child(folder: Path, budget: bool, workers: int, budget_mp: float | None) -> None:
    import pandas as pd
    import torch

    from sofar_assets.lib.data import images
    from sofar_assets.lib.serving import daily
    from sofar_assets.lib.warehouse import PREDICTIONS, ParquetSpool

    if not budget:
        images.DECODE_BUDGET = images.PixelBudget(10**15)  # the budget lifted: every decode at once
    elif budget_mp is not None:
        images.DECODE_BUDGET = images.PixelBudget(int(budget_mp * 1e6))
    net = torch.nn.Sequential(
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, len(CLASSES))
    )
    files = sorted(str(p) for p in folder.iterdir())
    out = folder.parent / f"spool-{budget}.parquet"
    tallies = daily.score_days(
        net,
        [(DAY, ((f"{DAY}/{Path(f).name}", f) for f in files))],
        open_spool=lambda day: ParquetSpool(PREDICTIONS, str(out)),
        columns={"model_name": "stub", "model_version": "1", "predicted_at": pd.Timestamp("2026-11-02")},
        classes=CLASSES,
        image_size=32,
        threshold=0.0,
        batch_size=32,
        num_workers=workers,
        device="cpu",
        max_bytes=50_000_000,
        reads_in_flight=32,
    )
    tally = tallies[DAY]
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest worker (0 without)
    print(
        json.dumps(
            {
                "rows": tally.rows,
                "errors": tally.errors,
                "peak_rss_mib": max(own, kids) / 1024,
                "budget_peak_pixels": images.DECODE_BUDGET.peak if workers == 0 else None,
            }
        )
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--links", type=int, default=16, help="links to the PNG in the day folder")
    ap.add_argument("--side", type=int, default=8900, help="the PNG's width and height in pixels")
    ap.add_argument(
        "--workers", type=int, default=0, help="DataLoader workers (0: decode in the scoring process)"
    )
    ap.add_argument("--budget-mp", type=float, help="decode budget in megapixels (default: the code's)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="4 links to a 3,000 x 3,000 PNG under a 10 MP budget (for the tests)",
    )
    ap.add_argument("--child", nargs=2, metavar=("FOLDER", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(Path(args.child[0]), args.child[1] == "budget", args.workers, args.budget_mp)
        return 0
    if args.quick:
        args.links, args.side, args.budget_mp = 4, 3000, 10.0

    from sofar_assets.lib.data.images import DECODE_PIXELS_IN_FLIGHT

    budget_mp = args.budget_mp if args.budget_mp is not None else DECODE_PIXELS_IN_FLIGHT / 1e6
    with tempfile.TemporaryDirectory(prefix="bench-decode-mem-") as tmp:
        png = Path(tmp) / "huge.png"
        size = make_png(png, args.side)
        day = Path(tmp) / DAY.isoformat()
        day.mkdir()
        for i in range(args.links):
            os.symlink(png, day / f"{i:03d}.png")
        print(
            f"{args.links} links to one {size / 1e3:.0f} KB PNG of {args.side} x {args.side} pixels "
            f"({args.side**2 / 1e6:.1f} MP each); decode budget {budget_mp:.0f} MP "
            f"per process; reads_in_flight 32, workers {args.workers}"
        )
        got = {}
        for mode in ("budget", "unbounded"):
            cmd = [sys.executable, __file__, "--child", str(day), mode, "--workers", str(args.workers)]
            if args.budget_mp is not None:
                cmd += ["--budget-mp", str(args.budget_mp)]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode:
                print(run.stdout + run.stderr, file=sys.stderr)
                return 1
            got[mode] = json.loads(run.stdout.strip().splitlines()[-1])
            g = got[mode]
            assert g["rows"] == args.links and g["errors"] == 0, g
            held = (
                ""
                if g["budget_peak_pixels"] is None
                else f", most pixels held {g['budget_peak_pixels'] / 1e6:.1f} MP"
            )
            print(f"{mode:<10} peak RSS {g['peak_rss_mib']:8.0f} MiB{held}")
    a, b = got["budget"]["peak_rss_mib"], got["unbounded"]["peak_rss_mib"]
    print(f"RESULT peak_rss_mib_budget={a:.0f} peak_rss_mib_unbounded={b:.0f} ratio={b / a:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
