"""Every benchmark of ``make bench`` runs in its quick mode (seconds each; no timing asserted),
so that a benchmark broken by a change elsewhere fails ``make test`` instead of ``make bench``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from run_all import BENCHES  # noqa: E402


@pytest.mark.parametrize("argv", [argv for _, argv in BENCHES], ids=[argv[0] for _, argv in BENCHES])
def test_benchmark_runs_in_quick_mode(argv, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "DAGSTER_HOME": str(tmp_path),
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / argv[0]), *argv[1:], "--quick"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (f"{argv[0]} --quick exited {proc.returncode}:\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    if argv[0] == "bench_scale.py":  # the figures the README and the issue quote are all printed
        result = proc.stdout.strip().splitlines()[-1]
        for key in ("time_per_image_ratio", "rss_ratio", "latency_e2e_vs_model",
                    "listing_rss_ratio_1m_vs_100k", "shards_at_1m"):
            assert f" {key}=" in result, result


def test_run_all_lists_every_benchmark_script():
    scripts = {p.name for p in (REPO / "bench").glob("bench_*.py")}
    assert scripts == {argv[0] for _, argv in BENCHES}
