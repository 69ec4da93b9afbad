"""Kubernetes resources per step, for runs under dagster-k8s (``k8s_job_executor``).

Op tags, not job tags: backfills and UI materializations ignore job-level tags. Every step that
reads images asks for what it uses: CPU for its DataLoader workers (or decode threads), memory
for them, a memory-backed ``/dev/shm`` sized for the batches the workers hand over (Kubernetes'
default is 64 MB: eight workers die with a bus error), and the shared cache volume. A step that
runs a model also gets a GPU when its device may be CUDA, on a GPU node. Outside Kubernetes the
tags are inert. The run launcher (deploy/helm/values.yaml) adds the environment every pod needs.
"""

from __future__ import annotations

from sofar_assets.config import SofarConfig
from sofar_assets.lib import storage

K8S_CONFIG_TAG = "dagster-k8s/config"
RUNS_MODEL_TAG = "sofar/runs_model"  # a model forward pass: GPU when the device may be CUDA
READS_IMAGES_TAG = "sofar/reads_images"  # decodes images: cache volume + shm + CPUs per worker
GPU_RESOURCE = "nvidia.com/gpu"
SHM_VOLUME = "dshm"
CACHE_VOLUME = "sofar-cache"
PREFETCH_FACTOR = 2  # torch's DataLoader default, which lib/training and lib/inference use
SHM_MIN_MI = 256
MAIN_MEMORY_GI = 4  # the step's own process: model, optimizer, a batch on the host
WORKER_MEMORY_GI = 1  # one DataLoader worker: torch + PIL + its decoded batches before they hit shm


def shm_mi(workers: int, batch_size: int, image_size: int) -> int:
    """``/dev/shm`` for ``workers`` DataLoader workers: each keeps ``PREFETCH_FACTOR`` uint8
    batches of ``batch_size`` x 3 x S x S in shared memory, doubled for the collate copy."""
    batch_bytes = batch_size * 3 * image_size * image_size
    need = 2 * workers * PREFETCH_FACTOR * batch_bytes
    return max(SHM_MIN_MI, -(-need // 2**20) + SHM_MIN_MI)


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
    shm = shm_mi(workers, batch_size, cfg.model.image_size)
    # tmpfs pages are charged to the container's memory cgroup, so the shm counts as memory too
    memory_mi = (MAIN_MEMORY_GI + WORKER_MEMORY_GI * workers) * 1024 + shm
    requests: dict[str, str] = {"cpu": str(workers + 1), "memory": f"{memory_mi}Mi"}
    limits: dict[str, str] = {"memory": f"{memory_mi + 4096}Mi"}
    volume_mounts: list[dict] = [{"name": SHM_VOLUME, "mount_path": "/dev/shm"}]
    volumes: list[dict] = [{"name": SHM_VOLUME, "empty_dir": {"medium": "Memory", "size_limit": f"{shm}Mi"}}]
    if cfg.storage.cache and not storage.is_gcs(cfg.cache_dir):
        volume_mounts.append({"name": CACHE_VOLUME, "mount_path": cfg.cache_dir})
        volumes.append({"name": CACHE_VOLUME,
                        "persistent_volume_claim": {"claim_name": cfg.kubernetes.cache_claim}})
    pod_spec: dict = {"volumes": volumes}
    if gpu and _may_use_cuda(device):
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = "1"
        pod_spec["node_selector"] = dict(cfg.kubernetes.gpu_node_selector)
        pod_spec["tolerations"] = [dict(t) for t in cfg.kubernetes.gpu_tolerations]
    config = {
        "container_config": {"resources": {"requests": requests, "limits": limits}, "volume_mounts": volume_mounts},
        "pod_spec_config": pod_spec,
    }
    tags = {K8S_CONFIG_TAG: config, READS_IMAGES_TAG: "true"}
    if gpu:
        tags[RUNS_MODEL_TAG] = "true"
    return tags
