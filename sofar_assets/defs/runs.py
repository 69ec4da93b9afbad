"""How long a run of each job may take before run monitoring ends it (the ``dagster/max_runtime``
run tag, read by the daemon's run monitoring).

Dagster 1.13's run monitoring can tell a dead run worker from a live one only where the run
launcher implements ``check_run_worker_health`` (the Kubernetes and ECS launchers do). The local
``DefaultRunLauncher`` does not (``supports_check_run_worker_health`` is False), so locally a run
whose process died (kill -9, OOM, a closed laptop) stays STARTED until it outlives its maximum
runtime, holding the one run slot (``max_concurrent_runs: 1``) and the queue behind it. One
instance-wide limit is either too long for a day (a dead day blocks the queue for hours) or too
short for training (a legitimate run is killed), so each job carries its own limit; runs without
a job (assets materialized from the UI, backfills) get ``max_runtime_seconds`` from
``dagster_home/dagster.yaml``.
"""

from __future__ import annotations

MAX_RUNTIME_TAG = "dagster/max_runtime"
MAX_RUNTIME_S = {
    # training + calibration + evaluation on the local CPU/GPU: hours on real data
    "train_and_promote": 8 * 3600,
    # T + 2 models trained back to back (tradeoff_report_job)
    "tradeoff_report_job": 24 * 3600,
    # one day's uploads (the schedule's run): minutes; a dead one frees the queue within 45 min
    "daily_predictions_job": 45 * 60,
}


def max_runtime_tags(job: str) -> dict[str, str]:
    """The run tags that bound a run of ``job`` (see :data:`MAX_RUNTIME_S`)."""
    return {MAX_RUNTIME_TAG: str(MAX_RUNTIME_S[job])}
