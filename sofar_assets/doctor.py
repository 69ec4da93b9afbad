"""``sofar doctor``: a preflight of the configured environment, one line per check.

Run before the first run of a deployment (and after changing one): each line is ``OK`` with what
was found, or ``FAIL`` with what to do. Nothing is written: permissions are asked of IAM
(``testIamPermissions``), not tried on production tables. A check that raises becomes a FAIL
line naming the error (no traceback). ``--gpu`` adds a Kubernetes Job on the GPU node pool that
runs :func:`check_gpu_here` there (torch sees the GPU and runs one forward pass of the champion).

The clients are parameters so that tests can point the checks at the local stack (PostgreSQL,
MLflow server with basic auth, GCS and BigQuery emulators) and break one piece at a time.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from sofar_assets import settings
from sofar_assets.config import BigQueryTarget, SofarConfig
from sofar_assets.lib.data import storage
from sofar_assets.lib.serving import registry

STAGING_PERMISSIONS = ("storage.objects.create", "storage.objects.delete", "storage.objects.get",
                       "storage.objects.list")
LOAD_JOB_PERMISSIONS = ("bigquery.jobs.create",)  # on the project: a load job is a job
TABLE_PERMISSIONS = ("bigquery.tables.get", "bigquery.tables.getData", "bigquery.tables.update",
                     "bigquery.tables.updateData")  # WRITE_TRUNCATE into a partition + schema additions
DOCS = "docs/production.md"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'OK  ' if self.ok else 'FAIL'}  {self.name}: {self.detail}"


def _guard(name: str, fn: Callable[[], Check | list[Check]]) -> list[Check]:
    try:
        out = fn()
    except Exception as exc:  # a preflight reports, it does not crash
        text = str(getattr(exc, "description", None) or exc).strip().splitlines()
        return [Check(name, False, f"{type(exc).__name__}: {text[0] if text else ''}"[:400])]
    return out if isinstance(out, list) else [out]


# --------------------------------------------------------------------------- the checks


def check_timezone(cfg: SofarConfig) -> Check:
    tz = cfg.partitions.timezone
    ZoneInfo(tz)  # the config refuses unknown names; a missing tzdata in the image fails here
    now = dt.datetime.now(ZoneInfo(tz))
    return Check("time zone", True, f"partitions are {tz} days (now {now:%Y-%m-%d %H:%M %Z}); the schedule runs "
                                    f"at {cfg.partitions.schedule_hour:02d}:00 {tz}")


def _same_location(dataset: str, bucket: str) -> bool:
    """A load from gs:// needs the bucket in the dataset's location (or a region of its multi-region)."""
    d, b = dataset.lower(), bucket.lower()
    multi = {"us": "us-", "eu": "europe-"}
    return d == b or (d in multi and b.startswith(multi[d]))


def staging_bucket(cfg: SofarConfig) -> str | None:
    """The bucket day files are staged in before the load (``<storage.root>/staging``)."""
    return cfg.root[len("gs://"):].split("/")[0] if storage.is_gcs(cfg.root) else None


def check_warehouse(cfg: SofarConfig, bq_client) -> tuple[Check, str | None]:
    """The dataset exists and is where the config says; returns (check, its real location)."""
    wh = cfg.storage.warehouse
    if not isinstance(wh, BigQueryTarget):
        return Check("warehouse", True, f"DuckDB file {cfg.duckdb_path} (local)"), None
    from google.api_core.exceptions import NotFound

    loc = wh.location or "LOCATION"
    try:
        dataset = bq_client.get_dataset(f"{wh.project}.{wh.dataset}")
    except NotFound:
        return Check("warehouse", False, f"BigQuery dataset {wh.project}.{wh.dataset} does not exist: create it once "
                                         f"with `bq --location={loc} mk --dataset {wh.project}:{wh.dataset}`"), None
    actual = dataset.location
    if wh.location and actual and wh.location.lower() != actual.lower():
        return Check("warehouse", False, f"dataset {wh.project}.{wh.dataset} is in {actual}, but "
                                         f"storage.warehouse.location is {wh.location}: set it to {actual} (and "
                                         f"keep the staging bucket in {actual}), or recreate the dataset"), actual
    return Check("warehouse", True, f"dataset {wh.project}.{wh.dataset} exists in {actual}"), actual


def check_staging(cfg: SofarConfig, gcs_client, dataset_location: str | None) -> list[Check]:
    bucket_name = staging_bucket(cfg)
    if bucket_name is None:
        return [Check("staging bucket", True, f"local staging under {cfg.root}")]
    from google.api_core.exceptions import NotFound

    loc = dataset_location or "LOCATION"
    try:
        bucket = gcs_client.get_bucket(bucket_name)
    except NotFound:
        return [Check("staging bucket", False, f"gs://{bucket_name} (storage.root) does not exist: create it in the "
                                               f"dataset's location: `gcloud storage buckets create gs://{bucket_name} "
                                               f"--location={loc}`")]
    checks = []
    if settings.gcs_emulator_host():
        checks.append(Check("staging bucket", True, f"gs://{bucket_name} exists (GCS emulator: it keeps no "
                                                    "location, so the location match is not checked)"))
    elif dataset_location and not _same_location(dataset_location, bucket.location or ""):
        checks.append(Check("staging bucket", False, f"gs://{bucket_name} is in {bucket.location} but the dataset is "
                                                     f"in {dataset_location}: a load job reads gs:// only in its own "
                                                     f"location; stage in a bucket in {dataset_location}"))
    else:
        checks.append(Check("staging bucket", True, f"gs://{bucket_name} exists in {bucket.location}"))
    granted = set(bucket.test_iam_permissions(list(STAGING_PERMISSIONS)))
    missing = [p for p in STAGING_PERMISSIONS if p not in granted]
    checks.append(Check("staging permissions", not missing,
                        f"may create, read and delete objects in gs://{bucket_name}" if not missing else
                        f"missing {', '.join(missing)} on gs://{bucket_name}: grant roles/storage.objectAdmin on "
                        f"the bucket to the pods' service account ({DOCS})"))
    return checks


def check_bigquery_permissions(cfg: SofarConfig, session) -> Check:
    """``testIamPermissions`` for load jobs (project) and for writing the predictions table."""
    wh = cfg.storage.warehouse
    if not isinstance(wh, BigQueryTarget):
        return Check("warehouse permissions", True, "DuckDB: a local file")
    if wh.api_endpoint is not None:
        return Check("warehouse permissions", True, f"not checked: {wh.api_endpoint} is an emulator (no IAM)")
    missing = []
    r = session.post(f"https://cloudresourcemanager.googleapis.com/v3/projects/{wh.project}:testIamPermissions",
                     json={"permissions": list(LOAD_JOB_PERMISSIONS)}, timeout=30)
    r.raise_for_status()
    missing += [p for p in LOAD_JOB_PERMISSIONS if p not in r.json().get("permissions", [])]
    from sofar_assets.lib.warehouse import PREDICTIONS

    table = (f"https://bigquery.googleapis.com/bigquery/v2/projects/{wh.project}/datasets/{wh.dataset}/tables/"
             f"{PREDICTIONS.name}:testIamPermissions")
    r = session.post(table, json={"permissions": list(TABLE_PERMISSIONS)}, timeout=30)
    note = ""
    if r.status_code == 404:
        note = f" (table {PREDICTIONS.name} not created yet: its permissions come from the dataset's roles)"
    else:
        r.raise_for_status()
        missing += [p for p in TABLE_PERMISSIONS if p not in r.json().get("permissions", [])]
    if missing:
        return Check("warehouse permissions", False,
                     f"missing {', '.join(missing)}: grant roles/bigquery.jobUser on project {wh.project} and "
                     f"roles/bigquery.dataEditor on dataset {wh.dataset} to the pods' service account ({DOCS})")
    return Check("warehouse permissions", True, f"may run load jobs in {wh.project} and write "
                                                f"{wh.dataset}.{PREDICTIONS.name}{note}")


def check_mlflow(cfg: SofarConfig, client_factory: Callable[[], object]) -> list[Check]:
    """The server answers with the configured credentials; ``@champion`` resolves (or: none yet)."""
    uri = cfg.mlflow_tracking_uri
    try:
        client = client_factory()
        client.search_experiments(max_results=1)
    except Exception as exc:
        text = str(getattr(exc, "description", None) or exc)
        if any(s in text for s in ("401", "403", "Unauthorized", "credentials", "PERMISSION_DENIED")):
            return [Check("MLflow", False, f"{uri} refused the credentials: check MLFLOW_TRACKING_USERNAME / "
                                           "MLFLOW_TRACKING_PASSWORD (the sofar-mlflow Secret)")]
        raise
    checks = [Check("MLflow", True, f"{uri} answers with the configured credentials")]
    version = champion_version(client, cfg.model.name)
    checks.append(Check("champion", True, f"{cfg.model.name}@champion = version {version}" if version else
                        f"no champion yet for {cfg.model.name}: the first train_and_promote run promotes one"))
    return checks


def champion_version(client, name: str) -> str | None:
    """``@champion``'s version, or None. Asked by search first: with basic auth, the alias of a model
    that does not exist yet is a 403, not a 404."""
    if not client.search_registered_models(filter_string=f"name = '{name}'", max_results=1):
        return None
    return registry.champion_version(client, name)


def check_pools(instance, pools: Iterable[str]) -> list[Check]:
    """Each pool the code's ops use has a limit on the Dagster instance."""
    storage_ = instance.event_log_storage
    known = set(storage_.get_concurrency_keys())
    checks = []
    for pool in sorted(set(pools)):
        if pool not in known:
            checks.append(Check(f"pool {pool}", False, f"no limit on this Dagster instance: `dagster instance "
                                                       f"concurrency set {pool} N` ({DOCS} says how to size it)"))
            continue
        slots = storage_.get_concurrency_info(pool).slot_count
        checks.append(Check(f"pool {pool}", slots >= 1, f"limit {slots}" if slots >= 1 else
                            f"limit {slots}: nothing in this pool can run; `dagster instance concurrency set {pool} N`"))
    return checks


def code_pools(cfg: SofarConfig) -> set[str]:
    """The pools the ops of the code location use (from the Definitions, so a new pool is checked)."""
    from sofar_assets.definitions import build_definitions

    defs = build_definitions(cfg)
    pools = set()
    for job in defs.resolve_all_job_defs():
        for op_def in job.graph.iterate_op_defs():
            if op_def.pool:
                pools.add(op_def.pool)
    return pools


# --------------------------------------------------------------------------- wiring


def default_clients(cfg: SofarConfig) -> dict:
    """The clients the checks use, built as the pipeline builds them (config + environment)."""
    from sofar_assets.defs.resources import build_resources

    resources = build_resources(cfg)
    out: dict = {"mlflow": resources["mlflow_tracking"].client}
    wh = cfg.storage.warehouse
    if isinstance(wh, BigQueryTarget):
        out["bigquery"] = lambda: resources["warehouse"].client_context().__enter__()
        if wh.api_endpoint is None:
            def session():
                import google.auth
                from google.auth.transport.requests import AuthorizedSession

                credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
                return AuthorizedSession(credentials)
            out["iam_session"] = session
    if staging_bucket(cfg):
        out["gcs"] = storage.gcs_client
    return out


def run_checks(cfg: SofarConfig, *, clients: dict | None = None, instance=None,
               pools: Iterable[str] | None = None) -> list[Check]:
    """Every check, in the order a deployment is built; ``clients`` maps a name to a factory."""
    clients = default_clients(cfg) if clients is None else clients
    checks = _guard("time zone", lambda: check_timezone(cfg))
    location: list[str | None] = [None]

    def warehouse():
        check, location[0] = check_warehouse(cfg, clients["bigquery"]() if "bigquery" in clients else None)
        return check

    checks += _guard("warehouse", warehouse)
    if staging_bucket(cfg):
        checks += _guard("staging bucket", lambda: check_staging(cfg, clients["gcs"](), location[0]))
    checks += _guard("warehouse permissions", lambda: check_bigquery_permissions(
        cfg, clients["iam_session"]() if "iam_session" in clients else None))
    checks += _guard("MLflow", lambda: check_mlflow(cfg, clients["mlflow"]))

    def pool_checks():
        import dagster as dg

        inst = instance or dg.DagsterInstance.get()
        return check_pools(inst, code_pools(cfg) if pools is None else pools)

    checks += _guard("pools", pool_checks)
    return checks


def report(checks: list[Check], out) -> bool:
    for c in checks:
        print(c.line(), file=out)
    failed = [c for c in checks if not c.ok]
    print(f"{len(checks) - len(failed)} OK, {len(failed)} to fix", file=out)
    return not failed


# --------------------------------------------------------------------------- --gpu

GPU_JOB_NAME = "sofar-doctor-gpu"


def check_gpu_here(cfg: SofarConfig, client_factory: Callable[[], object]) -> list[Check]:
    """In the GPU pod: torch sees the GPU (else the named CUDA build and driver), and one forward
    pass of the champion runs on it (or, with no champion yet, of the untrained architecture)."""
    import time

    import torch

    from sofar_assets.lib.common.devices import gpu_missing_message

    if not torch.cuda.is_available():
        return [Check("GPU", False, gpu_missing_message())]
    device = torch.device("cuda")
    checks = [Check("GPU", True, f"{torch.cuda.get_device_name(0)}; torch {torch.__version__} built for CUDA "
                                 f"{torch.version.cuda}")]
    version = champion_version(client_factory(), cfg.model.name)
    if version is None:
        return [*checks, Check("forward pass", True, "no champion yet: nothing to run (train_and_promote first)")]
    from sofar_assets.lib.serving.packaging import load_registered

    model, _ = load_registered(registry.model_uri(cfg.model.name, version))
    model = model.to(device).eval()
    x = torch.rand(2, 3, cfg.model.image_size, cfg.model.image_size, device=device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(x)
    torch.cuda.synchronize()
    logits = out[0] if isinstance(out, list | tuple) else out
    return [*checks, Check("forward pass", bool(torch.isfinite(logits).all()),
                           f"{cfg.model.name} v{version} on {device}: logits {tuple(logits.shape)} in "
                           f"{time.perf_counter() - t0:.2f} s")]


def gpu_job(cfg: SofarConfig, image: str, *, namespace: str = "dagster", service_account: str = "dagster",
            config_path: str = "/app/config/prod.yaml") -> dict:
    """The Kubernetes Job ``sofar doctor --gpu`` submits: a step pod's GPU resources, node selector,
    tolerations and environment (defs/k8s.py), running ``sofar doctor --gpu-here``."""
    from sofar_assets.defs.k8s import K8S_CONFIG_TAG, step_tags

    step = step_tags(cfg, gpu=True, workers=0)[K8S_CONFIG_TAG]
    container = step["container_config"]
    pod = step["pod_spec_config"]
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": GPU_JOB_NAME, "namespace": namespace},
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": cfg.kubernetes.start_timeout_s + 600,  # start bound + the check itself
            "ttlSecondsAfterFinished": 600,
            "template": {"spec": {
                "restartPolicy": "Never",
                "serviceAccountName": service_account,
                "nodeSelector": pod.get("node_selector", {}),
                "tolerations": [{"key": t["key"], "operator": t["operator"], "effect": t["effect"]}
                                for t in pod.get("tolerations", [])],
                "containers": [{
                    "name": "doctor", "image": image,
                    "args": ["python", "-m", "sofar_assets.cli", "doctor", "--gpu-here"],
                    "env": [{"name": "SOFAR_CONFIG", "value": config_path},
                            *({"name": e["name"], "value": e["value"]} for e in container.get("env", []))],
                    "envFrom": [{"secretRef": {"name": "sofar-mlflow"}}],
                    "resources": {"requests": container["resources"]["requests"],
                                  "limits": container["resources"]["limits"]},
                }],
            }},
        },
    }


def run_gpu_job(cfg: SofarConfig, image: str, out) -> list[Check]:
    """Submit :func:`gpu_job`, wait for it (bounded by ``kubernetes.start_timeout_s``), relay its lines."""
    import time

    import kubernetes

    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    job = gpu_job(cfg, image)
    ns = job["metadata"]["namespace"]
    batch, core = kubernetes.client.BatchV1Api(), kubernetes.client.CoreV1Api()
    if _job_exists(batch, ns):  # the previous check's Job
        batch.delete_namespaced_job(GPU_JOB_NAME, ns, propagation_policy="Foreground")
    while _job_exists(batch, ns):
        time.sleep(2)
    batch.create_namespaced_job(ns, job)
    deadline = time.monotonic() + job["spec"]["activeDeadlineSeconds"] + 60
    while time.monotonic() < deadline:
        status = batch.read_namespaced_job_status(GPU_JOB_NAME, ns).status
        if status.succeeded or status.failed:
            break
        time.sleep(10)
    pods = core.list_namespaced_pod(ns, label_selector=f"job-name={GPU_JOB_NAME}").items
    if not pods:
        return [Check("GPU job", False, f"no pod was created for Job {GPU_JOB_NAME}: kubectl -n {ns} describe job "
                                        f"{GPU_JOB_NAME}")]
    pod = pods[0]
    if pod.status.phase == "Pending":
        from sofar_assets.defs.k8s import pod_waiting_reason

        return [Check("GPU job", False, f"pod {pod.metadata.name} never started: {pod_waiting_reason(pod)}")]
    logs = core.read_namespaced_pod_log(pod.metadata.name, ns)
    lines = [ln for ln in logs.splitlines() if ln.startswith(("OK  ", "FAIL"))]
    for ln in lines:
        print(f"  [gpu pod] {ln}", file=out)
    ok = pod.status.phase == "Succeeded" and bool(lines) and all(ln.startswith("OK") for ln in lines)
    return [Check("GPU job", ok, f"pod {pod.metadata.name} {pod.status.phase} on the GPU node pool" if ok else
                  f"pod {pod.metadata.name} {pod.status.phase}: see the [gpu pod] lines or kubectl -n {ns} logs "
                  f"{pod.metadata.name}")]


def _job_exists(batch, ns: str) -> bool:
    import kubernetes

    try:
        batch.read_namespaced_job(GPU_JOB_NAME, ns)
    except kubernetes.client.ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def main(cfg: SofarConfig, *, gpu: bool = False, gpu_here: bool = False, out=None) -> int:
    """``sofar doctor``: 0 when every check is OK, 1 otherwise (each line says what to do)."""
    import sys

    out = out or sys.stdout
    if gpu_here:
        clients = default_clients(cfg)
        return 0 if report(_guard("GPU", lambda: check_gpu_here(cfg, clients["mlflow"])), out) else 1
    checks = run_checks(cfg)
    if gpu:
        image = settings.current_image()
        if image is None:
            checks.append(Check("GPU job", False, "no image to run: set DAGSTER_CURRENT_IMAGE (the code server's "
                                                  "image; run `sofar doctor --gpu` in the user-code pod)"))
        else:
            checks += _guard("GPU job", lambda: run_gpu_job(cfg, image, out))
    return 0 if report(checks, out) else 1

