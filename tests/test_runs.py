"""Run limits (issue 23 item 12): Dagster 1.13's run monitoring cannot tell a dead local run
worker from a live one, so each job carries its own `dagster/max_runtime`; runs without a job
tag get dagster_home/dagster.yaml's max_runtime_seconds."""

from __future__ import annotations

import dagster as dg
from dagster._core.launcher import DefaultRunLauncher

from sofar_assets.config import load_config
from sofar_assets.definitions import build_definitions
from sofar_assets.defs.runs import MAX_RUNTIME_S, MAX_RUNTIME_TAG
from sofar_assets.settings import REPO_ROOT

from conftest import write_config


def test_the_local_launcher_has_no_worker_health_check():
    # the premise of per-job limits: if Dagster adds a health check here, use it instead
    assert DefaultRunLauncher.supports_check_run_worker_health.fget(object.__new__(DefaultRunLauncher)) is False
    from dagster._core.storage.tags import MAX_RUNTIME_SECONDS_TAG

    assert MAX_RUNTIME_SECONDS_TAG == MAX_RUNTIME_TAG  # the tag run monitoring's check_run_timeout reads


def test_each_job_carries_its_limit_training_long_a_day_short(tmp_path, demo_data):
    defs = build_definitions(load_config(write_config(tmp_path, demo_data)))
    limits = {name: float(defs.resolve_job_def(name).tags[MAX_RUNTIME_TAG])
              for name in ("train_and_promote", "daily_predictions_job", "tradeoff_report_job")}
    assert limits == {k: float(v) for k, v in MAX_RUNTIME_S.items()}
    assert limits["daily_predictions_job"] <= 3600 < limits["train_and_promote"] < limits["tradeoff_report_job"]
    # the schedule's runs are the daily job's: they carry the day's limit
    schedule = defs.resolve_schedule_def("daily_predictions_job_schedule")
    assert schedule.job_name == "daily_predictions_job"


def test_the_instance_default_is_for_untagged_runs(tmp_path):
    import shutil

    shutil.copy(REPO_ROOT / "dagster_home" / "dagster.yaml", tmp_path / "dagster.yaml")
    instance = dg.DagsterInstance.from_config(str(tmp_path))
    assert instance.run_monitoring_enabled
    assert instance.run_monitoring_max_runtime_seconds == 4 * 3600
    assert instance.run_monitoring_max_runtime_seconds >= MAX_RUNTIME_S["daily_predictions_job"]
