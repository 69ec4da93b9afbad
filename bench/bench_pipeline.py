"""Wall time of the pipeline part of `make run` (install and demo-data generation excluded).

    python bench/bench_pipeline.py [--quick]

``--quick`` (what ``make test`` runs) times nothing: it checks that every step's job, asset
selection and CLI command still exists in the definitions, so the benchmark cannot rot.

Runs the same steps as `make pipeline` (train_and_promote, the demo days as one backfill, then
the corrections loop: the demo verdicts imported, the dataset rebuilt with them, field accuracy
per demo day) against a fresh state folder and a fresh DAGSTER_HOME, so a previous `make run`
neither helps nor hurts, and prints each step's wall time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DAYS = "2026-11-01...2026-11-03"


def check_steps(steps: list[tuple[str, list[str]]], env: dict) -> int:
    """``--quick``: every job, asset selection and CLI sub-command of ``steps`` resolves (in one process)."""
    code = f"""
import sys, dagster as dg
from sofar_assets.config import load_config
from sofar_assets.definitions import build_definitions
from sofar_assets.cli import build_parser
import os
defs = build_definitions(load_config(os.environ["SOFAR_CONFIG"]))
steps = {[cmd[1:] for _, cmd in steps]!r}
graph = defs.resolve_asset_graph()
for argv in steps:
    if "-j" in argv:
        defs.resolve_job_def(argv[argv.index("-j") + 1])
    elif "--select" in argv:
        keys = dg.AssetSelection.from_coercible(argv[argv.index("--select") + 1].split(",")).resolve(graph)
        assert keys, argv
    else:
        build_parser().parse_args(argv[2:])
print(f"{{len(steps)}} steps resolve")
"""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env).returncode


def main() -> int:
    quick = "--quick" in sys.argv[1:]
    demo = REPO / ".sofar" / "demo-data"
    if not quick and (not (demo / "SYNTHETIC.md").exists() or not (demo / "corrections.csv").exists()):
        subprocess.run([sys.executable, "-m", "sofar_assets.cli", "demo-data"], check=True, cwd=REPO)
    with tempfile.TemporaryDirectory(prefix="sofar-bench-") as tmp:
        tmp = Path(tmp)
        cfg = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
        for task in cfg["tasks"].values():
            task["folder"] = str((REPO / "config" / task["folder"]).resolve())
        cfg["uploads"]["folder"] = str((REPO / "config" / cfg["uploads"]["folder"]).resolve())
        for oset in cfg["ood_sets"].values():
            oset["folder"] = str((REPO / "config" / oset["folder"]).resolve())
        if quick:  # no demo data needed to resolve the steps: empty stand-in folders
            for k, d in enumerate([*cfg["tasks"].values(), cfg["uploads"], *cfg["ood_sets"].values()]):
                d["folder"] = str(tmp / f"empty-{k}")
                for sub in ["", *d.get("labels", {})]:
                    (Path(d["folder"]) / sub).mkdir(exist_ok=True)
        cfg["storage"]["root"] = str(tmp / "state")
        (tmp / "sofar.yaml").write_text(yaml.safe_dump(cfg))
        (tmp / "home").mkdir()
        (tmp / "home" / "dagster.yaml").write_text((REPO / "dagster_home" / "dagster.yaml").read_text())
        env = {**os.environ, "SOFAR_CONFIG": str(tmp / "sofar.yaml"), "DAGSTER_HOME": str(tmp / "home")}
        dagster = str(Path(sys.executable).with_name("dagster"))
        steps = [
            ("train_and_promote",
             [dagster, "job", "execute", "-m", "sofar_assets.definitions", "-j", "train_and_promote"]),
            (f"daily_predictions {DAYS}", [dagster, "asset", "materialize", "-m", "sofar_assets.definitions",
                                             "--select", "daily_predictions", "--partition-range", DAYS]),
            ("sofar correct --csv (demo verdicts)", [sys.executable, "-m", "sofar_assets.cli", "correct", "--csv",
                                                     str(demo / "corrections.csv")]),
            ("raw_labels/label_corrections, sofar_dataset", [
                dagster, "asset", "materialize", "-m", "sofar_assets.definitions",
                "--select", "raw_labels/label_corrections,sofar_dataset"]),
            (f"field_accuracy {DAYS}", [dagster, "asset", "materialize", "-m", "sofar_assets.definitions",
                                        "--select", "field_accuracy", "--partition-range", DAYS]),
        ]
        if quick:
            return check_steps(steps, env)
        total = 0.0
        rows = []
        for name, cmd in steps:
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            dt_s = time.perf_counter() - t0
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
                print(f"FAILED: {name}")
                return 1
            total += dt_s
            rows.append((name, dt_s))
    print(f"pipeline part of `make run` on {os.cpu_count()} CPU cores (fresh state, install excluded):")
    for name, s in rows:
        print(f"  {name:<40} {s:7.1f} s")
    print(f"  {'total':<40} {total:7.1f} s   (target <= 300 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
