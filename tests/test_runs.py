"""Run limits (issue 23 item 12): Dagster 1.13's run monitoring cannot tell a dead local run
worker from a live one, so each job carries its own `dagster/max_runtime`; runs without a job
tag get dagster_home/dagster.yaml's max_runtime_seconds."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import dagster as dg
import pytest
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


# -- item 1: a killed run does not block the run queue ----------------------------------------------

REPO = Path(__file__).resolve().parents[1]
DAGSTER_BIN = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"

JOBS = '''
import os, time
import dagster as dg

@dg.op
def nap():
    with open({pid_file!r} + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace({pid_file!r} + ".tmp", {pid_file!r})
    time.sleep(600)

@dg.op
def hello():
    return 1

# dagster/max_runtime: the per-run form of run_monitoring.max_runtime_seconds (1 h), short for the test
@dg.job(executor_def=dg.in_process_executor, tags={{"dagster/max_runtime": 20}})
def nap_job():
    nap()

@dg.job(executor_def=dg.in_process_executor)
def hello_job():
    hello()

# the daemon itself queues the second run, as the daily schedule would
@dg.sensor(job=hello_job, minimum_interval_seconds=1, default_status=dg.DefaultSensorStatus.RUNNING)
def after_the_kill():
    if os.path.exists({go_file!r}):
        yield dg.RunRequest(run_key="after-the-kill")

defs = dg.Definitions(jobs=[nap_job, hello_job], sensors=[after_the_kill])
'''


def _wait(what: str, predicate, timeout_s: float, procs=()):
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for p in procs:
            assert p.poll() is None, f"{p.args[:2]} exited with {p.returncode} while waiting for {what}"
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.mark.slow
def test_a_killed_run_is_failed_and_the_queued_run_still_runs(tmp_path):
    """kill -9 a local run (started as `make pipeline` starts them: `dagster job execute`, in one
    process) while it is STARTED and the daemon has queued a second run behind it
    (max_concurrent_runs: 1). With our dagster.yaml's run monitoring the dead run is failed and
    the queued one runs; without it the queue waits forever."""
    import signal
    import subprocess
    import time

    from dagster import DagsterRunStatus

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")  # our queue + monitoring settings
    pid_file, go_file = tmp_path / "nap.pid", tmp_path / "go"
    (tmp_path / "jobs.py").write_text(JOBS.format(pid_file=str(pid_file), go_file=str(go_file)))
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": ""}
    cli = dict(cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    instance = dg.DagsterInstance.from_config(str(home))
    assert instance.run_monitoring_enabled, "run_monitoring is off in dagster_home/dagster.yaml"
    started = time.monotonic()
    daemon = subprocess.Popen([DAGSTER_BIN / "dagster-daemon", "run", "-f", "jobs.py"], **cli)
    run1 = subprocess.Popen([DAGSTER_BIN / "dagster", "job", "execute", "-f", "jobs.py", "-j", "nap_job"], **cli)
    try:
        pid = int(_wait("the run to start", lambda: pid_file.exists() and pid_file.read_text(), 90, [daemon, run1]))
        assert pid == run1.pid  # the op runs in the CLI's own process (in-process executor)
        [killed] = instance.get_runs()
        go_file.touch()  # the daemon queues the next run behind it
        queued = _wait("the daemon to queue the second run", lambda: instance.get_runs(
            dg.RunsFilter(job_name="hello_job", statuses=[DagsterRunStatus.QUEUED])), 60, [daemon])[0]
        assert instance.get_run_by_id(killed.run_id).status == DagsterRunStatus.STARTED
        os.kill(pid, signal.SIGKILL)  # the dead run keeps its slot: only run monitoring will notice
        run1.wait(10)

        def finished():
            a, b = instance.get_run_by_id(killed.run_id), instance.get_run_by_id(queued.run_id)
            return a.is_finished and b.is_finished and (a, b)

        a, b = _wait("the killed run to fail and the queued run to finish", finished, 90, [daemon])
        assert a.status == DagsterRunStatus.FAILURE
        assert b.status == DagsterRunStatus.SUCCESS
        print(f"killed run FAILURE, queued run SUCCESS: {time.monotonic() - started:.0f} s after the start")
    finally:
        for proc in (run1, daemon):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
