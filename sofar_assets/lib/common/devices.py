"""Device choice shared by training and inference (torch only: inference must not import timm)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import torch

from sofar_assets import settings


class GpuMissingError(RuntimeError):
    """A step that was given a GPU sees none: the node's driver or the image is broken."""


def driver_report() -> str:
    """What the NVIDIA driver says on this machine, in one line (or that there is none)."""
    version = Path("/proc/driver/nvidia/version")
    if version.is_file():
        return version.read_text(errors="replace").splitlines()[0].strip()
    smi = shutil.which("nvidia-smi") or next(
        (p for p in ("/usr/local/nvidia/bin/nvidia-smi",) if Path(p).is_file()), None)  # GKE mounts it here
    if smi is None:
        return "no NVIDIA driver visible (no /proc/driver/nvidia/version, no nvidia-smi)"
    try:
        out = subprocess.run([smi, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"nvidia-smi failed: {err}"
    return (out.stdout or out.stderr).strip().replace("\n", "; ") or f"nvidia-smi exited {out.returncode}"


def cuda_init_error() -> str | None:
    """Why torch cannot initialise CUDA (its own message), or None when it can."""
    try:
        torch.cuda.init()
    except Exception as err:  # torch raises RuntimeError / AssertionError with the reason
        return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return None


def gpu_missing_message() -> str:
    return (f"this step was given a GPU (SOFAR_REQUIRE_GPU=1) but torch sees no CUDA device: torch "
            f"{torch.__version__} built for CUDA {torch.version.cuda or 'none (a CPU-only build)'}; driver: "
            f"{driver_report()}; torch says: {cuda_init_error() or 'no device'}. Refusing to fall back to the "
            "CPU (docs/production.md: the node pool's driver must support the image's CUDA)")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when available; asking for ``cuda`` without one is an error, and so is
    any device but CUDA in a pod that was given a GPU (``settings.gpu_required``)."""
    if settings.gpu_required() and not torch.cuda.is_available():
        raise GpuMissingError(gpu_missing_message())
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use auto, cpu or cuda")
    return dev
