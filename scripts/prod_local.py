"""`make prod-local`: every production component for real on this machine, the graph run against
them the way operators run it, the outcome asserted, everything stopped.

    .venv/bin/python scripts/prod_local.py [--keep-going-on-failure]

Components (sofar_assets/stack/servers.py): PostgreSQL (run as an unprivileged user) holding
the Dagster instance and the MLflow backend and auth stores; the GCS emulator holding the task
images, the uploads, the IO manager's objects and MLflow's artifacts; the MLflow tracking
server with basic auth and proxied artifacts; the BigQuery emulator (tests/bq_emulator.py) as
the warehouse; the Dagster webserver and daemon (QueuedRunCoordinator, pools, run monitoring).

The graph runs from config/prod-local.yaml (prod.yaml with local endpoints). Runs are
submitted through the webserver's GraphQL API as the UI does: ``launchRun`` for
``train_and_promote``, ``launchPartitionBackfill`` for a 9-day backfill of
``daily_predictions`` (fanned out by ``partitions.backfill_days_per_run: 7`` into 2 runs),
then one real tick of ``daily_predictions_job_schedule`` evaluated by the daemon's scheduler.
It ends with ``sofar doctor`` (sofar_assets/doctor.py) against the stack, as an operator runs it.
Exit status 0 only when every check passed; the stack is stopped on any exit (also Ctrl-C).
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import signal
import sys
import time
from pathlib import Path
from urllib.parse import urlparse
from zoneinfo import ZoneInfo

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # the package, and the tests' BigQuery emulator

import pandas as pd  # noqa: E402
import requests  # noqa: E402

from sofar_assets.config import SofarConfig, load_config  # noqa: E402
from sofar_assets.stack.servers import MARKER, Dagster, Stack, StackError, free_port, require_free  # noqa: E402

CONFIG = REPO / "config" / "prod-local.yaml"
LOCATION, REPOSITORY = "sofar_assets", "__repository__"
SCHEDULE = "daily_predictions_job_schedule"
MLFLOW_ARTIFACTS = "gs://sofar-ml/mlartifacts"  # the server's --artifacts-destination (as in the chart)
# where the app stores uploaded photos; image_uploads points here
UPLOADS_PREFIX = "gs://sofar-images/uploads"
BACKFILL_DAYS = 9  # > backfill_days_per_run (7): the backfill fans out into 2 runs
PER_CLASS, PER_DAY, OOD_PER_SET = 12, 6, 10
POOLS = {"gpu": 1, "warehouse_write": 2}  # one GPU; the day loads of two runs may overlap (one job per day)
RUN_TIMEOUT_S = 3600


def log(msg: str) -> None:
    print(f"[prod-local {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# --------------------------------------------------------------------------- data


def _gcs_put(client, uri: str, data: bytes) -> None:
    bucket, _, key = uri[len("gs://") :].partition("/")
    client.bucket(bucket).blob(key).upload_from_string(data)


def upload_demo_data(cfg: SofarConfig, gcs_client, wh, schedule_day: dt.date,
                     workdir: Path) -> dict[dt.date, int]:
    """SYNTHETIC demo data (lib/data/synthetic.py) into the buckets and tables prod.yaml names.
    Returns the uploads per day (what the prediction table must hold)."""
    from sofar_assets.lib.data.synthetic import DEMO_TASKS, generate_demo_data
    from sofar_assets.lib.warehouse import IMAGE_UPLOADS
    from sofar_assets.lib.warehouse.schemas import STRING, TableSchema

    days = tuple(schedule_day - dt.timedelta(days=i) for i in range(BACKFILL_DAYS, -1, -1))
    data = workdir / "demo-data"
    generate_demo_data(data, per_class=PER_CLASS, days=days, per_day=PER_DAY, ood_per_set=OOD_PER_SET,
                       corrupt_upload_on=days[1])
    for task, folders in DEMO_TASKS.items():
        target = cfg.tasks[task]
        source_of = {canonical: source for source, canonical in target.labels.items()}  # prod's source labels
        rows = []
        for demo_folder, canonical in folders.items():
            for f in sorted((data / "tasks" / task / demo_folder).iterdir()):
                if target.folder:  # an ImageFolder tree in GCS
                    _gcs_put(gcs_client, f"{target.folder}/{source_of[canonical]}/{f.name}", f.read_bytes())
                else:  # a label table in BigQuery over images in GCS
                    uri = f"gs://sofar-images/tasks/{task}/{f.name}"
                    _gcs_put(gcs_client, uri, f.read_bytes())
                    rows.append({"image_uri": uri, "label": source_of[canonical]})
        if target.table:
            wh.write_table(target.table, pd.DataFrame(rows),
                           TableSchema(name=target.table, columns={"image_uri": STRING, "label": STRING}))
    for name, ood in cfg.ood_sets.items():
        for f in sorted((data / "ood" / name).iterdir()):
            _gcs_put(gcs_client, f"{ood.folder}/{f.name}", f.read_bytes())
    uploads, per_day = [], {}
    for day in days:
        files = sorted((data / "uploads" / day.isoformat()).iterdir())
        for i, f in enumerate(files):
            uri = f"{UPLOADS_PREFIX}/{day.isoformat()}/{f.name}"
            _gcs_put(gcs_client, uri, f.read_bytes())
            # spread over 08:00-24:00 of the partitions' day (Asia/Seoul in prod): each photo in its own day
            at = (dt.datetime.combine(day, dt.time(8), tzinfo=ZoneInfo(cfg.partitions.timezone))
                  + dt.timedelta(minutes=16 * 60 * i // len(files)))
            uploads.append({"image_id": f"{day.isoformat()}/{f.name}", "image_uri": uri, "uploaded_at": at})
        per_day[day] = len(files)
    wh.write_table(cfg.uploads.table, pd.DataFrame(uploads), IMAGE_UPLOADS)
    return per_day


# --------------------------------------------------------------------------- runs, as the UI submits them


def _graphql_result(data: dict, field: str, ok: str) -> dict:
    res = data[field]
    if res["__typename"] != ok:
        raise StackError(f"{field} refused: {res}")
    return res


def launch_run(dagster: Dagster, job: str) -> str:
    q = """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) { __typename
             ... on LaunchRunSuccess { run { runId } } ... on PythonError { message }
             ... on InvalidSubsetError { message } ... on RunConfigValidationInvalid { errors { message } } } }"""
    params = {"selector": {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "jobName": job},
              "runConfigData": {}}
    return _graphql_result(dagster.graphql(q, {"p": params}), "launchRun", "LaunchRunSuccess")["run"]["runId"]


def launch_backfill(dagster: Dagster, days: list[dt.date]) -> str:
    q = """mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) { __typename
             ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message }
             ... on PartitionSetNotFoundError { message } } }"""
    params = {"assetSelection": [{"path": ["daily_predictions"]}],
              "partitionNames": [d.isoformat() for d in days], "title": "prod-local backfill"}
    data = dagster.graphql(q, {"p": params})
    return _graphql_result(data, "launchPartitionBackfill", "LaunchBackfillSuccess")["backfillId"]


def stop_schedule(dagster: Dagster) -> None:
    """The UI's schedule toggle (off), so the daemon evaluates no tick before the model exists."""
    q = """query($s: ScheduleSelector!) { scheduleOrError(scheduleSelector: $s) { __typename
             ... on Schedule { scheduleState { id status } } ... on PythonError { message } } }"""
    sel = {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "scheduleName": SCHEDULE}
    state = _graphql_result(dagster.graphql(q, {"s": sel}), "scheduleOrError", "Schedule")["scheduleState"]
    m = """mutation($id: String!) { stopRunningSchedule(id: $id) { __typename
             ... on ScheduleStateResult { scheduleState { status } } ... on PythonError { message } } }"""
    res = _graphql_result(dagster.graphql(m, {"id": state["id"]}),
                          "stopRunningSchedule", "ScheduleStateResult")
    assert res["scheduleState"]["status"] == "STOPPED", res


def last_tick_time(cfg: SofarConfig, now: dt.datetime) -> dt.datetime:
    """The latest ``schedule_hour`` o'clock at or before ``now`` in the partitions' timezone."""
    local = now.astimezone(ZoneInfo(cfg.partitions.timezone))
    tick = local.replace(hour=cfg.partitions.schedule_hour, minute=0, second=0, microsecond=0)
    return tick if tick <= local else tick - dt.timedelta(days=1)


def start_schedule_before(instance, tick: dt.datetime) -> None:
    """Switch the schedule on with its start time one minute before ``tick`` (PostgreSQL's
    instigator state): the daemon's scheduler then finds exactly one due tick and evaluates it."""
    from dagster._core.scheduler.instigation import (
        InstigatorStatus,
        InstigatorType,
        ScheduleInstigatorData,
    )

    states = [s for s in instance.all_instigator_state(instigator_type=InstigatorType.SCHEDULE)
              if s.instigator_name == SCHEDULE]
    if len(states) != 1:
        raise StackError(f"expected one stored state of {SCHEDULE}, found {len(states)}")
    state = states[0]
    data = ScheduleInstigatorData(state.instigator_data.cron_schedule,
                                  start_timestamp=(tick - dt.timedelta(minutes=1)).timestamp())
    instance.update_instigator_state(state.with_status(InstigatorStatus.RUNNING).with_data(data))


def wait_runs(instance, run_ids: list[str], what: str, services) -> None:
    import dagster as dg

    t0 = time.monotonic()
    while True:
        for svc in services:
            svc.check()
        runs = [instance.get_run_by_id(r) for r in run_ids]
        if all(r.status in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE,
                            dg.DagsterRunStatus.CANCELED)
               for r in runs):
            break
        if time.monotonic() - t0 > RUN_TIMEOUT_S:
            raise StackError(f"{what}: not finished after {RUN_TIMEOUT_S} s")
        time.sleep(3)
    bad = [r for r in runs if r.status != dg.DagsterRunStatus.SUCCESS]
    for r in bad:
        failures = [e for e in instance.all_logs(r.run_id)
                    if e.dagster_event and e.dagster_event.is_step_failure]
        for e in failures:
            err = e.dagster_event.step_failure_data.error
            log(f"  {r.run_id[:8]} step {e.step_key} failed: {err.message.strip() if err else e.message}")
    log(f"{what}: {', '.join(f'{r.run_id[:8]} {r.status.value}' for r in runs)} "
        f"({time.monotonic() - t0:.0f} s)")
    if bad:
        raise StackError(f"{what}: {len(bad)} run(s) did not succeed")


def wait_for(predicate, timeout_s: float, what: str, services):
    t0 = time.monotonic()
    while True:
        for svc in services:
            svc.check()
        found = predicate()
        if found:
            return found
        if time.monotonic() - t0 > timeout_s:
            raise StackError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(3)


# --------------------------------------------------------------------------- checks


class Checks:
    def __init__(self):
        self.results: list[tuple[bool, str]] = []

    def __call__(self, ok: bool, what: str) -> bool:
        self.results.append((bool(ok), what))
        log(f"{'PASS' if ok else 'FAIL'}: {what}")
        return bool(ok)

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(ok for ok, _ in self.results)


def main() -> int:  # noqa: C901  (one linear story, easier to read top to bottom)
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    signal.signal(signal.SIGTERM, _on_sigterm)
    t_start = time.monotonic()
    cfg = load_config(CONFIG, check_paths=False)
    wh_cfg = cfg.storage.warehouse
    mlflow_port = urlparse(cfg.mlflow_tracking_uri).port
    bq_port = urlparse(wh_cfg.api_endpoint).port
    require_free(mlflow_port, "MLflow server (storage.mlflow.tracking_uri)")
    require_free(bq_port, "BigQuery emulator (storage.warehouse.api_endpoint)")
    cache_dir = Path(cfg.cache_dir)
    if cache_dir.exists():
        raise StackError(f"{cache_dir} exists: a previous prod-local did not finish cleaning up; delete it")
    # this machine's stand-ins for what pods mount or the image bakes; deleted at the end
    local_dirs = [cache_dir]
    weights = getattr(cfg, "weights_file", None)  # model.weights_file: baked into the image at build time
    if weights and not Path(weights).exists():
        import subprocess

        log(f"exporting the backbone's ImageNet weights to {weights} (the image's build step)")
        subprocess.run([sys.executable, "-m", "sofar_assets.cli", "export-weights", weights],
                       check=True, cwd=REPO)
        local_dirs.append(Path(weights).parent)

    import os

    stack = Stack(prefix="sofar-prod-local-")
    os.environ[MARKER] = stack.id  # every child (servers, code servers, run workers) carries it
    bq = None
    checks = Checks()
    summary: list[tuple[str, str, str]] = []
    try:
        from sofar_assets.lib.warehouse.bigquery import BigQueryWarehouse, emulator_client

        from bq_emulator import Emulator

        log(f"stack folder {stack.root}")
        pg = stack.postgres()
        log(f"PostgreSQL {pg.port} up (as {'nobody' if os.geteuid() == 0 else 'this user'})")
        gcs = stack.gcs()
        os.environ["STORAGE_EMULATOR_HOST"] = gcs.url  # google-cloud-storage in every process talks to it
        buckets = sorted({u[len("gs://"):].split("/")[0] for u in
                          [cfg.root, cfg.io_manager_base, MLFLOW_ARTIFACTS, UPLOADS_PREFIX,
                           *(t.folder for t in cfg.tasks.values() if t.folder),
                           *(o.folder for o in cfg.ood_sets.values())]})
        gcs.create_buckets(*buckets)
        log(f"GCS emulator {gcs.url} up, buckets {buckets}")
        bq = Emulator(project=wh_cfg.project)
        bq.port, bq.url = bq_port, wh_cfg.api_endpoint.rstrip("/")
        bq.start()
        bq_client = emulator_client(wh_cfg.project, bq.url, wh_cfg.location)
        bq_client.create_dataset(wh_cfg.dataset)  # created once here, as in production (no dataset per run)
        wh = BigQueryWarehouse(wh_cfg.project, wh_cfg.dataset, location=wh_cfg.location, client=bq_client,
                               partition_decorator=False)
        log(f"BigQuery emulator {bq.url} up, dataset {wh_cfg.project}.{wh_cfg.dataset}")

        now = dt.datetime.now(dt.UTC)
        tick = last_tick_time(cfg, now)
        schedule_day = tick.date() - dt.timedelta(days=1)  # the partition the tick materializes
        backfill_days = [schedule_day - dt.timedelta(days=i) for i in range(BACKFILL_DAYS, 0, -1)]
        per_day = upload_demo_data(cfg, gcs.client(), wh, schedule_day, stack.root)
        log(f"SYNTHETIC data uploaded: {sum(per_day.values())} uploads over {len(per_day)} days, "
            f"task images + OOD sets in gs://, label tables + image_uploads in BigQuery")

        ml = stack.mlflow(pg, gcs, MLFLOW_ARTIFACTS, port=mlflow_port)
        os.environ.update(ml.client_env())  # the pipeline's MLflow credentials: environment only
        log(f"MLflow server {ml.url} up (basic auth; backend PostgreSQL; artifacts -> {MLFLOW_ARTIFACTS})")

        dagster = Dagster(stack, pg, env={"SOFAR_CONFIG": str(CONFIG)})
        for pool, limit in POOLS.items():
            dagster.cli("instance", "concurrency", "set", pool, str(limit))
        dagster.start_webserver(free_port())
        log(f"Dagster webserver {dagster.url} up, code location loaded from {CONFIG.name}")
        stop_schedule(dagster)
        dagster.start_daemon()
        log("Dagster daemon up (scheduler, run queue, backfills, run monitoring)")
        instance = dagster.instance()
        services = list(stack.services)  # a dead server fails the wait at once, naming it

        t = time.monotonic()
        train = launch_run(dagster, "train_and_promote")
        log(f"train_and_promote submitted via GraphQL launchRun: {train}")
        wait_runs(instance, [train], "train_and_promote", services)
        t_train = time.monotonic() - t

        t = time.monotonic()
        backfill_id = launch_backfill(dagster, backfill_days)
        log(f"backfill {backfill_id} of {len(backfill_days)} days submitted "
            "via GraphQL launchPartitionBackfill")
        from dagster._core.execution.backfill import BulkActionStatus
        from dagster._core.storage.dagster_run import RunsFilter

        def backfill_done():
            b = instance.get_backfill(backfill_id)
            return b if b.status != BulkActionStatus.REQUESTED else None

        wait_for(backfill_done, RUN_TIMEOUT_S, "backfill", services)
        backfill_runs = [r.run_id
                         for r in instance.get_runs(RunsFilter(tags={"dagster/backfill": backfill_id}))]
        wait_runs(instance, backfill_runs, f"backfill ({len(backfill_runs)} runs)", services)
        t_backfill = time.monotonic() - t

        t = time.monotonic()
        start_schedule_before(instance, tick)
        log(f"{SCHEDULE} switched on with its start one minute before {tick:%Y-%m-%d %H:%M %Z}: "
            f"the daemon evaluates that tick (partition {schedule_day})")
        sched_filter = RunsFilter(tags={"dagster/schedule_name": SCHEDULE})
        sched_runs = wait_for(lambda: instance.get_runs(sched_filter), 600, "the schedule's tick", services)
        wait_runs(instance, [r.run_id for r in sched_runs], "schedule tick run", services)
        t_schedule = time.monotonic() - t

        # ----------------------------------------------------------------- checks
        counts = wh.query("SELECT prediction_date, count(*) AS n FROM {table:predictions} "
                          "GROUP BY prediction_date")
        stored = {pd.Timestamp(d).date(): int(n)
                  for d, n in zip(counts["prediction_date"], counts["n"], strict=True)}
        in_gcs = {day: len(gcs.objects(UPLOADS_PREFIX[len("gs://"):].split("/")[0],
                                       f"uploads/{day.isoformat()}/"))
                  for day in per_day}
        checks(stored == in_gcs and len(stored) == BACKFILL_DAYS + 1,
               "BigQuery rows per day == uploads in GCS per day, "
               f"{len(in_gcs)} days: {sum(stored.values())} rows")

        from mlflow import MlflowClient

        from sofar_assets.lib.serving import registry

        client = MlflowClient(tracking_uri=ml.url)
        champion = registry.champion_version(client, cfg.model.name)
        checks(champion is not None,
               f"MLflow server holds {cfg.model.name}@{registry.CHAMPION} -> v{champion}")
        anon = requests.post(f"{ml.url}/api/2.0/mlflow/registered-models/alias", timeout=30,
                             json={"name": cfg.model.name, "alias": registry.CHAMPION,
                                   "version": str(champion)})
        checks(anon.status_code == 401,
               f"anonymous request to move @champion refused: HTTP {anon.status_code}")
        artifacts = gcs.objects("sofar-ml", "mlartifacts/")
        checks(any(o.endswith(".safetensors") for o in artifacts),
               f"model artifacts in {MLFLOW_ARTIFACTS} via the server's proxy: {len(artifacts)} objects")
        io_bucket, _, io_prefix = cfg.io_manager_base[len("gs://"):].partition("/")
        io_objects = gcs.objects(io_bucket, io_prefix)
        checks(bool(io_objects), f"IO manager outputs in {cfg.io_manager_base}: {len(io_objects)} objects")

        expected = {train: "train_and_promote", **{r: "backfill" for r in backfill_runs},
                    **{r.run_id: "schedule" for r in sched_runs}}
        rows = pg.query("dagster", "SELECT run_id, pipeline_name, status FROM runs")
        in_pg = {run_id: status for run_id, _, status in rows}
        checks(all(in_pg.get(r) == "SUCCESS" for r in expected)
               and len(backfill_runs) >= 2 and len(sched_runs) == 1,
               f"Dagster runs in PostgreSQL, all SUCCESS: train 1, backfill {len(backfill_runs)}, "
               f"schedule {len(sched_runs)}")

        # ----------------------------------------------------------------- the preflight, as an operator runs it
        import subprocess

        # SOFAR_CONFIG: prod-local.yaml
        doc = subprocess.run([sys.executable, "-m", "sofar_assets.cli", "doctor"], cwd=REPO,
                             capture_output=True, text=True, timeout=600, env=stack.env(**dagster.env))
        for line in doc.stdout.splitlines():
            log(f"  sofar doctor | {line}")
        last = (doc.stdout.strip().splitlines() or [doc.stderr.strip()[-300:]])[-1]
        checks(doc.returncode == 0 and "Traceback" not in doc.stderr,
               f"sofar doctor against the stack: {last}")

        wall = time.monotonic() - t_start
        summary = [
            ("PostgreSQL", f"127.0.0.1:{pg.port} (uid nobody)",
             f"{len(rows)} Dagster runs; MLflow backend + auth stores"),
            ("Dagster webserver", dagster.url,
             "GraphQL: launchRun, launchPartitionBackfill, stopRunningSchedule"),
            ("Dagster daemon", "-",
             f"queued {len(expected)} runs, pools {POOLS}, run monitoring, 1 schedule tick"),
            ("MLflow server", ml.url,
             f"{cfg.model.name} v{champion} @{registry.CHAMPION}; basic auth (anonymous: 401)"),
            ("GCS emulator", gcs.url,
             f"{sum(len(gcs.objects(b)) for b in buckets)} objects in {', '.join(buckets)}"),
            ("BigQuery emulator", bq.url, "predictions rows per day: "
             + ", ".join(f"{d:%m-%d} {n}" for d, n in sorted(stored.items()))),
        ]
        log(f"timings: stack up + data {wall - t_train - t_backfill - t_schedule:.0f} s, train_and_promote "
            f"{t_train:.0f} s, backfill {t_backfill:.0f} s, schedule tick {t_schedule:.0f} s")
    except KeyboardInterrupt:
        log("interrupted: stopping the stack")
        checks(False, "interrupted")
    except StackError as exc:
        checks(False, str(exc))
    finally:
        if bq is not None:
            bq.stop()
        leftovers = stack.close()
        for pid, cmd in leftovers:
            log(f"killed a process that outlived its server: {pid} {cmd[:150]}")
        for folder in local_dirs:
            shutil.rmtree(folder, ignore_errors=True)
            if (folder.parent.name == "prod-local" and folder.parent.exists()
                    and not any(folder.parent.iterdir())):
                folder.parent.rmdir()
        checks(not leftovers,
               f"stack stopped: no process left ({len(leftovers)} killed), {stack.root} removed")
    wall = time.monotonic() - t_start
    print("\n=== make prod-local: production components, for real, on this machine ===")
    for name, endpoint, holds in summary:
        print(f"{name:<18} {endpoint:<34} {holds}")
    print(f"checks: {sum(ok for ok, _ in checks.results)}/{len(checks.results)} passed; "
          f"wall time {wall / 60:.1f} min")
    return 0 if checks.passed else 1


if __name__ == "__main__":
    sys.exit(main())
