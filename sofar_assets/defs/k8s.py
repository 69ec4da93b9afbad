"""Kubernetes resources per step, for runs under dagster-k8s (``k8s_job_executor``).

Op tags, not job tags: backfills and UI materializations ignore job-level tags. Every step that
reads images asks for what it uses: CPU for its DataLoader workers (or decode threads), memory
for them, a memory-backed ``/dev/shm`` sized for the batches the workers hand over (Kubernetes'
default is 64 MB: eight workers die with a bus error), and the shared cache volume. A step that
runs a model also gets a GPU when its device may be CUDA, on a GPU node; its pod is sized to fit
``kubernetes.gpu_machine`` (lib/serving/gke.py; the config refuses workers that do not fit) and carries
``SOFAR_REQUIRE_GPU=1`` so that a pod whose GPU is broken fails at once (lib/common/devices.py) instead
of training on the CPU. Every step Job carries its start timeout: ``sofar_k8s_executor`` fails a
step whose pod is still Pending after it, saying why. Outside Kubernetes the tags are inert.
The run launcher (deploy/helm/values.yaml) adds the environment every pod needs.
"""

from __future__ import annotations

import datetime as dt

import dagster as dg

from sofar_assets.config import SofarConfig
from sofar_assets.lib.data import storage
from sofar_assets.lib.serving import gke
from sofar_assets.lib.serving.gke import PREFETCH_FACTOR, shm_mi  # noqa: F401  (re-exported: tests, callers)

K8S_CONFIG_TAG = "dagster-k8s/config"
RUNS_MODEL_TAG = "sofar/runs_model"  # a model forward pass: GPU when the device may be CUDA
READS_IMAGES_TAG = "sofar/reads_images"  # decodes images: cache volume + shm + CPUs per worker
GPU_RESOURCE = "nvidia.com/gpu"
SHM_VOLUME = "dshm"
CACHE_VOLUME = "sofar-cache"
CACHE_INIT_MOUNT = "/share"
REQUIRE_GPU_ENV = "SOFAR_REQUIRE_GPU"  # read by settings.gpu_required(); lib/common/devices refuses a CPU fallback
START_TIMEOUT_ANNOTATION = "sofar/start-timeout-seconds"
POD_UID = 10001  # the image's user (deploy/Dockerfile: useradd --uid 10001); the cache folder's owner
POOL_GPU = "gpu"  # every step that holds a GPU
POOL_WAREHOUSE_WRITE = "warehouse_write"  # every step that writes a warehouse table


def cache_init_container(cfg: SofarConfig) -> dict:
    """Creates ``kubernetes.cache_subdir`` on the share, owned by the pods' user.

    A Filestore (NFS) share is owned by root and ``fsGroup`` does not apply to NFS volumes, so
    uid 10001 cannot write its root. This container runs as root once per pod (``mkdir -p`` and
    ``chown`` are idempotent: a fresh share and a used one are the same), and the step container
    mounts only that folder (``subPath``). It needs a share exported without root squash
    (Filestore's default)."""
    folder = f"{CACHE_INIT_MOUNT}/{cfg.kubernetes.cache_subdir}"
    return {
        "name": "cache-folder",
        "image": cfg.kubernetes.cache_init_image,
        "command": ["sh", "-c", f"mkdir -p {folder} && chown {POD_UID}:{POD_UID} {folder} && chmod 0775 {folder}"],
        "security_context": {"run_as_user": 0, "run_as_non_root": False},
        "volume_mounts": [{"name": CACHE_VOLUME, "mount_path": CACHE_INIT_MOUNT}],
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
    }


def _may_use_cuda(device: str) -> bool:
    return device in ("auto", "cuda")


def step_tags(
    cfg: SofarConfig,
    *,
    gpu: bool,
    workers: int = 0,
    batch_size: int | None = None,
    device: str | None = None,
) -> dict:
    """``op_tags`` for one step that reads images; ``gpu=True`` marks a step that runs a model.

    ``workers`` are DataLoader workers (or decode threads); ``batch_size`` and ``device`` default
    to the inference settings for a model step (training passes its own). A model step whose
    device is ``cpu`` gets no GPU; ``auto`` or ``cuda`` gets one GPU.
    """
    if batch_size is None:
        batch_size = cfg.inference.batch_size if gpu else 1  # decode threads hand no batches over shm
    device = cfg.inference.device if device is None else device
    size = gke.pod_size(workers, batch_size, cfg.model.image_size)
    on_gpu = gpu and _may_use_cuda(device)
    machine = gke.MACHINES[cfg.kubernetes.gpu_machine] if on_gpu and cfg.kubernetes.gpu_machine else None
    requests: dict[str, str] = {"cpu": f"{size.cpu_m}m", "memory": f"{size.memory_mi}Mi"}
    limits: dict[str, str] = {"memory": f"{size.limit_mi(machine)}Mi"}
    volume_mounts: list[dict] = [{"name": SHM_VOLUME, "mount_path": "/dev/shm"}]
    volumes: list[dict] = [{"name": SHM_VOLUME, "empty_dir": {"medium": "Memory", "size_limit": f"{size.shm_mi}Mi"}}]
    pod_spec: dict = {"volumes": volumes}
    if cfg.storage.cache and not storage.is_gcs(cfg.cache_dir):
        volume_mounts.append({"name": CACHE_VOLUME, "mount_path": cfg.cache_dir,
                              "sub_path": cfg.kubernetes.cache_subdir})
        volumes.append({"name": CACHE_VOLUME,
                        "persistent_volume_claim": {"claim_name": cfg.kubernetes.cache_claim}})
        pod_spec["init_containers"] = [cache_init_container(cfg)]
    env: list[dict] = []
    if on_gpu:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = "1"
        pod_spec["node_selector"] = dict(cfg.kubernetes.gpu_node_selector)
        pod_spec["tolerations"] = [dict(t) for t in cfg.kubernetes.gpu_tolerations]
        env.append({"name": REQUIRE_GPU_ENV, "value": "1"})
    container: dict = {"resources": {"requests": requests, "limits": limits}, "volume_mounts": volume_mounts}
    if env:
        container["env"] = env
    config = {"container_config": container, "pod_spec_config": pod_spec}
    tags = {K8S_CONFIG_TAG: config, READS_IMAGES_TAG: "true"}
    if gpu:
        tags[RUNS_MODEL_TAG] = "true"
    return tags


# --------------------------------------------------------------------------- a bounded start


def step_k8s_config(cfg: SofarConfig) -> dict:
    """What the executor puts on EVERY step Job (under each op's own ``dagster-k8s/config``)."""
    return {"job_metadata": {"annotations": {START_TIMEOUT_ANNOTATION: str(cfg.kubernetes.start_timeout_s)}}}


def pod_waiting_reason(pod) -> str:
    """Why a Pending pod is not running, in Kubernetes' own words."""
    status = pod.status
    for cond in (status.conditions or []) if status else []:
        if cond.type == "PodScheduled" and cond.status == "False":
            return f"unschedulable: {cond.message or cond.reason}"
    for cs in [*(status.init_container_statuses or []), *(status.container_statuses or [])] if status else []:
        waiting = cs.state.waiting if cs.state else None
        if waiting is not None:
            return f"container {cs.name} waiting: {waiting.reason}{': ' + waiting.message if waiting.message else ''}"
    return "no reason reported (kubectl describe pod shows its events)"


def start_problem(api, job_name: str, namespace: str, default_timeout_s: int, now: dt.datetime) -> str | None:
    """Why the step Job ``job_name`` has not started within its start timeout, or None.

    ``api`` is dagster-k8s' ``DagsterKubernetesClient``. The timeout is the Job's
    ``sofar/start-timeout-seconds`` annotation (``step_k8s_config``), else ``default_timeout_s``.
    A pod counts as not started while it is Pending: unschedulable (no node has the CPU, memory
    or GPU it asks for; the GPU pool cannot scale up), or scheduled but its image or volumes are
    not ready. A Job with no pod at all (refused by a quota) counts from its own creation.
    """
    job = api.batch_api.read_namespaced_job(job_name, namespace)
    annotations = (job.metadata.annotations or {}) if job.metadata else {}
    timeout = int(annotations.get(START_TIMEOUT_ANNOTATION, default_timeout_s))
    limit = dt.timedelta(seconds=timeout)
    pods = api.get_pods_in_job(job_name, namespace)
    if not pods:
        created = job.metadata.creation_timestamp
        if created is not None and now - created > limit:
            return (f"Kubernetes Job {job_name} has created no pod in {timeout} s "
                    f"(kubernetes.start_timeout_s); a resource quota or admission webhook may refuse it: "
                    f"kubectl -n {namespace} describe job {job_name}")
        return None
    for pod in pods:
        if pod.status is None or pod.status.phase != "Pending" or pod.metadata.creation_timestamp is None:
            continue
        waited = now - pod.metadata.creation_timestamp
        if waited > limit:
            return (f"step pod {pod.metadata.name} has not started after {int(waited.total_seconds())} s "
                    f"(kubernetes.start_timeout_s: {timeout}): {pod_waiting_reason(pod)}")
    return None


class StartBoundedStepHandler:
    """dagster-k8s' ``K8sStepHandler`` plus a start bound: its health check only fails a step whose
    Job failed, so a pod that cannot be scheduled holds the run until the run's max runtime. This
    one also fails a step whose pod is still Pending after the start timeout, deletes the Job (so
    the GPU pool stops scaling up for it) and says why. Everything else is the wrapped handler's."""

    def __init__(self, inner, default_timeout_s: int):
        self._inner = inner
        self._default_timeout_s = default_timeout_s

    @property
    def name(self) -> str:
        return self._inner.name

    def launch_step(self, step_handler_context):
        return self._inner.launch_step(step_handler_context)

    def terminate_step(self, step_handler_context):
        return self._inner.terminate_step(step_handler_context)

    def check_step_health(self, step_handler_context):
        from dagster._core.executor.step_delegating.step_handler.base import CheckStepHealthResult

        result = self._inner.check_step_health(step_handler_context)
        if not result.is_healthy:
            return result
        job_name = self._inner._get_k8s_step_job_name(step_handler_context)
        namespace = self._inner._get_container_context(step_handler_context).namespace
        api = self._inner._api_client
        why = start_problem(api, job_name, namespace, self._default_timeout_s, dt.datetime.now(dt.UTC))
        if why is None:
            return result
        api.delete_job(job_name=job_name, namespace=namespace)
        return CheckStepHealthResult.unhealthy(reason=why)


def sofar_k8s_executor(cfg: SofarConfig) -> dg.ExecutorDefinition:
    """``k8s_job_executor`` with :func:`step_k8s_config` on every step Job and a bounded start."""
    from dagster._core.definitions.executor_definition import multiple_process_executor_requirements
    from dagster_k8s import k8s_job_executor

    timeout = cfg.kubernetes.start_timeout_s

    @dg.executor(name="k8s", config_schema=k8s_job_executor.config_schema.as_field(),
                 requirements=multiple_process_executor_requirements())
    def _executor(init_context: dg.InitExecutorContext):
        executor = k8s_job_executor.executor_creation_fn(init_context)
        executor._step_handler = StartBoundedStepHandler(executor._step_handler, timeout)
        return executor

    return _executor.configured({"step_k8s_config": step_k8s_config(cfg)}, name="k8s")
