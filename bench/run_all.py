"""`make bench`: every benchmark in one go, each printing its own table of figures.

Speed is reported as ratios measured side by side in the same process/run, because absolute
numbers on shared machines drift. Run one directly for its options (`--help`).

    python bench/run_all.py [--quick]

``--quick`` runs each benchmark's smoke mode (seconds each, figures meaningless): what
``tests/test_benchmarks.py`` runs in ``make test`` so that a benchmark cannot rot unnoticed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = [
    ("decode throughput (issue: dataset)", ["bench_decode.py"]),
    ("decode memory of a day of huge-raster PNGs (issue 23)", ["bench_decode_memory.py"]),
    ("training throughput (issue: classifier)", ["bench_train.py"]),
    ("inference and efficiency (issue: daily table)", ["bench_inference.py"]),
    ("Dagster overhead on one day (issue: daily table)", ["bench_dagster_overhead.py"]),
    ("a day of many photos: time, memory, reads in flight, 1M listing (issue: scale)", ["bench_scale.py"]),
    ("pipeline part of make run (issue: foundation)", ["bench_pipeline.py"]),
    ("the champion served: HTTP latency on one core, ORT vs eager (issue: serving)", ["bench_serving.py"]),
    ("recipe vs frozen-feature probe, 5-fold CV on the real photos (issue: model quality)", ["bench_recipe.py"]),
    ("kNN OOD bank cap: AUROC of the capped vs the full bank, device vs numpy (issue: scale)", ["bench_knn_bank.py"]),
]


def main(argv: list[str] | None = None) -> int:
    quick = "--quick" in (sys.argv[1:] if argv is None else argv)
    failed = []
    for title, argv_ in BENCHES:
        cmd = [*argv_, "--quick"] if quick else argv_
        print(f"\n==== {title}: python bench/{' '.join(cmd)}", flush=True)
        rc = subprocess.run([sys.executable, str(HERE / cmd[0]), *cmd[1:]]).returncode
        if rc:
            failed.append(cmd[0])
    if failed:
        print(f"\nbenchmarks that failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
