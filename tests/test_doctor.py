"""``sofar doctor`` (sofar_assets/doctor.py): against the real local stack, whole and broken.

The stack is the one of test_stack.py (PostgreSQL, MLflow server with basic auth, GCS emulator,
a Dagster instance on PostgreSQL) plus the BigQuery emulator. Each broken piece gives ONE clear
FAIL line saying what to do, and no traceback. IAM for BigQuery and the bucket's location cannot
be checked on emulators; those two paths are checked with fakes below.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import yaml

from sofar_assets import doctor
from sofar_assets.config import parse_config

from stack_servers import ARTIFACT_BUCKET, stack_servers  # noqa: F401  (the session fixture)

REPO = Path(__file__).resolve().parents[1]
POOLS = ("gpu", "warehouse_write")


def _raw(emulator, mlflow_url: str, **warehouse) -> dict:
    raw = yaml.safe_load((REPO / "config" / "prod-local.yaml").read_text())
    raw["storage"]["warehouse"].update(project=emulator.project, api_endpoint=emulator.url, **warehouse)
    raw["storage"]["mlflow"]["tracking_uri"] = mlflow_url
    raw["storage"]["root"] = f"gs://{ARTIFACT_BUCKET}/state"
    return raw


def _cfg(emulator, mlflow_url: str, **warehouse):
    return parse_config(_raw(emulator, mlflow_url, **warehouse), base_dir=REPO / "config")


@pytest.fixture
def stack_env(stack_servers, emulator, monkeypatch):  # noqa: F811
    from sofar_assets.lib.warehouse.bigquery import emulator_client

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", stack_servers.gcs.url)
    for key, value in stack_servers.mlflow.client_env().items():
        monkeypatch.setenv(key, value)
    client = emulator_client(emulator.project, emulator.url, "asia-northeast3")
    client.create_dataset("sofar", exists_ok=True)
    instance = stack_servers.dagster.instance()
    for pool in POOLS:
        instance.event_log_storage.set_concurrency_slots(pool, 1)
    return stack_servers, emulator, instance


def _lines(cfg, instance, pools=POOLS) -> tuple[bool, str]:
    out = io.StringIO()
    ok = doctor.report(doctor.run_checks(cfg, instance=instance, pools=pools), out)
    text = out.getvalue()
    assert "Traceback" not in text
    return ok, text


@pytest.mark.stack
def test_doctor_passes_against_the_stack_and_names_each_broken_piece(stack_env, monkeypatch, tmp_path):
    servers, emulator, instance = stack_env
    cfg = _cfg(emulator, servers.mlflow.url)
    ok, text = _lines(cfg, instance)
    assert ok, text
    assert "OK    warehouse: dataset sofar-test.sofar exists in asia-northeast3" in text
    assert f"OK    staging bucket: gs://{ARTIFACT_BUCKET} exists" in text
    assert "OK    staging permissions" in text and "OK    pool gpu: limit 1" in text
    assert "OK    champion: no champion yet for sofar-classifier" in text
    assert "OK    time zone: partitions are Asia/Seoul days" in text

    # the command itself, as an operator (and make prod-local) runs it: a process with the stack's environment
    import os
    import subprocess
    import sys

    raw = _raw(emulator, servers.mlflow.url)
    raw["model"].pop("weights_file")  # the image's file; not exported here
    config = tmp_path / "prod-local.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, **servers.dagster.env, "SOFAR_CONFIG": str(config), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "sofar_assets.cli", "doctor"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == "9 OK, 0 to fix" and "Traceback" not in done.stderr, done.stdout

    broken = {  # one piece broken at a time: (config / environment change, the line that must say so)
        "dataset location": (_cfg(emulator, servers.mlflow.url, location="US"),
                             "FAIL  warehouse: dataset sofar-test.sofar is in asia-northeast3, but "
                             "storage.warehouse.location is US"),
        "missing dataset": (_cfg(emulator, servers.mlflow.url, dataset="nope"),
                            "FAIL  warehouse: BigQuery dataset sofar-test.nope does not exist"),
        "missing bucket": (cfg.model_copy(update={"storage": cfg.storage.model_copy(
            update={"root": "gs://sofar-missing/state"})}),
            "FAIL  staging bucket: gs://sofar-missing (storage.root) does not exist: create it in the dataset's "
            "location: `gcloud storage buckets create gs://sofar-missing --location=asia-northeast3`"),
    }
    for what, (bad_cfg, line) in broken.items():
        ok, text = _lines(bad_cfg, instance)
        assert not ok and line in text, (what, text)
        assert text.count("FAIL") == 1, (what, text)

    ok, text = _lines(cfg, instance, pools=(*POOLS, "tradeoff_gpu"))
    assert not ok and "FAIL  pool tradeoff_gpu: no limit on this Dagster instance: `dagster instance concurrency " \
                      "set tradeoff_gpu N`" in text and text.count("FAIL") == 1

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
    ok, text = _lines(cfg, instance)
    assert not ok and "FAIL  MLflow: " in text and "refused the credentials" in text, text
    assert text.count("FAIL") == 1, text


def test_doctor_pools_come_from_the_code():
    from sofar_assets.config import load_config

    assert doctor.code_pools(load_config(REPO / "config" / "prod.yaml", check_paths=False)) == set(POOLS)


class _Response:
    def __init__(self, status: int, permissions=()):
        self.status_code, self._permissions = status, list(permissions)

    def raise_for_status(self):
        if self.status_code >= 400:
            raise RuntimeError(f"HTTP {self.status_code}")

    def json(self):
        return {"permissions": self._permissions}


class _IamSession:
    """The two testIamPermissions endpoints, answering with what the identity holds."""

    def __init__(self, held: set[str], table_exists=True):
        self.held, self.table_exists, self.asked = held, table_exists, []

    def post(self, url, json, timeout):
        self.asked.append(url)
        if "/tables/" in url and not self.table_exists:
            return _Response(404)
        return _Response(200, [p for p in json["permissions"] if p in self.held])


def test_bigquery_iam_is_asked_not_tried():
    cfg = parse_config(yaml.safe_load((REPO / "config" / "prod.yaml").read_text()), base_dir=REPO / "config")
    everything = set(doctor.LOAD_JOB_PERMISSIONS) | set(doctor.TABLE_PERMISSIONS)
    session = _IamSession(everything)
    assert doctor.check_bigquery_permissions(cfg, session).ok
    assert session.asked == [
        "https://cloudresourcemanager.googleapis.com/v3/projects/sofar-prod:testIamPermissions",
        "https://bigquery.googleapis.com/bigquery/v2/projects/sofar-prod/datasets/sofar/tables/predictions"
        ":testIamPermissions"]
    no_jobs = doctor.check_bigquery_permissions(cfg, _IamSession(everything - {"bigquery.jobs.create"}))
    assert not no_jobs.ok and "missing bigquery.jobs.create: grant roles/bigquery.jobUser" in no_jobs.detail
    fresh = doctor.check_bigquery_permissions(cfg, _IamSession(everything, table_exists=False))
    assert fresh.ok and "not created yet" in fresh.detail


def test_bucket_in_another_location_than_the_dataset(monkeypatch):
    from google.api_core.exceptions import NotFound

    cfg = parse_config(yaml.safe_load((REPO / "config" / "prod.yaml").read_text()), base_dir=REPO / "config")
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)

    class Bucket:
        def __init__(self, location):
            self.location = location

        def test_iam_permissions(self, permissions):
            return [p for p in permissions if p != "storage.objects.delete"]

    class Gcs:
        def __init__(self, location):
            self.location = location

        def get_bucket(self, name):
            if name != "sofar-ml":
                raise NotFound(name)
            return Bucket(self.location)

    where, perms = doctor.check_staging(cfg, Gcs("US"), "asia-northeast3")
    assert not where.ok and "gs://sofar-ml is in US but the dataset is in asia-northeast3" in where.detail
    assert not perms.ok and "missing storage.objects.delete on gs://sofar-ml" in perms.detail
    assert doctor.check_staging(cfg, Gcs("ASIA-NORTHEAST3"), "asia-northeast3")[0].ok
    assert doctor._same_location("US", "us-central1") and not doctor._same_location("asia-northeast3", "US")


def test_the_gpu_job_is_a_gpu_step_pod_running_doctor_gpu_here():
    import kubernetes

    cfg = parse_config(yaml.safe_load((REPO / "config" / "prod.yaml").read_text()), base_dir=REPO / "config")
    manifest = doctor.gpu_job(cfg, "asia-northeast3-docker.pkg.dev/sofar-prod/sofar/sofar-assets:abc")
    api = kubernetes.client.ApiClient()
    job = api._ApiClient__deserialize(manifest, "V1Job")  # camelCase as kubectl would send it
    assert isinstance(job, kubernetes.client.V1Job)
    pod = job.spec.template.spec
    c = pod.containers[0]
    assert c.args[-2:] == ["doctor", "--gpu-here"] and c.resources.limits["nvidia.com/gpu"] == "1"
    assert pod.node_selector == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert {e.name: e.value for e in c.env}["SOFAR_REQUIRE_GPU"] == "1"
    assert job.spec.active_deadline_seconds <= cfg.kubernetes.start_timeout_s + 600


def test_gpu_here_without_cuda_is_one_fail_line_naming_the_build(monkeypatch):
    import torch

    cfg = parse_config(yaml.safe_load((REPO / "config" / "prod.yaml").read_text()), base_dir=REPO / "config")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (check,) = doctor.check_gpu_here(cfg, lambda: None)
    assert not check.ok and f"built for CUDA {torch.version.cuda}" in check.detail
    out = io.StringIO()  # what the --gpu Job's pod runs and prints
    assert doctor.main(cfg, gpu_here=True, out=out) == 1
    assert out.getvalue().startswith("FAIL  GPU: this step was given a GPU") and "Traceback" not in out.getvalue()


def test_sofar_doctor_locally_says_what_to_do_without_a_traceback(tmp_path, demo_data, monkeypatch, capsys):
    """The CLI hook on the demo setup: DuckDB, a sqlite registry that does not exist yet, and a fresh
    Dagster instance without pool limits: exit 1, one FAIL line per pool, nothing raised."""
    from sofar_assets.cli import main

    from conftest import write_config

    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry: {enabled: false}\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("SOFAR_CONFIG", str(write_config(tmp_path, demo_data)))
    assert main(["doctor"]) == 1
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    assert "OK    warehouse: DuckDB file" in out.out and "OK    time zone: partitions are UTC days" in out.out
    assert "FAIL  pool gpu: no limit on this Dagster instance: `dagster instance concurrency set gpu N`" in out.out
    assert "FAIL  pool warehouse_write: no limit" in out.out
