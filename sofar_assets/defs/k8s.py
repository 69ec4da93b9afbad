"""Kubernetes resources per step, for runs under dagster-k8s (``k8s_job_executor``).

Op tags, not job tags: backfills and UI materializations ignore job-level tags. Every step
that runs a model asks for what it uses: a GPU when its device may be CUDA, CPU for its
DataLoader workers, and memory for their prefetch. Outside Kubernetes the tags are inert.
"""

from __future__ import annotations

from sofar_assets.config import SofarConfig

GPU_NODE_SELECTOR = {"cloud.google.com/gke-accelerator": "nvidia-l4"}
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def step_tags(cfg: SofarConfig, *, gpu: bool, workers: int = 0) -> dict:
    """``op_tags`` for one step: a GPU (when ``gpu``), one CPU per DataLoader worker plus one for
    the main process, and memory for them."""
    cpu = workers + 1
    memory_gi = 4 + 2 * workers
    requests: dict[str, str] = {"cpu": str(cpu), "memory": f"{memory_gi}Gi"}
    limits: dict[str, str] = {"memory": f"{memory_gi + 4}Gi"}
    pod_spec: dict = {}
    if gpu:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = "1"
        pod_spec = {"node_selector": dict(GPU_NODE_SELECTOR), "tolerations": [dict(t) for t in GPU_TOLERATIONS]}
    config: dict = {"container_config": {"resources": {"requests": requests, "limits": limits}}}
    if pod_spec:
        config["pod_spec_config"] = pod_spec
    return {"dagster-k8s/config": config}
