"""Production components for real (issue 9) and MLflow down (issue 11, item 7).

``stack`` tests start the real servers once (tests/stack_servers.py): PostgreSQL as an
unprivileged user, the GCS emulator, the MLflow tracking server with basic auth over
PostgreSQL with artifacts proxied into the emulator's bucket, and a Dagster instance on
PostgreSQL. The rest is cheap: the prod-local vs prod config diff, and MLflow fault injection.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from conftest import DAYS, _assets, write_config
from stack_servers import ARTIFACT_BUCKET, stack_servers  # noqa: F401  (the session fixture)

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- prod-local vs prod

# Every key where config/prod-local.yaml may differ from config/prod.yaml, and why. Anything
# else differing (the model recipe, partitions, gate, devices, workers...) fails the test.
ALLOWED_DIFFERENCES = {
    "storage.warehouse.api_endpoint": "endpoint: the BigQuery emulator instead of bigquery.googleapis.com",
    "storage.mlflow.tracking_uri": "endpoint: the MLflow server on loopback instead of the in-cluster service",
    "storage.cache": "endpoint: a folder on this machine instead of the ReadWriteMany volume mounted in pods",
    "model.weights_file": "where the image bakes the backbone's weights; prod-local exports the same file "
                          "(python -m sofar_assets.cli export-weights) into ../.sofar/prod-local",
    # the ONE non-endpoint difference: k8s_job_executor needs a cluster (one pod per step). Not
    # `multiprocess`: it spawns a fresh process per step (measured on the busy 2-core machine:
    # about 2 min per step to start, against seconds for the same steps in process).
    "storage.executor": "k8s cannot run without a cluster; prod-local runs the steps in the run worker",
}


def _flatten(d, prefix=""):
    out = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _config_keys(name: str) -> dict:
    return _flatten(yaml.safe_load((REPO / "config" / name).read_text()))


def test_prod_local_differs_from_prod_only_in_endpoints():
    from sofar_assets.config import load_config

    prod, local = _config_keys("prod.yaml"), _config_keys("prod-local.yaml")
    differing = {k for k in prod.keys() | local.keys() if prod.get(k, "<absent>") != local.get(k, "<absent>")}
    unexpected = differing - set(ALLOWED_DIFFERENCES)
    assert not unexpected, {k: (prod.get(k, "<absent>"), local.get(k, "<absent>")) for k in sorted(unexpected)}
    assert local["storage.executor"] in ("multiprocess", "in_process") and prod["storage.executor"] == "k8s"
    for key in differing - {"storage.executor", "storage.cache", "model.weights_file"}:  # endpoints: loopback here
        assert "127.0.0.1" in str(local[key]), (key, local[key])
    # both load; neither holds a credential (they come from the environment)
    for name, keys in (("prod.yaml", prod), ("prod-local.yaml", local)):
        load_config(REPO / "config" / name, check_paths=False)
        assert not [k for k in keys if any(w in k.lower() for w in ("password", "secret", "token", "credential"))]
        assert not [v for v in keys.values() if re.search(r"://[^/@\s]+@", str(v))], "user:pass@ in a URI"
    assert prod["model.pretrained"] is True  # prod fine-tunes pretrained weights (baked into the image)


# --------------------------------------------------------------------------- the real servers


@pytest.mark.stack
def test_postgres_runs_unprivileged(stack_servers):  # noqa: F811
    pid = stack_servers.pg.service.proc.pid
    uid = int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("Uid:")).split()[1])
    assert uid != 0, "PostgreSQL must not run as root"
    assert stack_servers.pg.query("postgres", "select 1") == [(1,)]


@pytest.mark.stack
def test_mlflow_server_auth_and_gcs_artifacts(stack_servers, monkeypatch):  # noqa: F811
    """log_and_register through the server lands artifacts in the GCS bucket; anonymous requests
    to move the champion alias get 401; the pipeline's user (from the environment) moves it."""
    import mlflow
    import torch

    from sofar_assets.defs.resources import MlflowResource
    from sofar_assets.lib.model.models import ModelSpec, build_model
    from sofar_assets.lib.serving import registry
    from sofar_assets.lib.serving.packaging import load_registered, log_and_register

    server = stack_servers.mlflow
    for key, value in server.client_env().items():
        monkeypatch.setenv(key, value)
    res = MlflowResource(tracking_uri=server.url, experiment="stack-test")
    experiment_id = res.setup()
    assert mlflow.get_experiment(experiment_id).artifact_location.startswith("mlflow-artifacts:")  # proxied

    spec = ModelSpec(num_classes=2, backbone="resnet10t", pretrained=False, image_size=32)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    with mlflow.start_run(experiment_id=experiment_id):
        info = log_and_register(model, spec, ["a", "b"], "stack-model")
    version = str(info["version"])

    objects = stack_servers.gcs.objects(ARTIFACT_BUCKET, "mlartifacts/")
    assert any(o.endswith("/MLmodel") for o in objects), objects
    assert any(o.endswith(".safetensors") for o in objects), objects

    alias_api = f"{server.url}/api/2.0/mlflow/registered-models/alias"
    body = {"name": "stack-model", "alias": registry.CHAMPION, "version": version}
    assert requests.post(alias_api, json=body, timeout=30).status_code == 401
    assert requests.post(alias_api, json=body, auth=(server.user, "wrong"), timeout=30).status_code == 401

    client = res.client()
    registry.set_champion(client, "stack-model", version)
    assert registry.champion_version(client, "stack-model") == version

    # the calibration goes into the version's package through the proxy (what the served model reads)
    registry.write_calibration(client, "stack-model", version, registry.Calibration("max_logit", 1.5, 0.25))
    loaded, meta = load_registered(f"models:/stack-model@{registry.CHAMPION}")  # bytes back through the proxy
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert meta["classes"] == ["a", "b"]
    assert meta["calibration"]["model_version"] == version and meta["calibration"]["temperature"] == 1.5
    assert meta["onnx_model"]


@pytest.mark.stack
def test_a_shard_reads_the_model_from_gcs_not_through_the_server(stack_servers, monkeypatch):  # noqa: F811
    """With storage.mlflow.artifacts_destination, a version the server stored through its proxy
    (mlflow-artifacts:/...) is read straight from the bucket: the same package, with the tracking
    server out of reach."""
    import mlflow
    import torch

    from sofar_assets.defs.resources import MlflowResource
    from sofar_assets.lib.model.models import ModelSpec, build_model
    from sofar_assets.lib.serving import registry
    from sofar_assets.lib.serving.packaging import load_registered, log_and_register

    from stack_servers import ARTIFACTS

    server = stack_servers.mlflow
    for key, value in server.client_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", stack_servers.gcs.url)
    res = MlflowResource(tracking_uri=server.url, experiment="stack-direct")
    experiment_id = res.setup()
    spec = ModelSpec(num_classes=2, backbone="resnet10t", pretrained=False, image_size=32)
    torch.manual_seed(1)
    model = build_model(spec).eval()
    with mlflow.start_run(experiment_id=experiment_id):
        version = str(log_and_register(model, spec, ["a", "b"], "stack-direct")["version"])
    client = res.client()
    assert registry.direct_source(client, "stack-direct", version) is None  # proxied, destination unknown
    source = registry.direct_source(client, "stack-direct", version, ARTIFACTS)
    assert source.startswith(f"{ARTIFACTS}/"), source
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri("http://127.0.0.1:9")  # nothing listens there: the server is not asked
    try:
        loaded, meta = load_registered(source)
    finally:
        mlflow.set_tracking_uri(previous)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert meta["classes"] == ["a", "b"]


@pytest.mark.stack
def test_dagster_instance_on_postgres_stores_a_run(stack_servers):  # noqa: F811
    import dagster as dg

    @dg.asset
    def stack_probe() -> int:
        return 1

    instance = stack_servers.dagster.instance()
    assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    result = dg.materialize([stack_probe], instance=instance)
    assert result.success
    fresh = dg.DagsterInstance.from_config(str(stack_servers.dagster.home))  # a second process's view
    assert fresh.get_run_by_id(result.run_id).status == dg.DagsterRunStatus.SUCCESS
    rows = stack_servers.pg.query("dagster", f"select status from runs where run_id = '{result.run_id}'")
    assert rows == [("SUCCESS",)]


def test_stack_close_leaves_no_process_and_no_folder():
    """A process that escaped into its own session still dies with the stack; the folder goes."""
    from sofar_assets.stack.servers import Stack, marked_processes

    stack = Stack(prefix="sofar-stack-test-")
    (stack.root / "data").write_text("x")
    escaped = subprocess.Popen(["sleep", "300"], env=stack.env(), start_new_session=True)  # its own session
    assert marked_processes(stack.id)
    leftovers = stack.close()
    assert escaped.pid in {pid for pid, _ in leftovers}
    escaped.wait(timeout=10)
    assert not marked_processes(stack.id)
    assert not stack.root.exists()


# --------------------------------------------------------------------------- MLflow down (issue 11.7)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


def _predict_one_day(cfg_path: Path):
    import dagster as dg

    from sofar_assets.config import load_config
    from sofar_assets.definitions import build_definitions

    defs = build_definitions(load_config(cfg_path))
    t0 = time.monotonic()
    result = dg.materialize(_assets(defs), selection="daily_predictions", partition_key=DAYS[0].isoformat(),
                            resources=defs.resources, instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    elapsed = time.monotonic() - t0
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert not result.success and failures
    data = failures[0].step_failure_data
    message = data.user_failure_data.description if data.user_failure_data else data.error.message
    return message, elapsed


def test_mlflow_server_down_fails_fast_with_one_line(tmp_path, demo_data, capsys):
    uri = f"http://127.0.0.1:{_closed_port()}"
    cfg = write_config(tmp_path, demo_data, storage={"root": str(tmp_path / "state"), "mlflow": {"tracking_uri": uri}})
    message, elapsed = _predict_one_day(cfg)
    with capsys.disabled():
        print(f"\nMLflow down: daily_predictions failed after {elapsed:.1f} s: {message}")
    assert uri in message and "not reachable" in message
    assert "\n" not in message.strip()
    assert elapsed < 60  # measured: about a second (mlflow's defaults took 4 min 13 s)


def test_missing_mlflow_db_is_an_error_not_a_new_registry(tmp_path, demo_data):
    cfg = write_config(tmp_path, demo_data, storage={"root": str(tmp_path / "state")})
    db = tmp_path / "state" / "mlflow.db"
    message, _ = _predict_one_day(cfg)
    assert str(db) in message and "run training first" in message
    assert not db.exists(), "a read path created an empty MLflow registry"
    assert not (tmp_path / "state" / "mlartifacts").exists()


def test_cli_summary_without_registry_says_so(tmp_path, demo_data):
    cfg = write_config(tmp_path, demo_data, storage={"root": str(tmp_path / "state")})
    out = subprocess.run([sys.executable, "-m", "sofar_assets.cli", "summary"],
                         env={**os.environ, "SOFAR_CONFIG": str(cfg), "PYTHONPATH": str(REPO)},
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "mlflow.db" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "state" / "mlflow.db").exists()



@pytest.mark.stack
@pytest.mark.bigquery
def test_a_day_staged_in_gcs_commits_into_the_bigquery_emulator(stack_servers, emulator, tmp_path, monkeypatch):  # noqa: F811
    """What prod-local's commit_days does: shard files staged under gs:// (the GCS emulator),
    then ONE replace_day into the BigQuery emulator (its staged write: it cannot read gs://)."""
    import uuid

    from test_warehouse_api import D1, rows, spooled

    from sofar_assets.lib.serving import daily
    from sofar_assets.lib.warehouse import PREDICTIONS, BigQueryWarehouse

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", stack_servers.gcs.url)
    bucket = f"staging-{uuid.uuid4().hex[:8]}"
    stack_servers.gcs.create_buckets(bucket)
    uris = []
    for k, ids in enumerate((["a", "b"], ["c"])):
        uri = f"gs://{bucket}/staging/predictions/{D1}/run/shard-{k}-of-2.parquet"
        daily.publish(spooled(tmp_path, D1, rows(D1, ids)), uri)
        uris.append(uri)
    wh = BigQueryWarehouse(emulator.project, f"sofar_{uuid.uuid4().hex[:8]}", client=emulator.client(),
                           partition_decorator=False)
    wh.ensure_dataset()
    assert wh.replace_day(PREDICTIONS, D1, uris) == 3
    assert wh.replace_day(PREDICTIONS, D1, uris) == 3  # a re-run replaces, never duplicates
    assert sorted(wh.read_table("predictions")["image_id"]) == ["a", "b", "c"]
