"""Dagster overhead: materializing one `daily_predictions` day vs the same work in a plain script.

    python bench/bench_dagster_overhead.py [--images 200] [--rounds 3] [--quick]

Both sides do identical work on the same day of real-size photos (the sample photos under
distinct names): load the champion from the MLflow registry, decode + predict every photo, and
replace the day's rows in DuckDB. A = `dagster.materialize(daily_predictions, partition)`,
B = the plain functions the asset's steps call (`load_registered`, `uploads_of_day`,
`daily.score_days`, `daily.write_day`, `run_counts`, `daily.read_back`). Rounds alternate A, B, A,
B …; the ratio A/B of the medians is printed (target <= 1.10).

Whole processes, for an outside timer (each prepares STATE once, then does one side once):

    python bench/bench_dagster_overhead.py --state /tmp/ovh --only dagster
    python bench/bench_dagster_overhead.py --state /tmp/ovh --only plain
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import dagster as dg  # noqa: E402
import mlflow  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from sofar_assets.config import load_config  # noqa: E402
from sofar_assets.definitions import build_definitions  # noqa: E402
from sofar_assets.defs.predictions import uploads_of_day  # noqa: E402
from sofar_assets.lib.model.models import ModelSpec, build_model  # noqa: E402
from sofar_assets.lib.review.run_counts import run_counts  # noqa: E402
from sofar_assets.lib.serving import daily  # noqa: E402
from sofar_assets.lib.serving.packaging import load_registered, log_and_register  # noqa: E402
from sofar_assets.lib.warehouse import PREDICTIONS, ParquetSpool  # noqa: E402

SAMPLES = next((p / "shared/data/sofar-public-samples" for p in Path(__file__).resolve().parents[2:4]
                if (p / "shared/data/sofar-public-samples").is_dir()),
               Path(__file__).resolve().parents[2] / "shared/data/sofar-public-samples")  # a worktree: one deeper
DAY = dt.date(2026, 11, 1)


def put_file(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (same file system), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def setup(tmp: Path, n_images: int):
    """A day of ``n_images`` photos and a registered champion under ``tmp`` (reused if there)."""
    if (tmp / "sofar.yaml").exists():
        cfg = load_config(tmp / "sofar.yaml")
        return cfg, build_definitions(cfg)
    photos = sorted(SAMPLES.rglob("*.jpg"))
    if not photos:
        sys.exit(f"no sample photos under {SAMPLES}")
    day = tmp / "uploads" / DAY.isoformat()
    day.mkdir(parents=True)
    for i in range(n_images):  # real files: a symbolic link leaving the uploads folder is an error row
        put_file(photos[i % len(photos)], day / f"{i:05d}.jpg")
    task = tmp / "task"
    for sub in ("0_NORMAL", "1_DEFECT"):
        (task / sub).mkdir(parents=True)
    cfg_path = tmp / "sofar.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "tasks": {"defect": {"folder": str(task), "labels": {"0_NORMAL": "normal", "1_DEFECT": "defect"}}},
        "uploads": {"folder": str(tmp / "uploads")},
        "partitions": {"start_date": "2026-11-01"},
        "storage": {"root": str(tmp / "state")},
        "inference": {"num_workers": 2, "batch_size": 32, "device": "cpu"},
    }))
    cfg = load_config(cfg_path)
    defs = build_definitions(cfg)
    mlflow_res = defs.resources["mlflow_tracking"]
    experiment_id = mlflow_res.setup()
    classes = cfg.vocabulary()
    model = build_model(ModelSpec(num_classes=len(classes))).eval()
    with mlflow.start_run(experiment_id=experiment_id):
        log_and_register(model, ModelSpec(num_classes=len(classes)), classes, cfg.model.name)
    client = mlflow_res.client()
    for k, v in {"ood_threshold": "0.0", "ood_temperature": "1.0", "ood_score_method": "max_logit"}.items():
        client.set_model_version_tag(cfg.model.name, "1", k, v)
    client.set_registered_model_alias(cfg.model.name, "champion", "1")
    return cfg, defs


def run_dagster(defs, instance) -> float:
    t0 = time.perf_counter()
    result = dg.materialize([*defs.assets, *defs.asset_checks], selection=dg.AssetSelection.assets("daily_predictions"),
                            partition_key=DAY.isoformat(), resources=defs.resources, instance=instance,
                            run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}})
    assert result.success
    return time.perf_counter() - t0


def run_plain(cfg, defs) -> float:
    t0 = time.perf_counter()
    wh = defs.resources["warehouse"].get()
    defs.resources["mlflow_tracking"].setup()  # point mlflow at the registry, as the asset does
    model, meta = load_registered(f"models:/{cfg.model.name}@champion")
    inf = cfg.inference
    staging = daily.staging_uri(cfg.root, DAY, "plain", 0, 1)
    tallies = daily.score_days(
        model, [(DAY, uploads_of_day(cfg, DAY, wh))],
        open_spool=lambda day: ParquetSpool(PREDICTIONS, daily.local_spool_path(staging)),
        columns={"model_name": cfg.model.name, "model_version": "1",
                 "predicted_at": pd.Timestamp.now(tz="UTC").tz_localize(None)},
        classes=list(meta["classes"]), image_size=cfg.model.image_size, threshold=0.0,
        batch_size=inf.batch_size, num_workers=inf.num_workers, device="cpu", max_bytes=inf.max_bytes,
        reads_in_flight=inf.reads_in_flight,
    )
    # what commit_days runs: ONE replace_day, then ONE grouped query (read-back, queue, drift)
    written = daily.write_day(wh, PREDICTIONS, DAY, [tallies[DAY].as_dict() | {"file": staging}])
    counts = run_counts(wh, PREDICTIONS.name, [DAY])
    daily.read_back(written, counts.rows(DAY))
    counts.drift()
    daily.remove_staged([staging])
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--state", type=Path, help="keep the prepared day + registry here (for --only)")
    ap.add_argument("--only", choices=["dagster", "plain"], help="one side once, as a whole process")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 8 photos, 1 round (no figures)")
    args = ap.parse_args()
    if args.quick:
        args.images, args.rounds = 8, 1
    if args.only:
        if args.state is None:
            ap.error("--only needs --state")
        args.state.mkdir(parents=True, exist_ok=True)
        cfg, defs = setup(args.state, args.images)
        if args.only == "dagster":
            run_dagster(defs, dg.DagsterInstance.ephemeral())
        else:
            run_plain(cfg, defs)
        return 0
    with tempfile.TemporaryDirectory(prefix="sofar-overhead-") as tmp:
        cfg, defs = setup(Path(tmp), args.images)
        instance = dg.DagsterInstance.ephemeral()
        run_plain(cfg, defs)  # warm-up: imports, page cache, registry
        a, b = [], []
        for _ in range(args.rounds):
            a.append(run_dagster(defs, instance))
            b.append(run_plain(cfg, defs))
        ratios = [x / y for x, y in zip(a, b, strict=True)]
    print(f"one day of {args.images} real-size photos, {args.rounds} alternating rounds, CPU:")
    print(f"  A dagster materialize   median {statistics.median(a):6.2f} s   {[f'{x:.2f}' for x in a]}")
    print(f"  B plain script          median {statistics.median(b):6.2f} s   {[f'{x:.2f}' for x in b]}")
    print(f"  A/B per round {[f'{r:.3f}' for r in ratios]}   median {statistics.median(ratios):.3f}  (target <= 1.10)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
