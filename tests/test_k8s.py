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
from dagster_k8s.job import construct_dagster_k8s_job, get_user_defined_k8s_config
from dagster_k8s.models import k8s_model_from_dict, k8s_snake_case_dict
from kubernetes.utils import parse_quantity

from sofar_assets.config import ConfigError, load_config, parse_config
from sofar_assets.definitions import build_definitions
from sofar_assets.defs.data import DECODE_THREADS
from sofar_assets.defs.k8s import GPU_RESOURCE, K8S_CONFIG_TAG, PREFETCH_FACTOR, RUNS_MODEL_TAG, step_tags

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


def render_step(launcher: K8sRunLauncher, job_name: str, step) -> kubernetes.client.V1Job:
    """The Job ``K8sStepHandler.launch_step`` creates for ``step`` (dagster_k8s/executor.py)."""
    run = dg.DagsterRun(job_name=job_name, run_id="0123456789abcdef")
    context = K8sContainerContext.create_for_run(run, launcher, include_run_tags=False)
    context = context.merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(step.tags)))
    return construct_dagster_k8s_job(
        job_config=context.get_k8s_job_config(IMAGE, launcher),
        args=["dagster", "api", "execute_step"],
        job_name=f"dagster-step-{abs(hash(step.key)) % 10**12}",
        component="step_worker",
        user_defined_k8s_config=context.run_k8s_config,
        labels={"dagster/job": job_name, "dagster/op": step.key, "dagster/run-id": run.run_id},
        env_vars=[{"name": "DAGSTER_RUN_JOB_NAME", "value": job_name}, {"name": "DAGSTER_RUN_STEP_KEY", "value": step.key}],
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
            problems.append(f"{where}: SOFAR_CONFIG is {_env(container).get('SOFAR_CONFIG')!r}, not {config_path!r}")
        if "sofar-mlflow" not in _secret_refs(container):
            problems.append(f"{where}: the MLflow credentials secret is not in envFrom")
        # a step that loads a registered model AND reads data (images via the store or the warehouse)
        # runs the model; champion_model only talks to the registry; plan_shards lists the day's
        # uploads (warehouse) and resolves the champion (registry) but loads no model; score_shard
        # reads its manifest slices' images through lib/storage (no resource)
        runs_model = (("mlflow_tracking" in resources and bool({"image_store", "warehouse"} & resources)
                       and not step.key.endswith(".plan_shards")) or step.key.endswith(".score_shard[?]"))
        reads_images = "image_store" in resources or runs_model
        if runs_model != (step.tags.get(RUNS_MODEL_TAG) == "true"):
            problems.append(f"{where}: runs a model={runs_model} but tag {RUNS_MODEL_TAG}={step.tags.get(RUNS_MODEL_TAG)!r}")
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
                problems.append(f"{where}: /dev/shm {shm.empty_dir.size_limit} < {batches} bytes of worker batches")
        if int(parse_quantity(requests.get("cpu", "0"))) < workers + 1:
            problems.append(f"{where}: cpu request {requests.get('cpu')} < {workers} workers + 1")
        if int(parse_quantity(requests.get("memory", "0"))) < shm_bytes + (workers + 1) * 2**29:
            problems.append(f"{where}: memory request {requests.get('memory')} does not cover shm + {workers + 1} processes")
        cache = _mounted(job, cfg.cache_dir)
        if cache is None or cache.persistent_volume_claim is None:
            problems.append(f"{where}: the cache volume is not mounted at {cfg.cache_dir}")
        elif cache.persistent_volume_claim.claim_name != cfg.kubernetes.cache_claim:
            problems.append(f"{where}: cache claim {cache.persistent_volume_claim.claim_name!r} is not "
                            f"kubernetes.cache_claim {cfg.kubernetes.cache_claim!r}")
    return problems


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
    for key in ("sofar_classifier", "ood_calibration", "model_evaluation", "daily_predictions.score_shard[?]"):
        pod = rendered[key].spec.template.spec
        assert pod.containers[0].resources.limits[GPU_RESOURCE] == "1", key
        assert pod.node_selector == {"cloud.google.com/gke-accelerator": "nvidia-l4"}, key
    for key in ("sofar_dataset", "champion_model", "raw_labels__defect"):
        assert GPU_RESOURCE not in (rendered[key].spec.template.spec.containers[0].resources.limits or {}), key
    # 8 DataLoader workers of 16 x 448 x 448 x 3 uint8 batches: far above Kubernetes' 64 MB default shm
    train = rendered["sofar_classifier"]
    assert int(parse_quantity(_mounted(train, "/dev/shm").empty_dir.size_limit)) > 64 * 2**20
    assert int(parse_quantity(train.spec.template.spec.containers[0].resources.requests["cpu"])) >= 9


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
    assert GPU_RESOURCE not in resources["requests"] and "node_selector" not in tags[K8S_CONFIG_TAG]["pod_spec_config"]
    assert tags[RUNS_MODEL_TAG] == "true" and resources["requests"]["cpu"] == "5"


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
    return jsonschema.validators.extend(jsonschema.Draft202012Validator, {"required": lambda *_: iter(())})(schema)


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
    assert monitoring["enabled"] and monitoring["startTimeoutSeconds"] > 0 and monitoring["maxResumeRunAttempts"] > 0
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
    assert len(froms) == 1 and froms[0] == "${CUDA_IMAGE}" and re.match(r"nvidia/cuda:[\d.]+-cudnn-runtime-", args["CUDA_IMAGE"])
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
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"
    kept = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    copied = {a.split()[0] for w, a in _dockerfile_instructions() if w == "COPY"}
    assert copied <= kept, copied - kept


# --------------------------------------------------------------------------- weights from a local file


def test_weights_file_gives_the_same_logits_as_the_package(tmp_path, samples):
    """The image's build step for real (its RUN line), then both loading paths on a real photo:
    ImageNet logits (backbone + the weights' own classifier) and the PMG stage features."""
    from sofar_assets.cli import main
    from sofar_assets.lib.images import load_image_array
    from sofar_assets.lib.models import ModelSpec, build_model, offline_imagenet_state_dict

    weights = tmp_path / "opt" / "efficientnet_lite0.safetensors"
    main(["export-weights", str(weights)])
    assert weights.stat().st_mode & stat.S_IROTH  # the image's non-root user can read it
    photo = sorted((samples / "CAR_DEFECT_RECOGNITION").rglob("*.jpg"))[0]
    x = torch.from_numpy(load_image_array(photo.read_bytes(), str(photo), 224)).permute(2, 0, 1)[None].float() / 255
    logits, features = [], []
    for weights_file in (None, str(weights)):
        imagenet = build_model(ModelSpec(num_classes=1000, pretrained=True, weights_file=weights_file)).eval()
        sd = offline_imagenet_state_dict(weights_file)
        imagenet.head.load_state_dict({"weight": sd["classifier.weight"], "bias": sd["classifier.bias"]})
        pmg = build_model(ModelSpec(num_classes=3, arch="pmg", pretrained=True, weights_file=weights_file)).eval()
        with torch.no_grad():
            logits.append(imagenet(x))
            features.append(pmg.backbone(pmg.normalize(x)))
    assert torch.equal(logits[0], logits[1])
    assert all(torch.equal(a, b) for a, b in zip(*features, strict=True))
    assert float(logits[0].softmax(-1).max()) > 0.05  # real ImageNet weights, not an untrained net


def test_weights_file_errors_name_the_file(tmp_path):
    from safetensors.torch import save_file

    from sofar_assets.lib.models import ModelSpec, build_model

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
            "partitions": {"start_date": dt.date(2026, 1, 1)}, "model": {"weights_file": "w/lite0.safetensors"}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"model\.weights_file: file does not exist: .*w/lite0\.safetensors"):
        load_config(path)
    (tmp_path / "w").mkdir()
    np.zeros(1).tofile(tmp_path / "w" / "lite0.safetensors")
    assert load_config(path).weights_file == str(tmp_path / "w" / "lite0.safetensors")
    assert parse_config({**data, "model": {}}, base_dir=tmp_path).weights_file is None
    assert os.path.isabs(load_config(PROD_CONFIG, check_paths=False).cache_dir)
