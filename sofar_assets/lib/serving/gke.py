"""GKE node sizes and the pods of our steps that must fit them (no Kubernetes or Dagster import).

A pod is scheduled on its *requests* against a node's **allocatable**: the machine's capacity
less what GKE reserves for the kubelet and the OS (the documented formula below), less the
eviction threshold, less what the node's system DaemonSets request (logging, metadata server,
kube-proxy, the NVIDIA device plugin, CSI node drivers). A pod that asks for more stays Pending
forever, so the config is checked against the target node pool's machine type at load.

GKE's reservation formula (cloud.google.com/kubernetes-engine/docs/concepts/plan-node-sizes):
CPU: 6 % of the first core, 1 % of the next, 0.5 % of the next 2, 0.25 % of every core above 4.
Memory: 25 % of the first 4 GiB, 20 % of the next 4, 10 % of the next 8, 6 % of the next 112,
2 % above 128 GiB; plus a 100 MiB eviction threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFETCH_FACTOR = 2  # torch's DataLoader default, which lib/model/training and lib/serving/inference use
SHM_MIN_MI = 256
MAIN_MEMORY_MI = 4 * 1024  # the step's own process: model, optimizer, a batch on the host
WORKER_MEMORY_MI = 1024  # one DataLoader worker: torch + PIL + its decoded batches before they hit shm
LIMIT_HEADROOM_MI = 4096  # memory limit above the request (a burst), clipped to what the node has
EVICTION_THRESHOLD_MI = 100
# What GKE's system DaemonSets request on a GPU node (kube-proxy, fluentbit-gke, gke-metadata-server,
# gke-metrics-agent, netd, pdcsi-node, filestore-node, nvidia-gpu-device-plugin): about 0.4 vCPU and
# 0.6 GiB on a 1.3x cluster, rounded up. An estimate: `kubectl describe node` on the pool shows the
# real "Allocatable" and the DaemonSets' requests; raise these if the pool runs more agents.
DAEMONSET_CPU_M = 500
DAEMONSET_MEMORY_MI = 1024


@dataclass(frozen=True)
class Machine:
    """A GCE machine type as a GKE node: vCPUs, memory (GiB) and the GPUs it can carry."""

    name: str
    vcpus: int
    memory_gib: float
    accelerators: tuple[str, ...]  # the values of the node label cloud.google.com/gke-accelerator
    gpus: int = 1


_N1_GPUS = ("nvidia-tesla-t4", "nvidia-tesla-v100", "nvidia-tesla-p4", "nvidia-tesla-p100")
MACHINES: dict[str, Machine] = {m.name: m for m in (
    Machine("g2-standard-4", 4, 16, ("nvidia-l4",)),
    Machine("g2-standard-8", 8, 32, ("nvidia-l4",)),
    Machine("g2-standard-12", 12, 48, ("nvidia-l4",)),
    Machine("g2-standard-16", 16, 64, ("nvidia-l4",)),
    Machine("g2-standard-32", 32, 128, ("nvidia-l4",)),
    Machine("n1-standard-4", 4, 15, _N1_GPUS),  # n1: the GPU is attached (--accelerator type=...)
    Machine("n1-standard-8", 8, 30, _N1_GPUS),
    Machine("n1-standard-16", 16, 60, _N1_GPUS),
    Machine("n1-highmem-8", 8, 52, _N1_GPUS),
    Machine("a2-highgpu-1g", 12, 85, ("nvidia-tesla-a100",)),
)}


def _tiered(amount: float, tiers: list[tuple[float, float]], rest: float) -> float:
    """Sum of ``rate`` over each tier's share of ``amount``; ``rest`` for what is above them all."""
    total, low = 0.0, 0.0
    for width, rate in tiers:
        total += max(0.0, min(amount, low + width) - low) * rate
        low += width
    return total + max(0.0, amount - low) * rest


def reserved_cpu_m(vcpus: int) -> int:
    """GKE's kube-reserved CPU in millicores (rounded up)."""
    return int(-(-_tiered(vcpus * 1000, [(1000, 0.06), (1000, 0.01), (2000, 0.005)], 0.0025) // 1))


def reserved_memory_mi(memory_gib: float) -> int:
    """GKE's kube-reserved memory in MiB (rounded up), without the eviction threshold."""
    mi = memory_gib * 1024
    return int(-(-_tiered(mi, [(4096, 0.25), (4096, 0.20), (8192, 0.10), (114688, 0.06)], 0.02) // 1))


@dataclass(frozen=True)
class Allocatable:
    cpu_m: int
    memory_mi: int


def allocatable(machine: Machine) -> Allocatable:
    """What the kubelet offers pods on ``machine`` (GKE's formula): the node's "Allocatable"."""
    return Allocatable(machine.vcpus * 1000 - reserved_cpu_m(machine.vcpus),
                       int(machine.memory_gib * 1024) - reserved_memory_mi(machine.memory_gib) - EVICTION_THRESHOLD_MI)


def for_one_pod(machine: Machine) -> Allocatable:
    """What is left for ONE step pod after the system DaemonSets (one GPU step per GPU node)."""
    node = allocatable(machine)
    return Allocatable(node.cpu_m - DAEMONSET_CPU_M, node.memory_mi - DAEMONSET_MEMORY_MI)


def shm_mi(workers: int, batch_size: int, image_size: int) -> int:
    """``/dev/shm`` for ``workers`` DataLoader workers: each keeps ``PREFETCH_FACTOR`` uint8
    batches of ``batch_size`` x 3 x S x S in shared memory, doubled for the collate copy."""
    batch_bytes = batch_size * 3 * image_size * image_size
    need = 2 * workers * PREFETCH_FACTOR * batch_bytes
    return max(SHM_MIN_MI, -(-need // 2**20) + SHM_MIN_MI)


@dataclass(frozen=True)
class PodSize:
    cpu_m: int
    memory_mi: int  # the request; tmpfs pages of /dev/shm are charged to the container, so it is included
    shm_mi: int

    def limit_mi(self, machine: Machine | None = None) -> int:
        """The memory limit: a burst above the request, never more than one pod can have on ``machine``."""
        limit = self.memory_mi + LIMIT_HEADROOM_MI
        return max(self.memory_mi, min(limit, for_one_pod(machine).memory_mi)) if machine else limit


def pod_size(workers: int, batch_size: int, image_size: int) -> PodSize:
    """Requests of a step with ``workers`` DataLoader workers (or decode threads) and the main process."""
    shm = shm_mi(workers, batch_size, image_size)
    return PodSize((workers + 1) * 1000, MAIN_MEMORY_MI + WORKER_MEMORY_MI * workers + shm, shm)


def misfit(size: PodSize, machine: Machine) -> str | None:
    """Why a pod of ``size`` cannot be scheduled on ``machine``, or None when it fits."""
    room = for_one_pod(machine)
    short = []
    if size.cpu_m > room.cpu_m:
        short.append(f"{size.cpu_m / 1000:g} vCPU > {room.cpu_m / 1000:g}")
    if size.memory_mi > room.memory_mi:
        short.append(f"{size.memory_mi / 1024:.1f} GiB > {room.memory_mi / 1024:.1f} GiB")
    if not short:
        return None
    return (f"needs {' and '.join(short)} that a {machine.name} node offers one pod (allocatable after GKE's "
            "reservations, less the system DaemonSets)")


def max_workers(machine: Machine, batch_size: int, image_size: int) -> int:
    """The most DataLoader workers whose pod still fits ``machine`` (-1: not even the main process)."""
    workers = -1
    while misfit(pod_size(workers + 1, batch_size, image_size), machine) is None and workers < 256:
        workers += 1
    return workers
