"""Kubernetes, rendered and asserted (no cluster here).

Every step's Kubernetes Job of the PRODUCTION Definitions is rendered the way dagster-k8s'
``k8s_job_executor`` renders it: a real ``K8sRunLauncher`` built from the run-launcher config
the Dagster chart writes from deploy/helm/values.yaml, ``K8sContainerContext.create_for_run``,
the step's op tags merged on top, ``construct_dagster_k8s_job``. The assertions are generic over
all nodes of all jobs: a step another engineer adds is covered without touching this file.
The Helm values are validated against the chart's own values.schema.json (tests/data/helm).
The Dockerfile is parsed, not built (no Docker engine here); its weights-export step is run.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shlex
import stat
from pathlib import Path

import dagster as dg
import jsonschema
import kubernetes
import numpy as np
import pytest
import torch
import yaml
from dagster._config import process_config, validate_config
from dagster._core.execution.api import create_execution_plan
from dagster._core.instance.config import dagster_instance_config_schema
from dagster_k8s import K8sRunLauncher
from dagster_k8s.container_context import K8sContainerContext
from dagster_k8s.job import (
    UserDefinedDagsterK8sConfig,
    construct_dagster_k8s_job,
    get_user_defined_k8s_config,
)
from dagster_k8s.models import k8s_model_from_dict, k8s_snake_case_dict
from kubernetes.utils import parse_quantity

from sofar_assets.config import ConfigError, load_config, parse_config
from sofar_assets.definitions import build_definitions
from sofar_assets.defs.data import DECODE_THREADS
from sofar_assets.defs.k8s import (
    GPU_RESOURCE,
    K8S_CONFIG_TAG,
    PREFETCH_FACTOR,
    REQUIRE_GPU_ENV,
    RUNS_MODEL_TAG,
    START_TIMEOUT_ANNOTATION,
    step_k8s_config,
    step_tags,
)
from sofar_assets.lib.serving import gke

ROOT = Path(__file__).resolve().parents[1]
PROD_CONFIG = ROOT / "config" / "prod.yaml"
HELM_VALUES = ROOT / "deploy" / "helm" / "values.yaml"
CHART_SCHEMA = ROOT / "tests" / "data" / "helm" / "values.schema.json"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
CACHE_PVC = ROOT / "deploy" / "k8s" / "cache-pvc.yaml"
RELEASE = "dagster"  # helm upgrade --install dagster dagster/dagster ...
IMAGE = "asia-northeast3-docker.pkg.dev/sofar-prod/sofar/sofar-assets:abc123"
JOBS = ("train_and_promote", "daily_predictions_job")
TRAIN_STEP = "sofar_classifier"  # trains with train.*; every other model step runs inference.*


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cfg():
    return load_config(PROD_CONFIG, check_paths=False)


@pytest.fixture(scope="module")
def defs(cfg):
    return build_definitions(cfg)


@pytest.fixture(scope="module")
def values():
    return yaml.safe_load(HELM_VALUES.read_text())


def chart_run_launcher_config(values: dict, kubeconfig: Path) -> dict:
    """dagster.yaml's ``run_launcher.config`` as the chart's instance ConfigMap writes it from the
    values (helm/dagster/templates/helpers/instance/_run-launcher.tpl: the `DAGSTER_*` env sources
    resolved to the chart's names for release ``dagster``). No cluster here: a kubeconfig file
    stands in for ``load_incluster_config``."""
    k8s = values["runLauncher"]["config"]["k8sRunLauncher"]
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    return {
        "load_incluster_config": False,
        "kubeconfig_file": str(kubeconfig),
        "job_namespace": k8s.get("jobNamespace") or "dagster",
        "image_pull_policy": k8s["imagePullPolicy"],
        "service_account_name": values["serviceAccount"]["name"],
        "dagster_home": "/opt/dagster/dagster_home",
        "instance_config_map": f"{RELEASE}-instance",
        "postgres_password_secret": values["global"]["postgresqlSecretName"],
        "env_config_maps": [f"{RELEASE}-pipeline-env", *(c["name"] for c in k8s["envConfigMaps"])],
        "env_secrets": [s["name"] for s in k8s["envSecrets"]],
        "env_vars": list(k8s["envVars"]),
        "volume_mounts": list(k8s["volumeMounts"]),
        "volumes": list(k8s["volumes"]),
        "labels": dict(k8s.get("labels") or {}),
        "resources": dict(k8s.get("resources") or {}),
        "fail_pod_on_run_failure": bool(k8s.get("failPodOnRunFailure")),
    }


@pytest.fixture(scope="module")
def launcher(values, tmp_path_factory):
    kubeconfig = tmp_path_factory.mktemp("kube") / "config"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443"}}],
        "users": [{"name": "u", "user": {"token": "not-a-cluster"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
    }))
    processed = process_config(K8sRunLauncher.config_type(), chart_run_launcher_config(values, kubeconfig))
    assert processed.success, processed.errors
    return K8sRunLauncher(**processed.value)


# --------------------------------------------------------------------------- rendering


def render_step(launcher: K8sRunLauncher, job_name: str, step, cfg=None) -> kubernetes.client.V1Job:
    """The Job ``K8sStepHandler.launch_step`` creates for ``step`` (dagster_k8s/executor.py): the run
    launcher's config, then the executor's ``step_k8s_config`` (``sofar_k8s_executor``), then the op tags."""
    run = dg.DagsterRun(job_name=job_name, run_id="0123456789abcdef")
    cfg = cfg or load_config(PROD_CONFIG, check_paths=False)
    context = K8sContainerContext.create_for_run(run, launcher, include_run_tags=False)
    context = context.merge(K8sContainerContext(run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(
        step_k8s_config(cfg))))
    context = context.merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(step.tags)))
    return construct_dagster_k8s_job(
        job_config=context.get_k8s_job_config(IMAGE, launcher),
        args=["dagster", "api", "execute_step"],
        job_name=f"dagster-step-{abs(hash(step.key)) % 10**12}",
        component="step_worker",
        user_defined_k8s_config=context.run_k8s_config,
        labels={"dagster/job": job_name, "dagster/op": step.key, "dagster/run-id": run.run_id},
        env_vars=[{"name": "DAGSTER_RUN_JOB_NAME", "value": job_name},
                  {"name": "DAGSTER_RUN_STEP_KEY", "value": step.key}],
    )


def render_run(launcher: K8sRunLauncher, job_name: str) -> kubernetes.client.V1Job:
    """The run pod's Job (``K8sRunLauncher.launch_run``: run tags included)."""
    run = dg.DagsterRun(job_name=job_name, run_id="0123456789abcdef")
    context = K8sContainerContext.create_for_run(run, launcher, include_run_tags=True)
    return construct_dagster_k8s_job(
        job_config=context.get_k8s_job_config(IMAGE, launcher),
        args=["dagster", "api", "execute_run"],
        job_name="dagster-run-0123456789abcdef",
        component="run_worker",
        user_defined_k8s_config=context.run_k8s_config,
        labels={"dagster/job": job_name, "dagster/run-id": run.run_id},
    )


def prod_steps(defs):
    """(job name, execution step, required resource keys) for every step of every prod job."""
    out = []
    for job_name in JOBS:
        job_def = defs.resolve_job_def(job_name)
        for step in create_execution_plan(job_def).steps:
            node = job_def.get_node(step.node_handle)
            out.append((job_name, step, set(node.definition.required_resource_keys)))
    return out


def _env(container) -> dict[str, str]:
    return {e.name: e.value for e in container.env or []}


def _secret_refs(container) -> set[str]:
    return {f.secret_ref.name for f in container.env_from or [] if f.secret_ref is not None}


def _mounted(job: kubernetes.client.V1Job, path: str):
    """The pod volume mounted at ``path`` in the dagster container, or None."""
    spec = job.spec.template.spec
    mount = next((m for m in spec.containers[0].volume_mounts or [] if m.mount_path == path), None)
    if mount is None:
        return None
    matches = [v for v in spec.volumes or [] if v.name == mount.name]
    assert len(matches) == 1, f"volume {mount.name!r} defined {len(matches)} times"
    return matches[0]


def step_problems(cfg, defs, launcher, steps=None) -> list[str]:
    """Everything wrong with the rendered step Jobs; empty when every pod gets what it uses.

    A step that needs the image store reads images; one that needs the image store AND the MLflow
    registry runs a model (it loads a version and feeds it images). Those facts come from the
    ops' resource requirements, not from the tags under test, so an op added without
    ``step_tags`` is caught.
    """
    problems = []
    config_path = _env_value_in_values(yaml.safe_load(HELM_VALUES.read_text()), "SOFAR_CONFIG")
    for job_name, step, resources in steps if steps is not None else prod_steps(defs):
        job = render_step(launcher, job_name, step)
        pod = job.spec.template.spec
        container = pod.containers[0]
        where = f"{job_name}/{step.key}"
        if _env(container).get("SOFAR_CONFIG") != config_path:
            problems.append(f"{where}: SOFAR_CONFIG is {_env(container).get('SOFAR_CONFIG')!r}, "
                            f"not {config_path!r}")
        if "sofar-mlflow" not in _secret_refs(container):
            problems.append(f"{where}: the MLflow credentials secret is not in envFrom")
        # a step that loads a registered model AND reads data (images via the store or the warehouse)
        # runs the model; champion_model only talks to the registry; plan_shards lists the day's
        # uploads (warehouse) and resolves the champion (registry) but loads no model; score_shard
        # reads its manifest slices' images through lib/data/storage (no resource)
        runs_model = (("mlflow_tracking" in resources and bool({"image_store", "warehouse"} & resources)
                       and not step.key.endswith(".plan_shards")) or step.key.endswith(".score_shard[?]"))
        reads_images = "image_store" in resources or runs_model
        if runs_model != (step.tags.get(RUNS_MODEL_TAG) == "true"):
            problems.append(f"{where}: runs a model={runs_model} "
                            f"but tag {RUNS_MODEL_TAG}={step.tags.get(RUNS_MODEL_TAG)!r}")
        if not reads_images:
            continue
        training = step.key == TRAIN_STEP
        if runs_model:
            settings = cfg.train if training else cfg.inference
            workers, batch, device = settings.num_workers, settings.batch_size, settings.device
        else:
            workers, batch, device = DECODE_THREADS, 1, "cpu"
        requests = container.resources.requests or {}
        limits = container.resources.limits or {}
        if runs_model and device in ("auto", "cuda"):
            if requests.get(GPU_RESOURCE) != "1" or limits.get(GPU_RESOURCE) != "1":
                problems.append(f"{where}: device {device!r} but no {GPU_RESOURCE} request and limit of 1")
            if not pod.tolerations or not any(t.key == GPU_RESOURCE for t in pod.tolerations):
                problems.append(f"{where}: no toleration for the GPU nodes' {GPU_RESOURCE} taint")
            if not (pod.node_selector or {}).items() >= cfg.kubernetes.gpu_node_selector.items():
                problems.append(f"{where}: not scheduled onto GPU nodes (node selector {pod.node_selector})")
        shm = _mounted(job, "/dev/shm")
        shm_bytes = 0
        if shm is None or shm.empty_dir is None or shm.empty_dir.medium != "Memory":
            problems.append(f"{where}: /dev/shm is not a memory-backed emptyDir")
        else:
            shm_bytes = int(parse_quantity(shm.empty_dir.size_limit))
            batches = workers * PREFETCH_FACTOR * batch * 3 * cfg.model.image_size**2
            if shm_bytes < batches:
                problems.append(f"{where}: /dev/shm {shm.empty_dir.size_limit} < {batches} "
                                "bytes of worker batches")
        if int(parse_quantity(requests.get("cpu", "0"))) < workers + 1:
            problems.append(f"{where}: cpu request {requests.get('cpu')} < {workers} workers + 1")
        if int(parse_quantity(requests.get("memory", "0"))) < shm_bytes + (workers + 1) * 2**29:
            problems.append(f"{where}: memory request {requests.get('memory')} "
                            f"does not cover shm + {workers + 1} processes")
        cache = _mounted(job, cfg.cache_dir)
        if cache is None or cache.persistent_volume_claim is None:
            problems.append(f"{where}: the cache volume is not mounted at {cfg.cache_dir}")
        elif cache.persistent_volume_claim.claim_name != cfg.kubernetes.cache_claim:
            problems.append(f"{where}: cache claim {cache.persistent_volume_claim.claim_name!r} is not "
                            f"kubernetes.cache_claim {cfg.kubernetes.cache_claim!r}")
        else:
            problems += [f"{where}: {p}" for p in cache_problems(cfg, job, cache.name)]
    return problems


def _dockerfile_uid() -> int:
    return int(re.search(r"useradd [^\n]*--uid (\d+)", DOCKERFILE.read_text()).group(1))


def cache_problems(cfg, job, volume: str) -> list[str]:
    """The cache share is root-owned NFS (Filestore) and fsGroup does not apply to NFS: the step
    container (the image's non-root user) must mount a folder that an init container running as
    root created and gave to that user, on the same volume, before the step starts."""
    pod = job.spec.template.spec
    uid = _dockerfile_uid()
    mount = next(m for m in pod.containers[0].volume_mounts if m.name == volume)
    if not mount.sub_path:
        return [f"the cache share's root is mounted at {mount.mount_path}: "
                f"uid {uid} cannot write a fresh share"]
    for init in pod.init_containers or []:
        share = next((m for m in init.volume_mounts or [] if m.name == volume and not m.sub_path), None)
        if share is None:
            continue
        folder = f"{share.mount_path.rstrip('/')}/{mount.sub_path}"
        script = " ".join(init.command or []) + " " + " ".join(init.args or [])
        runs_as = init.security_context.run_as_user if init.security_context else None
        if runs_as != 0:
            return [f"init container {init.name} runs as {runs_as}, not root: it cannot chown on the share"]
        if f"mkdir -p {folder}" not in script or f"chown {uid}:{uid} {folder}" not in script:
            return [f"init container {init.name} does not create {folder} owned by {uid}: {script!r}"]
        return []
    return [f"no init container creates the cache folder {mount.sub_path!r} on the share"]


def _env_value_in_values(values: dict, name: str) -> str | None:
    for item in values["runLauncher"]["config"]["k8sRunLauncher"]["envVars"]:
        key, _, value = item.partition("=")
        if key == name:
            return value
    return None


# --------------------------------------------------------------------------- the prod step pods


def test_every_prod_step_pod_gets_what_it_uses(cfg, defs, launcher):
    steps = prod_steps(defs)
    keys = {s.key for _, s, _ in steps}
    assert {"sofar_classifier", "ood_calibration", "model_evaluation", "daily_predictions.score_shard[?]",
            "sofar_dataset", "champion_model"} <= keys
    assert {f"raw_labels__{t}" for t in cfg.tasks} <= keys
    assert step_problems(cfg, defs, launcher, steps) == []


def test_model_steps_on_cuda_request_a_gpu_on_a_gpu_node(cfg, defs, launcher):
    assert {cfg.train.device, cfg.inference.device} <= {"auto", "cuda"}  # prod: CUDA in a GPU pod
    rendered = {s.key: render_step(launcher, j, s) for j, s, _ in prod_steps(defs)}
    for key in ("sofar_classifier", "ood_calibration", "model_evaluation",
                "daily_predictions.score_shard[?]"):
        pod = rendered[key].spec.template.spec
        assert pod.containers[0].resources.limits[GPU_RESOURCE] == "1", key
        assert pod.node_selector == {"cloud.google.com/gke-accelerator": "nvidia-l4"}, key
    for key in ("sofar_dataset", "champion_model", "raw_labels__defect"):
        assert GPU_RESOURCE not in (rendered[key].spec.template.spec.containers[0].resources.limits or {}), key
    # 6 DataLoader workers of 16 x 224 x 224 x 3 uint8 batches: above Kubernetes' 64 MB default shm
    train = rendered["sofar_classifier"]
    assert int(parse_quantity(_mounted(train, "/dev/shm").empty_dir.size_limit)) > 64 * 2**20
    assert int(parse_quantity(train.spec.template.spec.containers[0].resources.requests["cpu"])) == 7


def test_a_model_step_added_without_gpu_tags_fails_the_check(cfg, defs, launcher):
    """What the `scale` engineer's shard ops must not do: run a model in a pod without a GPU."""

    @dg.asset(required_resource_keys={"image_store", "mlflow_tracking"})
    def predictions_shard_0():
        """A stand-in shard op: loads the champion and scores images, but forgot step_tags."""

    @dg.asset(required_resource_keys={"image_store", "mlflow_tracking"},
              op_tags=step_tags(cfg, gpu=True, workers=cfg.inference.num_workers))
    def predictions_shard_1():
        """The same op with the tags the shard ops use."""

    job = dg.define_asset_job("shards", selection=["predictions_shard_0", "predictions_shard_1"])
    extra = dg.Definitions(assets=[predictions_shard_0, predictions_shard_1], jobs=[job],
                           resources=dict(defs.resources))
    job_def = extra.resolve_job_def("shards")
    steps = [("shards", s, set(job_def.get_node(s.node_handle).definition.required_resource_keys))
             for s in create_execution_plan(job_def).steps]
    problems = step_problems(cfg, defs, launcher, steps)
    assert problems and all(p.startswith("shards/predictions_shard_0:") for p in problems), problems
    assert any("no nvidia.com/gpu" in p for p in problems) and any("/dev/shm" in p for p in problems)


def test_a_cpu_configured_model_step_asks_for_no_gpu(cfg):
    cpu = cfg.model_copy(update={"inference": cfg.inference.model_copy(update={"device": "cpu"})})
    tags = step_tags(cpu, gpu=True, workers=4)
    resources = tags[K8S_CONFIG_TAG]["container_config"]["resources"]
    assert (GPU_RESOURCE not in resources["requests"]
            and "node_selector" not in tags[K8S_CONFIG_TAG]["pod_spec_config"])
    assert tags[RUNS_MODEL_TAG] == "true" and parse_quantity(resources["requests"]["cpu"]) == 5


def test_the_run_pod_gets_the_config_and_secrets_too(launcher, values):
    for job_name in JOBS:
        container = render_run(launcher, job_name).spec.template.spec.containers[0]
        assert _env(container)["SOFAR_CONFIG"] == "/app/config/prod.yaml"
        assert {"sofar-mlflow"} <= _secret_refs(container)
        assert container.image == IMAGE and container.args[:2] == ["dagster", "api"]
    # the code server gets the same config path, and the image copies config/ there
    user = values["dagster-user-deployments"]["deployments"][0]
    assert {"name": "SOFAR_CONFIG", "value": "/app/config/prod.yaml"} in user["env"]
    assert (ROOT / "config" / "prod.yaml").is_file() and "COPY config /app/config" in DOCKERFILE.read_text()


def test_step_config_keys_are_real_kubernetes_fields(cfg):
    """dagster-k8s builds the pod through the kubernetes client's models: an unknown key raises."""
    config = step_tags(cfg, gpu=True, workers=8)[K8S_CONFIG_TAG]
    for volume in config["pod_spec_config"]["volumes"]:
        k8s_model_from_dict(kubernetes.client.V1Volume, volume)
    bad = {"name": "dshm", "empty_dir": {"medium": "Memory", "sizeLimit_typo": "1Gi"}}
    with pytest.raises(Exception, match="sizeLimit_typo"):
        k8s_model_from_dict(kubernetes.client.V1Volume, k8s_snake_case_dict(kubernetes.client.V1Volume, bad))


def test_cache_claim_manifest_matches_the_config(cfg):
    manifest = yaml.safe_load(CACHE_PVC.read_text())
    pvc = k8s_model_from_dict(kubernetes.client.V1PersistentVolumeClaim,
                              k8s_snake_case_dict(kubernetes.client.V1PersistentVolumeClaim, manifest))
    assert pvc.metadata.name == cfg.kubernetes.cache_claim and pvc.spec.access_modes == ["ReadWriteMany"]


# --------------------------------------------------------------------------- the chart's schema


def _chart_schema() -> dict:
    """The chart's schema with its remote Kubernetes ``$ref``s (kubernetes-json-schema URLs, not
    reachable offline) left open; the Kubernetes objects are checked by the kubernetes client's
    models when the Jobs are rendered instead. Everything else is the chart's, unchanged."""

    def drop_remote_refs(node):
        if isinstance(node, dict):
            return {k: drop_remote_refs(v) for k, v in node.items()
                    if not (k == "$ref" and str(v).startswith("https://"))}
        if isinstance(node, list):
            return [drop_remote_refs(v) for v in node]
        return node

    return drop_remote_refs(json.loads(CHART_SCHEMA.read_text()))


# Sections this file sets completely: validated with every `required` of the chart's schema.
FULL_SECTIONS = ("serviceAccount", "postgresql", "dagster-user-deployments", "runLauncher", "concurrency",
                 "telemetry", "generatePostgresqlPasswordSecret")


def test_helm_values_validate_against_the_charts_schema(values):
    schema = _chart_schema()
    assert schema["title"] == "DagsterHelmValues"
    for section in FULL_SECTIONS:
        narrowed = {**schema, "required": [section]}
        jsonschema.Draft202012Validator(narrowed).validate({section: values[section]})
    # Helm validates the chart's defaults merged with this file; those defaults are not stored
    # here, so the whole file is checked with `required` relaxed: every key must be a chart key
    # of the right type (additionalProperties: false catches misspellings).
    relaxed(schema).validate(values)
    assert set(values) <= set(schema["properties"])
    misspelled = {**values, "dagsterDaemon": {**values["dagsterDaemon"], "runMonitorng": {"enabled": True}}}
    with pytest.raises(jsonschema.ValidationError, match="runMonitorng"):
        relaxed(schema).validate(misspelled)


def relaxed(schema: dict) -> jsonschema.Validator:
    return jsonschema.validators.extend(jsonschema.Draft202012Validator,
                                        {"required": lambda *_: iter(())})(schema)


def test_the_schema_check_catches_a_misspelled_launcher_key(values):
    broken = json.loads(json.dumps(values))
    launcher = broken["runLauncher"]["config"]["k8sRunLauncher"]
    launcher["envVar"] = launcher.pop("envVars")
    schema = {**_chart_schema(), "required": ["runLauncher"]}
    with pytest.raises(jsonschema.ValidationError, match="envVar"):
        jsonschema.Draft202012Validator(schema).validate({"runLauncher": broken["runLauncher"]})


def test_instance_settings_are_valid_dagster_instance_config(values):
    """The queue, pools and run monitoring as the chart writes them into dagster.yaml, checked
    against Dagster 1.13.27's own instance schema."""
    snake = lambda d: {re.sub(r"(?<!^)(?=[A-Z])", "_", k).lower(): v for k, v in d.items()}  # noqa: E731
    monitoring = values["dagsterDaemon"]["runMonitoring"]
    concurrency = values["concurrency"]
    instance = {
        "run_monitoring": snake(monitoring),
        "concurrency": {"pools": snake(concurrency["pools"]),
                        "runs": {"max_concurrent_runs": concurrency["runs"]["maxConcurrentRuns"],
                                 "tag_concurrency_limits": concurrency["runs"]["tagConcurrencyLimits"]}},
    }
    result = validate_config(dagster_instance_config_schema(), instance)
    assert result.success, result.errors
    assert (monitoring["enabled"] and monitoring["startTimeoutSeconds"] > 0
            and monitoring["maxResumeRunAttempts"] > 0)
    assert values["dagsterDaemon"]["runCoordinator"]["type"] == "QueuedRunCoordinator"
    assert concurrency["enabled"] and concurrency["pools"]["defaultLimit"] >= 1
    sa = values["serviceAccount"]["annotations"]["iam.gke.io/gcp-service-account"]
    assert sa.endswith(".iam.gserviceaccount.com")
    assert values["postgresql"]["enabled"] is False and values["generatePostgresqlPasswordSecret"] is False


# --------------------------------------------------------------------------- the image


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_is_one_cuda_image_with_commit_config_weights_and_a_non_root_user(cfg):
    ins = _dockerfile_instructions()
    args = dict(a.split("=", 1) for w, a in ins if w == "ARG" and "=" in a)
    froms = [a for w, a in ins if w == "FROM"]
    assert (len(froms) == 1 and froms[0] == "${CUDA_IMAGE}"
            and re.match(r"nvidia/cuda:[\d.]+-cudnn-runtime-", args["CUDA_IMAGE"]))
    env = " ".join(a for w, a in ins if w == "ENV")
    assert "SOFAR_GIT_COMMIT=${SOFAR_GIT_COMMIT}" in env and "SOFAR_GIT_COMMIT" in args
    assert "SOFAR_CONFIG=/app/config/prod.yaml" in env
    runs = [a for w, a in ins if w == "RUN"]
    assert any("pip install -c /app/deploy/constraints.txt /app" in r for r in runs)
    export = next(r for r in runs if "export-weights" in r)
    assert shlex.split(export)[-1] == cfg.model.weights_file  # prod loads the file the build writes
    assert cfg.model.pretrained and cfg.model.backbone == "efficientnet_lite0"
    users = [a for w, a in ins if w == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert ins[-1][0] == "CMD" and json.loads(ins[-1][1])[:3] == ["dagster", "code-server", "start"]
    assert ("ENTRYPOINT", "[]") in ins  # dagster-k8s passes only args: they must run as the command
    # every dependency the image installs is pinned by the constraints file
    pins = {ln.split("==")[0].lower() for ln in (ROOT / "deploy/constraints.txt").read_text().splitlines()
            if "==" in ln}
    deps = [re.split(r"[<>=!~ \[]", d)[0].lower() for d in _pyproject_dependencies()]
    assert set(deps) <= pins, set(deps) - pins


def _pyproject_dependencies() -> list[str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def test_dockerignore_sends_only_what_the_image_copies():
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"
    kept = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    copied = {a.split()[0] for w, a in _dockerfile_instructions() if w == "COPY"}
    assert copied <= kept, copied - kept


# --------------------------------------------------------------------------- weights from a local file


def test_weights_file_gives_the_same_logits_as_the_package(tmp_path, samples):
    """The image's build step for real (its RUN line), then both loading paths on a real photo:
    ImageNet logits (backbone + the weights' own classifier) and the PMG stage features."""
    from sofar_assets.cli import main
    from sofar_assets.lib.data.images import load_image_array
    from sofar_assets.lib.model.models import ModelSpec, build_model, offline_imagenet_state_dict

    weights = tmp_path / "opt" / "efficientnet_lite0.safetensors"
    main(["export-weights", str(weights)])
    assert weights.stat().st_mode & stat.S_IROTH  # the image's non-root user can read it
    photo = sorted((samples / "CAR_DEFECT_RECOGNITION").rglob("*.jpg"))[0]
    x = (torch.from_numpy(load_image_array(photo.read_bytes(), str(photo), 224))
         .permute(2, 0, 1)[None].float() / 255)
    logits, features = [], []
    for weights_file in (None, str(weights)):
        imagenet = build_model(ModelSpec(num_classes=1000, pretrained=True, weights_file=weights_file)).eval()
        sd = offline_imagenet_state_dict(weights_file)
        imagenet.head.load_state_dict({"weight": sd["classifier.weight"], "bias": sd["classifier.bias"]})
        pmg = build_model(ModelSpec(num_classes=3, arch="pmg", pretrained=True,
                                    weights_file=weights_file)).eval()
        with torch.no_grad():
            logits.append(imagenet(x))
            features.append(pmg.backbone(pmg.normalize(x)))
    assert torch.equal(logits[0], logits[1])
    assert all(torch.equal(a, b) for a, b in zip(*features, strict=True))
    assert float(logits[0].softmax(-1).max()) > 0.05  # real ImageNet weights, not an untrained net


def test_weights_file_errors_name_the_file(tmp_path):
    from safetensors.torch import save_file

    from sofar_assets.lib.model.models import ModelSpec, build_model

    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        build_model(ModelSpec(num_classes=2, weights_file=str(missing)))
    wrong = tmp_path / "resnet.safetensors"
    save_file({"conv1.weight": torch.zeros(4, 3, 3, 3)}, str(wrong))
    with pytest.raises(ValueError, match=re.escape(str(wrong))):
        build_model(ModelSpec(num_classes=2, weights_file=str(wrong)))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=re.escape(str(garbage))):
        build_model(ModelSpec(num_classes=2, weights_file=str(garbage)))


def test_config_weights_file_is_checked_with_the_paths(tmp_path):
    data = {"tasks": {"t": {"folder": "gs://b/t", "labels": {"a": "a"}}}, "uploads": {"folder": "gs://b/u"},
            "partitions": {"start_date": dt.date(2026, 1, 1)},
            "model": {"weights_file": "w/lite0.safetensors"}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError,
                       match=r"model\.weights_file: file does not exist: .*w/lite0\.safetensors"):
        load_config(path)
    (tmp_path / "w").mkdir()
    np.zeros(1).tofile(tmp_path / "w" / "lite0.safetensors")
    assert load_config(path).weights_file == str(tmp_path / "w" / "lite0.safetensors")
    assert parse_config({**data, "model": {}}, base_dir=tmp_path).weights_file is None
    assert os.path.isabs(load_config(PROD_CONFIG, check_paths=False).cache_dir)


# --------------------------------------------------------------------------- pods that schedule on GKE


def test_gke_allocatable_follows_the_documented_reservations():
    """Hand-computed from GKE's formula (CPU 6/1/0.5/0.25 %; memory 25/20/10/6/2 % + 100 MiB eviction)."""
    g2_8 = gke.allocatable(gke.MACHINES["g2-standard-8"])
    assert g2_8.cpu_m == 8000 - (60 + 10 + 2 * 5 + 4 * 2.5)  # 7910m
    assert g2_8.memory_mi == int(32768 - (0.25 * 4096 + 0.20 * 4096 + 0.10 * 8192 + 0.06 * 16384) - 100)
    n1_4 = gke.allocatable(gke.MACHINES["n1-standard-4"])
    assert n1_4.cpu_m == 3920  # GKE's own example for a 4-core node
    big = gke.allocatable(gke.Machine("x", 64, 256, ()))
    assert big.memory_mi == int(262144 - (1024 + 819.2 + 819.2 + 0.06 * 114688 + 0.02 * 131072) - 100)


def _pod_request(pod, resource: str) -> float:
    """A pod's effective request: the larger of the containers' sum and any one init container."""
    def req(c):
        return float(parse_quantity(((c.resources and c.resources.requests) or {}).get(resource, "0")))
    return max([sum(req(c) for c in pod.containers), *(req(c) for c in pod.init_containers or [])])


def _cfg_for(machine: str, accelerator: str) -> object:
    raw = yaml.safe_load(PROD_CONFIG.read_text())
    m = gke.MACHINES[machine]
    for section in ("train", "inference"):
        batch = raw[section].get("batch_size", 16)
        raw[section]["num_workers"] = min(8, gke.max_workers(m, batch, raw["model"]["image_size"]))
    raw["kubernetes"].update(gpu_machine=machine,
                             gpu_node_selector={"cloud.google.com/gke-accelerator": accelerator})
    return parse_config(raw, base_dir=PROD_CONFIG.parent, source=str(PROD_CONFIG))


@pytest.mark.parametrize("machine,accelerator", [("g2-standard-8", "nvidia-l4"),
                                                 ("g2-standard-12", "nvidia-l4"),
                                                 ("n1-standard-8", "nvidia-tesla-t4")])
def test_every_gpu_step_pod_fits_its_node(launcher, machine, accelerator):
    cfg = _cfg_for(machine, accelerator)
    node = gke.allocatable(gke.MACHINES[machine])
    cpu_room = (node.cpu_m - gke.DAEMONSET_CPU_M) / 1000
    memory_room = (node.memory_mi - gke.DAEMONSET_MEMORY_MI) * 2**20
    gpu_steps = 0
    for job_name, step, _ in prod_steps(build_definitions(cfg)):
        pod = render_step(launcher, job_name, step, cfg).spec.template.spec
        if GPU_RESOURCE not in (pod.containers[0].resources.limits or {}):
            continue
        gpu_steps += 1
        assert pod.node_selector["cloud.google.com/gke-accelerator"] == accelerator
        assert _pod_request(pod, "cpu") <= cpu_room, (machine, step.key)
        assert _pod_request(pod, "memory") <= memory_room, (machine, step.key)
        assert float(parse_quantity(pod.containers[0].resources.limits["memory"])) <= memory_room, step.key
    assert gpu_steps >= 4
    if machine == "g2-standard-12":  # a bigger node gets more workers, not the g2-standard-8's
        assert cfg.train.num_workers == 8


def test_prod_config_fits_its_gpu_machine_and_more_workers_is_a_load_error():
    raw = yaml.safe_load(PROD_CONFIG.read_text())
    assert raw["kubernetes"]["gpu_machine"] == "g2-standard-8"
    assert parse_config(raw, base_dir=PROD_CONFIG.parent).train.num_workers == 6
    raw["train"]["num_workers"] = 8  # the landed value: 9 vCPU on an 8-vCPU node, Pending forever
    with pytest.raises(ConfigError, match=r"train\.num_workers: 8 workers \+ the main process needs 9 vCPU "
                                          r"> 7\.41 that a g2-standard-8 node.*set train\.num_workers: 6"):
        parse_config(raw, base_dir=PROD_CONFIG.parent, source="prod.yaml")
    raw["train"]["num_workers"] = 6
    raw["kubernetes"]["gpu_node_selector"] = {"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"}
    with pytest.raises(ConfigError, match=r"'nvidia-tesla-t4' is not a GPU a g2-standard-8 carries"):
        parse_config(raw, base_dir=PROD_CONFIG.parent)
    raw["kubernetes"]["gpu_machine"] = "g2-standard-7"
    with pytest.raises(ConfigError,
                       match=r"kubernetes\.gpu_machine: unknown GPU machine type 'g2-standard-7'"):
        parse_config(raw, base_dir=PROD_CONFIG.parent)


# --------------------------------------------------------------------------- a bounded start


def test_every_step_job_carries_a_start_timeout_of_at_most_30_minutes(cfg, defs, launcher):
    for job_name, step, _ in prod_steps(defs):
        job = render_step(launcher, job_name, step)
        assert int(job.metadata.annotations[START_TIMEOUT_ANNOTATION]) <= 1800, step.key
    assert cfg.kubernetes.start_timeout_s == 1800


def _pending_pod(name: str, age: dt.timedelta, now: dt.datetime, message: str | None):
    conditions = [kubernetes.client.V1PodCondition(type="PodScheduled", status="False", reason="Unschedulable",
                                                   message=message)] if message else None
    return kubernetes.client.V1Pod(
        metadata=kubernetes.client.V1ObjectMeta(name=name, creation_timestamp=now - age),
        status=kubernetes.client.V1PodStatus(phase="Pending", conditions=conditions))


class _FakeK8s:
    """dagster-k8s' DagsterKubernetesClient as the step handler uses it (no cluster)."""

    def __init__(self, pods, annotations=None, now=None):
        self.pods, self.deleted = pods, []
        job = kubernetes.client.V1Job(metadata=kubernetes.client.V1ObjectMeta(
            name="dagster-step-x", annotations=annotations, creation_timestamp=now))
        self.batch_api = type("B", (), {"read_namespaced_job": lambda _s, name, ns: job})()

    def get_pods_in_job(self, job_name, namespace):
        return self.pods

    def delete_job(self, job_name, namespace):
        self.deleted.append(job_name)


def test_a_pod_that_cannot_schedule_fails_the_step_saying_why(cfg, monkeypatch, tmp_path):
    from dagster._core.executor.step_delegating.step_handler.base import CheckStepHealthResult

    from sofar_assets.defs.k8s import StartBoundedStepHandler, start_problem

    now = dt.datetime(2026, 12, 6, 12, tzinfo=dt.UTC)
    why = "0/3 nodes are available: 1 Insufficient cpu, 2 node(s) had untolerated taint {nvidia.com/gpu: }"
    ann = {START_TIMEOUT_ANNOTATION: "1800"}
    young = _FakeK8s([_pending_pod("p", dt.timedelta(minutes=29), now, why)], ann)
    assert start_problem(young, "dagster-step-x", "dagster", 9999, now) is None
    old = _FakeK8s([_pending_pod("p", dt.timedelta(minutes=31), now, why)], ann)
    assert start_problem(old, "dagster-step-x", "dagster", 9999, now) == (
        "step pod p has not started after 1860 s (kubernetes.start_timeout_s: 1800): unschedulable: " + why)
    running = _pending_pod("p", dt.timedelta(hours=5), now, None)
    running.status.phase = "Running"  # a long training step is not a start problem
    assert start_problem(_FakeK8s([running], ann), "dagster-step-x", "dagster", 60, now) is None
    no_pod = _FakeK8s([], ann, now=now - dt.timedelta(hours=1))
    assert "has created no pod in 1800 s" in start_problem(no_pod, "dagster-step-x", "dagster", 60, now)

    # the executor of the prod Definitions wraps dagster-k8s' handler with this check
    monkeypatch.setattr(kubernetes.config, "load_incluster_config", lambda *a, **k: None)
    executor_def = build_definitions(cfg).executor
    init = dg.InitExecutorContext(job=dg.reconstructable(_any_job), executor_def=executor_def,
                                  executor_config=executor_def.config_schema.resolve_config({}).value["config"],
                                  instance=dg.DagsterInstance.ephemeral(tempdir=str(tmp_path)))
    executor = executor_def.executor_creation_fn(init)
    handler = executor._step_handler
    assert isinstance(handler, StartBoundedStepHandler)
    assert type(handler._inner).__name__ == "K8sStepHandler" and handler._default_timeout_s == 1800

    class Inner:  # the wrapped handler's side of a health check
        name = "K8sStepHandler"
        _api_client = _FakeK8s([_pending_pod("p", dt.timedelta(hours=2), dt.datetime.now(dt.UTC), why)],
                               ann)

        def check_step_health(self, ctx):
            return CheckStepHealthResult.healthy()

        def _get_k8s_step_job_name(self, ctx):
            return "dagster-step-x"

        def _get_container_context(self, ctx):
            return K8sContainerContext(namespace="dagster")

    bounded = StartBoundedStepHandler(Inner(), 1800)
    result = bounded.check_step_health(None)
    assert not result.is_healthy and why in result.unhealthy_reason
    assert Inner._api_client.deleted == ["dagster-step-x"]  # the GPU pool stops scaling up for it


@dg.job
def _any_job():
    pass


# --------------------------------------------------------------------------- no silent CPU fallback


def test_a_gpu_step_that_sees_no_cuda_fails_at_once_naming_build_and_driver(cfg, defs, launcher, monkeypatch):
    from sofar_assets.lib.common.devices import GpuMissingError, resolve_device

    for job_name, step, _ in prod_steps(defs):
        container = render_step(launcher, job_name, step).spec.template.spec.containers[0]
        has_gpu = GPU_RESOURCE in (container.resources.limits or {})
        assert (_env(container).get(REQUIRE_GPU_ENV) == "1") == has_gpu, step.key
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # what a pod with a broken driver sees
    assert resolve_device("auto").type == "cpu"  # outside a GPU pod: the CPU, as before
    monkeypatch.setenv(REQUIRE_GPU_ENV, "1")
    for device in ("auto", "cpu", "cuda"):
        with pytest.raises(GpuMissingError,
                           match=rf"torch .* built for CUDA {re.escape(str(torch.version.cuda))}"
                                 r".*; driver: .+; torch says: "):
            resolve_device(device)


# --------------------------------------------------------------------------- pools

WAREHOUSE_WRITES = re.compile(
    r"\.(write_table|replace_day|append_rows|replace_partition)\(|\b(write_day|commit_run)\(")


def test_every_gpu_step_and_every_warehouse_write_is_in_its_pool(defs, launcher):
    """Generic over every op of every prod job: the GPU comes from the rendered pod, a warehouse
    write from the op's own code (a call of the warehouse's write methods, lib/serving/daily.py's
    write_day, or defs/predictions.commit_run)."""
    import inspect

    from sofar_assets.defs.k8s import POOL_GPU, POOL_WAREHOUSE_WRITE

    seen = {POOL_GPU: set(), POOL_WAREHOUSE_WRITE: set()}
    for job_name, step, _ in prod_steps(defs):
        op = defs.resolve_job_def(job_name).get_node(step.node_handle).definition
        pod = render_step(launcher, job_name, step).spec.template.spec
        holds_gpu = GPU_RESOURCE in (pod.containers[0].resources.limits or {})
        writes = bool(WAREHOUSE_WRITES.search(inspect.getsource(op.compute_fn.decorated_fn)))
        assert not (holds_gpu and writes), f"{step.key}: holds a GPU while it writes the warehouse"
        if holds_gpu:
            assert op.pool == POOL_GPU, f"{step.key} holds a GPU but its pool is {op.pool!r}"
            seen[POOL_GPU].add(op.name)
        if writes:
            assert op.pool == POOL_WAREHOUSE_WRITE, (f"{step.key} writes the warehouse "
                                                     f"but its pool is {op.pool!r}")
            seen[POOL_WAREHOUSE_WRITE].add(op.name)
    assert {"sofar_classifier", "ood_calibration", "model_evaluation", "score_shard"} <= seen[POOL_GPU]
    assert {"sofar_dataset", "commit_days"} <= seen[POOL_WAREHOUSE_WRITE]
    tradeoff = defs.resolve_assets_def("tradeoff_report")
    assert tradeoff.op.pool == POOL_GPU  # its own job (tradeoff_job), also on a GPU
