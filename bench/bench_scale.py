"""A day of many photos through the daily_predictions code path: linear time, flat memory,
latency hidden by reads in flight.

    python bench/bench_scale.py [--days 10000,100000] [--rounds 3] [--latency-images 3000] [--repeats 3] [--quick]

Everything runs through the library functions the asset's steps call, on a DuckDB warehouse:
``daily.score_days`` (one streaming pass: DataLoader workers with ``reads_in_flight`` threaded
reads, decode, model, rows appended to a ``ParquetSpool``), ``daily.commit_day`` (ONE
``replace_day`` + ``COUNT`` read-back) and ``drift.checks_in_warehouse`` (GROUP BY counts). The
uploads are a stream of distinct image ids pointing at a few thousand small synthetic JPEGs
(generated once, reused by every day size), and the network is a stub (a tiny CNN), so the
pipeline is measured, not a backbone.

(1) time per image (the whole path) and peak RSS above baseline of a day of N1 vs N2 images,
    each day in a fresh subprocess after a small warm-up day (imports and pools touched): ratios
    N2/N1 of the medians over ``--rounds`` alternating rounds (targets: time <= 1.1, RSS <= 1.2). RSS is reported per phase: the stream (read ->
    model -> staged parquet, what a shard pod runs; RESULT's rss_ratio) and the local DuckDB
    commit (DuckDB buffers an uncommitted insert up to about one row group of 122,880 rows
    before writing it out, so its peak grows with the day until then; a BigQuery load job runs
    server-side).
(2) end-to-end vs model-only images/s with a simulated 50 ms latency per read, at the default
    ``inference.reads_in_flight``, the medians of ``--repeats`` alternating rounds. The model-only rate is that of the stub plus a simulated
    accelerator time per image (``--model-ms``, sleeping like a GPU-bound step: it leaves the
    CPU to the decode workers), since a tiny CNN on 2 CPU cores is not a GPU. Target >= 0.8.

The last line is ``RESULT time_per_image_ratio=<N2/N1> rss_ratio=<N2/N1> latency_e2e_vs_model=<x>``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from sofar_assets.config import InferenceConfig  # noqa: E402
from sofar_assets.lib import daily, drift, storage  # noqa: E402
from sofar_assets.lib.warehouse import PREDICTIONS, DuckDBWarehouse, ParquetSpool  # noqa: E402

CLASSES = ["dashboard", "defect", "dirt", "normal", "seat"]
DAY = dt.date(2026, 11, 1)
IMAGE_SIZE = 32
READ_LATENCY_S = 0.05


class StubNet(torch.nn.Module):
    """A tiny CNN; ``device_s_per_image`` > 0 adds a simulated accelerator time per batch."""

    def __init__(self, device_s_per_image: float = 0.0):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(), torch.nn.Linear(8, len(CLASSES)),
        )
        self.device_s_per_image = device_s_per_image

    def forward(self, x):
        if self.device_s_per_image:
            time.sleep(self.device_s_per_image * len(x))
        return self.net(x)


def make_photos(folder: Path, n: int) -> list[str]:
    """``n`` distinct small JPEGs (64 x 48, noise over a colour), generated once."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        base = rng.integers(0, 256, 3)
        arr = np.clip(base + rng.normal(0, 40, (48, 64, 3)), 0, 255).astype(np.uint8)
        p = folder / f"{i:05d}.jpg"
        Image.fromarray(arr).save(p, quality=85)
        paths.append(str(p))
    return paths


def uploads(photos: list[str], n: int):
    """A day of ``n`` uploads as a stream (distinct ids, photos reused), as ``day_uploads`` gives."""
    return ((f"{DAY.isoformat()}/{i:07d}.jpg", photos[i % len(photos)]) for i in range(n))


def slow_read(uri: str, **kwargs) -> bytes:
    """An object-store GET: 50 ms of waiting, then the bytes (module level: workers pickle it)."""
    time.sleep(READ_LATENCY_S)
    return storage.read_bytes(uri, **kwargs)


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


def _peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_day(work: Path, photos: list[str], n: int, *, model: torch.nn.Module, read=storage.read_bytes,
            inf: InferenceConfig, memory: bool = False, tag: str = "") -> dict:
    """One day through score_days -> commit_day -> checks_in_warehouse: seconds, and with
    ``memory`` the peak RSS above the RSS at the start of each phase (main process)."""
    wh = DuckDBWarehouse(work / f"w-{n}{tag}.duckdb")
    staging = daily.staging_uri(str(work / "state"), DAY, f"bench-{n}{tag}", 0, 1)
    out: dict = {"n": n}
    base = _rss_kib()
    _reset_peak()
    t0 = time.perf_counter()
    tallies = daily.score_days(
        model, [(DAY, uploads(photos, n))],
        open_spool=lambda day: ParquetSpool(PREDICTIONS, daily.local_spool_path(staging)),
        columns={"model_name": "stub", "model_version": "1", "predicted_at": pd.Timestamp("2026-11-02")},
        classes=CLASSES, image_size=IMAGE_SIZE, threshold=0.0, batch_size=inf.batch_size,
        num_workers=inf.num_workers, device="cpu", read_bytes=read, max_bytes=inf.max_bytes,
        reads_in_flight=inf.reads_in_flight,
    )
    out["score_seconds"] = time.perf_counter() - t0
    if memory:
        out["score_rss_mib"] = (_peak_kib() - base) / 1024
        base = _rss_kib()
        _reset_peak()
    t1 = time.perf_counter()
    facts = daily.commit_day(wh, PREDICTIONS, DAY, [tallies[DAY].as_dict() | {"file": staging}])
    drift.checks_in_warehouse(wh, PREDICTIONS.name, PREDICTIONS.partition_column, [DAY])
    out["commit_seconds"] = time.perf_counter() - t1
    out["seconds"] = time.perf_counter() - t0
    if memory:
        out["commit_rss_mib"] = (_peak_kib() - base) / 1024
    daily.remove_staged([staging])
    assert facts["ok"] and facts["rows"] == n, facts
    return out


def child_day(work: Path, n: int) -> None:
    photos = json.loads((work / "photos.json").read_text())
    inf = InferenceConfig()
    model = StubNet()
    # a small warm-up day first: every import, code path and pool is touched before measuring
    run_day(work, photos, 2 * inf.batch_size * max(inf.num_workers, 1), model=model, inf=inf, tag="-warmup")
    out = run_day(work, photos, n, model=model, inf=inf, memory=True)
    workers_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps(out | {"baseline_mib": _rss_kib() / 1024, "workers_peak_mib": workers_peak / 1024}))


def model_only_rate(model: torch.nn.Module, n: int, batch_size: int) -> float:
    x = torch.rand(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE).contiguous(memory_format=torch.channels_last)
    model.eval()
    with torch.inference_mode():
        model(x)
        t0 = time.perf_counter()
        for _ in range(max(1, n // batch_size)):
            model(x)
    return max(1, n // batch_size) * batch_size / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", default="10000,100000", help="the two day sizes N1,N2")
    ap.add_argument("--photos", type=int, default=2000, help="distinct JPEGs the uploads point at")
    ap.add_argument("--latency-images", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the two day sizes in (1)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating model-only / end-to-end rounds in (2)")
    ap.add_argument("--model-ms", type=float, default=2.0, help="simulated accelerator ms per image in (2)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny days, one round (no figures)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_day(args.work, args.child)
        return 0
    if args.quick:  # a smoke run (make test): seconds, figures meaningless
        args.days, args.latency_images, args.photos, args.rounds, args.repeats = "200,600", 200, 50, 1, 1
    n1, n2 = (int(x) for x in args.days.split(","))
    inf = InferenceConfig()
    print(f"stub CNN at {IMAGE_SIZE} px, CPU, batch {inf.batch_size}, {inf.num_workers} DataLoader workers, "
          f"{inf.reads_in_flight} reads in flight per worker (the config defaults)")
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        (work / "photos").mkdir()
        t0 = time.perf_counter()
        photos = make_photos(work / "photos", args.photos)
        (work / "photos.json").write_text(json.dumps(photos))
        print(f"{len(photos)} synthetic JPEGs generated in {time.perf_counter() - t0:.1f} s")

        # (1) each day size in a fresh process; the sizes alternate ``--rounds`` times and the
        # medians are compared, so a burst of load elsewhere does not land on one size only
        runs: dict[int, list[dict]] = {n1: [], n2: []}
        for _ in range(args.rounds):
            for n in (n1, n2):
                proc = subprocess.run([sys.executable, __file__, "--child", str(n), "--work", str(work)],
                                      capture_output=True, text=True)
                if proc.returncode:
                    sys.stderr.write(proc.stderr[-4000:])
                    return proc.returncode
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                runs[n].append(r)
                print(f"(1) day of {n:>7} images: {r['seconds']:7.1f} s = {1e6 * r['seconds'] / n:6.0f} us/image "
                      f"({n / r['seconds']:.0f} images/s; stream {r['score_seconds']:.1f} s, commit + checks "
                      f"{r['commit_seconds']:.1f} s); peak RSS above baseline: stream +{r['score_rss_mib']:.1f} MiB, "
                      f"DuckDB commit +{r['commit_rss_mib']:.1f} MiB (process {r['baseline_mib']:.0f} MiB, "
                      f"workers peak {r['workers_peak_mib']:.0f} MiB)", flush=True)

        def med(n: int, key: str, floor: float = 0.0) -> float:
            return max(float(np.median([r[key] for r in runs[n]])), floor)

        time_ratio = (med(n2, "seconds") / n2) / (med(n1, "seconds") / n1)
        rss_ratio = med(n2, "score_rss_mib", 1.0) / med(n1, "score_rss_mib", 1.0)  # floor: 1 MiB
        commit_ratio = med(n2, "commit_rss_mib", 1.0) / med(n1, "commit_rss_mib", 1.0)
        print(f"    medians of {args.rounds} rounds: time per image (whole path) {n2}/{n1}: {time_ratio:.3f} "
              f"(target <= 1.1); peak RSS above baseline of the stream {n2}/{n1}: {rss_ratio:.3f} "
              f"(+{med(n2, 'score_rss_mib'):.1f} / +{med(n1, 'score_rss_mib'):.1f} MiB; target <= 1.2); of the "
              f"local DuckDB commit: {commit_ratio:.3f} (DuckDB's insert buffer, not the stream's; BigQuery loads "
              "server-side)")

        # (2) latency hidden by reads in flight
        # model-only and end-to-end alternate, ``--repeats`` times: a burst of load elsewhere hits
        # both sides of the ratio instead of one (the medians are compared)
        model = StubNet(device_s_per_image=args.model_ms / 1000)
        model_rates, e2e_rates = [], []
        for _ in range(args.repeats):
            model_rates.append(model_only_rate(model, args.latency_images, inf.batch_size))
            r = run_day(work, photos, args.latency_images, model=model, read=slow_read, inf=inf)
            e2e_rates.append(args.latency_images / r["score_seconds"])  # first read to last row staged
        model_rate, e2e_rate = float(np.median(model_rates)), float(np.median(e2e_rates))
        latency_ratio = e2e_rate / model_rate
        print(f"(2) {args.latency_images} images, {1000 * READ_LATENCY_S:.0f} ms per read, {args.repeats} "
              f"alternating rounds: end-to-end {', '.join(f'{x:.0f}' for x in e2e_rates)} images/s vs "
              f"model-only {', '.join(f'{x:.0f}' for x in model_rates)} images/s (stub + {args.model_ms} "
              f"ms/image simulated accelerator); medians {e2e_rate:.0f} / {model_rate:.0f} = {latency_ratio:.3f} "
              "(target >= 0.8)")
    print(f"RESULT time_per_image_ratio={time_ratio:.3f} rss_ratio={rss_ratio:.3f} "
          f"latency_e2e_vs_model={latency_ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
