"""A day of many photos through the daily_predictions code path: linear time, flat memory,
latency hidden by reads in flight, a day of a million uploads listed once and sharded.

    python bench/bench_scale.py [--days 10000,100000] [--big 1000000] [--rounds 3]
                                [--latency-images 3000] [--repeats 3] [--quick]

Everything runs through the library functions the asset's steps call, on a DuckDB warehouse:
the listing (``iter_table_uploads`` over the uploads table's pages -> ``manifest.write_manifest``,
what ``plan_shards`` runs), the shards (``manifest.pack`` with the config's
``inference.images_per_shard`` / ``max_shards``), the first shard's slice
(``manifest.read_slice``) through ``daily.score_days`` (one streaming pass: DataLoader workers
with ``reads_in_flight`` threaded reads, decode, model, rows appended to a ``ParquetSpool``,
what a ``score_shard`` pod runs), then what ``commit_days`` runs: ``daily.write_day`` (ONE
``replace_day``) and ``run_counts`` (ONE grouped query: read-back, queue and drift counts),
``daily.read_back``. The uploads are distinct image
ids pointing at a few thousand small synthetic JPEGs (generated once, reused by every day
size), and the network is a stub (a tiny CNN), so the pipeline is measured, not a backbone.

(1) time per image (the whole path) and peak RSS above baseline of a day of N1 vs N2 uploads,
    each day's listing and its shard in two fresh subprocesses, as ``plan_shards`` and
    ``score_shard`` run (processes of their own locally, pods of their own on GKE), each after a
    small warm-up (imports and pools touched): ratios N2/N1 of the medians over ``--rounds``
    alternating rounds (targets: time <= 1.1, RSS <= 1.2). Listing a day in the shard's own
    process would charge the stream with the heap the listing left behind (measured: +10.3 vs
    +6.5 MiB for 100k vs 10k that way; +9 vs +9 MiB, flat mid-stream, in a process of its own).
    RSS is reported per phase: the listing, the stream (read -> model -> staged parquet, what a
    shard pod runs; RESULT's rss_ratio) and the local DuckDB commit (DuckDB buffers an
    uncommitted insert up to about one row group of 122,880 rows before writing it out, so its
    peak grows with the day until then; a BigQuery load job runs server-side). In the same
    rounds, the ``--big`` day (1,000,000 uploads): its listing, its shard count and its first
    shard's stream (staged, not committed), against the N2 day: RESULT's
    ``listing_rss_ratio_1m_vs_100k`` (target <= 1.2) and ``shards_at_1m``.
(2) end-to-end vs model-only images/s reading ``gs://`` objects through the real
    google-cloud-storage client (``storage.read_bytes``, its connection pool sized to the reads
    in flight) from the GCS emulator, run in its own process with 50 ms added to every download
    (``sofar_assets/stack/gcs_latency.py``), at the default ``inference.reads_in_flight``, the
    medians of ``--repeats`` alternating rounds. The model-only rate is that of the stub plus a
    simulated accelerator time per image (``--model-ms``, sleeping like a GPU-bound step: it
    leaves the CPU to the decode workers), since a tiny CNN on 2 CPU cores is not a GPU. The
    emulator's own CPU (a Python HTTP server) shares this machine's cores, which GCS does not.
    Target >= 0.8.

Expected run time on a quiet 2-core machine: about 10 minutes (3 rounds of 10k + 100k days,
3 rounds of the 1M listing + one 100k shard, the latency rounds). ``--quick`` takes ~1-2 min.

The last line is ``RESULT time_per_image_ratio=<N2/N1> rss_ratio=<N2/N1> latency_e2e_vs_model=<x>
listing_rss_ratio_1m_vs_100k=<x> shards_at_1m=<n>``.
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
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from sofar_assets.config import InferenceConfig  # noqa: E402
from sofar_assets.lib.data import manifest, storage  # noqa: E402
from sofar_assets.lib.data.uploads import iter_table_uploads  # noqa: E402
from sofar_assets.lib.review.run_counts import run_counts  # noqa: E402
from sofar_assets.lib.serving import daily  # noqa: E402
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


PAGE_ROWS = 50_000  # rows per page of the uploads table (iter_uploads' default batch)


def table_pages(photos: list[str], n: int) -> Iterator[pd.DataFrame]:
    """A day of ``n`` uploads as the uploads table's pages (distinct ids, photos reused): what
    ``iter_uploads`` yields from BigQuery, which sorts server-side. (A local DuckDB sorts the
    day in this process before its first page: not what a pod runs in production.)"""
    for start in range(0, n, PAGE_ROWS):
        ids = range(start, min(n, start + PAGE_ROWS))
        yield pd.DataFrame({"image_id": [f"{DAY.isoformat()}/{i:07d}.jpg" for i in ids],
                            "image_uri": [photos[i % len(photos)] for i in ids]})


def listing(work: Path, photos: list[str], n: int, tag: str) -> tuple[str, int]:
    """The day listed ONCE into its manifest, as ``plan_shards`` does (``iter_table_uploads`` over
    the table's pages -> ``manifest.write_manifest``)."""
    path = str(work / f"manifest-{n}{tag}.parquet")
    rows = ((i, u) for page in table_pages(photos, n) for i, u in zip(page["image_id"], page["image_uri"],
                                                                      strict=True))
    return path, manifest.write_manifest(iter_table_uploads(rows, [str(work)]), path)


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


def list_day(work: Path, photos: list[str], n: int, *, memory: bool = False, tag: str = "") -> dict:
    """The listing step alone (``plan_shards``): the day's manifest, its seconds and, with
    ``memory``, its peak RSS above the RSS at its start (main process)."""
    base = _rss_kib()
    _reset_peak()
    t0 = time.perf_counter()
    path, count = listing(work, photos, n, tag)
    out = {"manifest": path, "count": count, "list_seconds": time.perf_counter() - t0}
    if memory:
        out["list_rss_mib"] = (_peak_kib() - base) / 1024
    return out


def run_day(work: Path, photos: list[str], n: int, *, model: torch.nn.Module, inf: InferenceConfig,
            memory: bool = False, tag: str = "", one_shard: bool = False, listed: dict | None = None) -> dict:
    """One day as the asset's steps run it: listing into the manifest -> the day's shards
    (``manifest.pack``) -> the first shard's slice through ``score_days`` into its staged parquet
    -> (unless ``one_shard``) ``write_day`` + ``run_counts`` + ``read_back``: seconds, and with
    ``memory`` the peak RSS above the RSS at the start of each phase (main process)."""
    if listed is None:  # listed in this process (the warm-up); a measured day is listed by its own
        listed = list_day(work, photos, n, memory=memory, tag=tag)
    path, count = listed["manifest"], listed["count"]
    out: dict = {"n": n} | {k: v for k, v in listed.items() if k.startswith("list_")}
    t0 = time.perf_counter() - listed["list_seconds"]  # the whole path: listing + shard + commit
    marks = {"base": _rss_kib()}
    _reset_peak()
    units = manifest.pack({DAY.isoformat(): (path, count)}, images_per_shard=inf.images_per_shard,
                          max_shards=inf.max_shards)
    first = units[0][0]
    out["shards"], out["shard_images"] = first["shards"], first["stop"] - first["start"]
    staging = daily.staging_uri(str(work / "state"), DAY, f"bench-{n}{tag}", 0, first["shards"])
    t1 = time.perf_counter()
    tallies = daily.score_days(
        model, [(DAY, manifest.read_slice(path, first["start"], first["stop"]))],
        open_spool=lambda day: ParquetSpool(PREDICTIONS, daily.local_spool_path(staging)),
        columns={"model_name": "stub", "model_version": "1", "predicted_at": pd.Timestamp("2026-11-02")},
        classes=CLASSES, image_size=IMAGE_SIZE, threshold=0.0, batch_size=inf.batch_size,
        num_workers=inf.num_workers, device="cpu", max_bytes=inf.max_bytes, reads_in_flight=inf.reads_in_flight,
    )
    out["score_seconds"] = time.perf_counter() - t1
    if memory:
        out["score_rss_mib"] = (_peak_kib() - marks["base"]) / 1024
        marks["base"] = _rss_kib()
        _reset_peak()
    if one_shard:
        out["seconds"] = time.perf_counter() - t0
        daily.remove_staged([staging, path])
        assert tallies[DAY].staged_rows == out["shard_images"], tallies[DAY]
        return out
    wh = DuckDBWarehouse(work / f"w-{n}{tag}.duckdb")
    t2 = time.perf_counter()
    # what commit_days runs: ONE replace_day, then ONE grouped query (read-back, queue, drift)
    written = daily.write_day(wh, PREDICTIONS, DAY, [tallies[DAY].as_dict() | {"file": staging, "listed": count}])
    counts = run_counts(wh, PREDICTIONS.name, [DAY])
    facts = daily.read_back(written, counts.rows(DAY))
    counts.drift()
    out["commit_seconds"] = time.perf_counter() - t2
    out["seconds"] = time.perf_counter() - t0
    if memory:
        out["commit_rss_mib"] = (_peak_kib() - marks["base"]) / 1024
    daily.remove_staged([staging, path])
    assert facts["ok"] and facts["rows"] == n, facts
    return out


def child_day(work: Path, n: int, one_shard: bool, phase: str) -> None:
    """One step of a day in this process, as the asset runs them: ``list`` (``plan_shards``) or
    ``score`` (a ``score_shard`` step over the manifest the list step wrote, then the commit)."""
    photos = json.loads((work / "photos.json").read_text())
    per_shard = os.environ.get("SOFAR_BENCH_IMAGES_PER_SHARD")  # --quick: a small day still cut in shards
    inf = InferenceConfig(**({"images_per_shard": int(per_shard)} if per_shard else {}))
    warm_n = 2 * inf.batch_size * max(inf.num_workers, 1)
    listed_file = work / f"listed-{n}.json"
    # a small warm-up first: every import, code path and pool is touched before measuring
    if phase == "list":
        list_day(work, photos, warm_n, tag="-warmup")
        listed_file.write_text(json.dumps(list_day(work, photos, n, memory=True)))
        print(json.dumps({}))
        return
    model = StubNet()
    run_day(work, photos, warm_n, model=model, inf=inf, tag="-warmup")
    listed = json.loads(listed_file.read_text())
    listed_file.unlink()
    out = run_day(work, photos, n, model=model, inf=inf, memory=True, one_shard=one_shard, listed=listed)
    workers_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps(out | {"baseline_mib": _rss_kib() / 1024, "workers_peak_mib": workers_peak / 1024}))


def latency_day(gcs_photos: list[str], n: int, *, model: torch.nn.Module, inf: InferenceConfig, work: Path) -> float:
    """Images/s of ``score_days`` over ``n`` ``gs://`` uploads read through the real GCS client
    (``storage.read_bytes``, its pool sized to the reads in flight) from the emulator."""
    staging = str(work / "latency.parquet")
    items = ((f"{DAY.isoformat()}/{i:07d}.jpg", gcs_photos[i % len(gcs_photos)]) for i in range(n))
    t0 = time.perf_counter()
    tallies = daily.score_days(
        model, [(DAY, items)], open_spool=lambda day: ParquetSpool(PREDICTIONS, staging),
        columns={"model_name": "stub", "model_version": "1", "predicted_at": pd.Timestamp("2026-11-02")},
        classes=CLASSES, image_size=IMAGE_SIZE, threshold=0.0, batch_size=inf.batch_size,
        num_workers=inf.num_workers, device="cpu", read_bytes=storage.read_bytes, max_bytes=inf.max_bytes,
        reads_in_flight=inf.reads_in_flight,
        read_kwargs={"timeout_s": inf.read_timeout_s, "retries": inf.read_retries, "pool_size": inf.reads_in_flight},
    )
    seconds = time.perf_counter() - t0  # first read to last row staged
    assert tallies[DAY].staged_rows == n and tallies[DAY].errors == 0, tallies[DAY].as_dict()
    Path(staging).unlink(missing_ok=True)
    return n / seconds


def start_emulator(latency_s: float) -> tuple[subprocess.Popen, str]:
    """The GCS emulator with ``latency_s`` per download, in a process of its own."""
    proc = subprocess.Popen([sys.executable, "-m", "sofar_assets.stack.gcs_latency", str(latency_s)],
                            stdout=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ,
                                 "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    url = proc.stdout.readline().strip()
    if not url.startswith("http://"):
        proc.kill()
        raise RuntimeError("the GCS emulator did not start")
    return proc, url


def model_only_rate(model: torch.nn.Module, n: int, batch_size: int) -> float:
    x = torch.rand(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE).contiguous(memory_format=torch.channels_last)
    model.eval()
    with torch.inference_mode():
        model(x)
        t0 = time.perf_counter()
        for _ in range(max(1, n // batch_size)):
            model(x)
    return max(1, n // batch_size) * batch_size / (time.perf_counter() - t0)


def run_child(work: Path, n: int, one_shard: bool = False) -> dict | None:
    """A day's listing and its shard in two processes, as ``plan_shards`` and ``score_shard`` run
    (their own processes locally, their own pods on GKE): the shard's memory is its own, not the
    heap a 100k-row listing left behind in the same process."""
    out = None
    for phase in ("list", "score"):
        cmd = [sys.executable, __file__, "--child", str(n), "--work", str(work), "--phase", phase]
        proc = subprocess.run(cmd + (["--one-shard"] if one_shard else []), capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stderr[-4000:])
            return None
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", default="10000,100000", help="the two day sizes N1,N2")
    ap.add_argument("--big", type=int, default=1_000_000, help="the big day: listing + one shard (0: skip)")
    ap.add_argument("--photos", type=int, default=2000, help="distinct JPEGs the uploads point at")
    ap.add_argument("--latency-images", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the day sizes in (1)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating model-only / end-to-end rounds in (2)")
    ap.add_argument("--model-ms", type=float, default=2.0, help="simulated accelerator ms per image in (2)")
    ap.add_argument("--images-per-shard", type=int, help="default: the config's inference.images_per_shard")
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny days, one round (no figures)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--one-shard", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--phase", choices=("list", "score"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_day(args.work, args.child, args.one_shard, args.phase)
        return 0
    if args.quick:  # a smoke run (make test): seconds, figures meaningless
        args.days, args.big, args.latency_images = "200,600", 3000, 200
        args.photos, args.rounds, args.repeats = 50, 1, 1
    n1, n2 = (int(x) for x in args.days.split(","))
    if args.quick:  # the big day still cut in several shards
        args.images_per_shard = 600
    inf = InferenceConfig()
    if args.images_per_shard:
        inf = inf.model_copy(update={"images_per_shard": args.images_per_shard})
        os.environ["SOFAR_BENCH_IMAGES_PER_SHARD"] = str(args.images_per_shard)  # the children's
    print(f"stub CNN at {IMAGE_SIZE} px, CPU, batch {inf.batch_size}, {inf.num_workers} DataLoader workers, "
          f"{inf.reads_in_flight} reads in flight per worker, {inf.images_per_shard} images per shard, at most "
          f"{inf.max_shards} shards")
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
        big: list[dict] = []
        for _ in range(args.rounds):
            for n in (n1, n2):
                r = run_child(work, n)
                if r is None:
                    return 1
                runs[n].append(r)
                print(f"(1) day of {n:>7} uploads: {r['seconds']:7.1f} s = {1e6 * r['seconds'] / n:6.0f} us/image "
                      f"({n / r['seconds']:.0f} images/s; listing {r['list_seconds']:.1f} s, stream "
                      f"{r['score_seconds']:.1f} s, commit + checks {r['commit_seconds']:.1f} s; {r['shards']} "
                      f"shard(s)); peak RSS above baseline: listing +{r['list_rss_mib']:.1f} MiB, stream "
                      f"+{r['score_rss_mib']:.1f} MiB, DuckDB commit +{r['commit_rss_mib']:.1f} MiB (process "
                      f"{r['baseline_mib']:.0f} MiB, workers peak {r['workers_peak_mib']:.0f} MiB)", flush=True)
            if args.big:
                r = run_child(work, args.big, one_shard=True)
                if r is None:
                    return 1
                big.append(r)
                print(f"(1) day of {args.big:>7} uploads: listing {r['list_seconds']:.1f} s "
                      f"({1e6 * r['list_seconds'] / args.big:.1f} us/upload), {r['shards']} shards; shard 1 of "
                      f"{r['shards']}: {r['shard_images']} images in {r['score_seconds']:.1f} s "
                      f"({1e6 * r['score_seconds'] / r['shard_images']:.0f} us/image); peak RSS above baseline: "
                      f"listing +{r['list_rss_mib']:.1f} MiB, shard stream +{r['score_rss_mib']:.1f} MiB", flush=True)

        def med(rs: list[dict], key: str, floor: float = 0.0) -> float:
            return max(float(np.median([r[key] for r in rs])), floor)

        time_ratio = (med(runs[n2], "seconds") / n2) / (med(runs[n1], "seconds") / n1)
        rss_ratio = med(runs[n2], "score_rss_mib", 1.0) / med(runs[n1], "score_rss_mib", 1.0)  # floor: 1 MiB
        commit_ratio = med(runs[n2], "commit_rss_mib", 1.0) / med(runs[n1], "commit_rss_mib", 1.0)
        print(f"    medians of {args.rounds} rounds: time per image (whole path) {n2}/{n1}: {time_ratio:.3f} "
              f"(target <= 1.1); peak RSS above baseline of the stream {n2}/{n1}: {rss_ratio:.3f} "
              f"(+{med(runs[n2], 'score_rss_mib'):.1f} / +{med(runs[n1], 'score_rss_mib'):.1f} MiB; target <= 1.2); "
              f"of the local DuckDB commit: {commit_ratio:.3f} (DuckDB's insert buffer, not the stream's; BigQuery "
              "loads server-side)")
        list_ratio, shards_big = float("nan"), 0
        if big:
            list_ratio = med(big, "list_rss_mib", 1.0) / med(runs[n2], "list_rss_mib", 1.0)
            shard_rss = med(big, "score_rss_mib", 1.0) / med(runs[n2], "score_rss_mib", 1.0)
            shard_time = ((med(big, "score_seconds") / big[0]["shard_images"])
                          / (med(runs[n2], "score_seconds") / n2))
            list_time = (med(big, "list_seconds") / args.big) / (med(runs[n2], "list_seconds") / n2)
            shards_big = big[0]["shards"]
            print(f"    {args.big} vs {n2} uploads: listing peak RSS above baseline {list_ratio:.3f} "
                  f"(+{med(big, 'list_rss_mib'):.1f} / +{med(runs[n2], 'list_rss_mib'):.1f} MiB; target <= 1.2), "
                  f"listing time per upload {list_time:.3f}; one shard's stream: time per image {shard_time:.3f}, "
                  f"peak RSS {shard_rss:.3f}; {shards_big} shards")

        # (2) latency hidden by reads in flight, through the real google-cloud-storage client
        # against the GCS emulator (its own process) with READ_LATENCY_S added to every download.
        # model-only and end-to-end alternate, ``--repeats`` times: a burst of load elsewhere hits
        # both sides of the ratio instead of one (the medians are compared)
        emulator, url = start_emulator(READ_LATENCY_S)
        os.environ["STORAGE_EMULATOR_HOST"] = url  # this process and its DataLoader workers
        try:
            client = storage.gcs_client()
            client.create_bucket("bench")
            gcs_photos = []
            for p in photos[: min(len(photos), args.latency_images)]:
                client.bucket("bench").blob(f"photos/{Path(p).name}").upload_from_filename(p)
                gcs_photos.append(f"gs://bench/photos/{Path(p).name}")
            model = StubNet(device_s_per_image=args.model_ms / 1000)
            model_rates, e2e_rates = [], []
            for _ in range(args.repeats):
                model_rates.append(model_only_rate(model, args.latency_images, inf.batch_size))
                e2e_rates.append(latency_day(gcs_photos, args.latency_images, model=model, inf=inf, work=work))
        finally:
            emulator.kill()
            emulator.wait()
        model_rate, e2e_rate = float(np.median(model_rates)), float(np.median(e2e_rates))
        latency_ratio = e2e_rate / model_rate
        print(f"(2) {args.latency_images} gs:// images through google-cloud-storage (pool of {inf.reads_in_flight}) "
              f"from the GCS emulator, {1000 * READ_LATENCY_S:.0f} ms added per download, {args.repeats} "
              f"alternating rounds: end-to-end {', '.join(f'{x:.0f}' for x in e2e_rates)} images/s vs "
              f"model-only {', '.join(f'{x:.0f}' for x in model_rates)} images/s (stub + {args.model_ms} "
              f"ms/image simulated accelerator); medians {e2e_rate:.0f} / {model_rate:.0f} = {latency_ratio:.3f} "
              "(target >= 0.8)")
    print(f"RESULT time_per_image_ratio={time_ratio:.3f} rss_ratio={rss_ratio:.3f} "
          f"latency_e2e_vs_model={latency_ratio:.3f} listing_rss_ratio_1m_vs_100k={list_ratio:.3f} "
          f"shards_at_1m={shards_big}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
