"""The one module that reads environment variables.

Everything else receives a :class:`~sofar_assets.config.SofarConfig`. Switching environments
(local DuckDB + sqlite MLflow + folders, or BigQuery + MLflow server + GCS + Kubernetes) is
switching the YAML file that ``SOFAR_CONFIG`` names.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "config" / "demo.yaml"


def config_path() -> Path:
    """The YAML config in force: ``$SOFAR_CONFIG`` or the repo's demo config."""
    raw = os.environ.get("SOFAR_CONFIG", "").strip()
    return Path(raw).expanduser().resolve() if raw else DEFAULT_CONFIG


def git_commit() -> str:
    """The code's git commit, for tagging model versions; ``unknown`` outside a checkout."""
    env = os.environ.get("SOFAR_GIT_COMMIT")  # set by images built without .git
    if env:
        return env
    git = REPO_ROOT / ".git"
    try:
        if git.is_file():  # a worktree or submodule: ".git" names the real git directory
            git = (REPO_ROOT / git.read_text().strip().removeprefix("gitdir:").strip()).resolve()
        ref = (git / "HEAD").read_text().strip()
        if not ref.startswith("ref: "):
            return ref
        common = git
        if (git / "commondir").is_file():  # refs of a worktree live in the main git directory
            common = (git / (git / "commondir").read_text().strip()).resolve()
        for base in (git, common):
            if (base / ref[5:]).exists():
                return (base / ref[5:]).read_text().strip()
        packed = common / "packed-refs"
        for line in packed.read_text().splitlines() if packed.exists() else []:
            if line.endswith(" " + ref[5:]):
                return line.split()[0]
        return "unknown"
    except OSError:
        return "unknown"


def gpu_required() -> bool:
    """True inside a step pod that was given a GPU (``SOFAR_REQUIRE_GPU=1``, set by the op tags of
    defs/k8s.py): there, a torch that sees no CUDA is a broken driver or image, not a CPU machine."""
    return os.environ.get("SOFAR_REQUIRE_GPU", "").strip() == "1"


def gcs_emulator_host() -> str | None:
    """``$STORAGE_EMULATOR_HOST`` (google-cloud-storage talks to that emulator): the local stack."""
    return os.environ.get("STORAGE_EMULATOR_HOST") or None


def current_image() -> str | None:
    """``$DAGSTER_CURRENT_IMAGE``: the image of the code server (the Dagster chart sets it)."""
    return os.environ.get("DAGSTER_CURRENT_IMAGE") or None


def dagster_home() -> Path | None:
    """The Dagster instance's folder (``$DAGSTER_HOME``), or None when unset: ``sofar status``
    then cannot tell an empty materialized day from a missing one."""
    raw = os.environ.get("DAGSTER_HOME", "").strip()
    return Path(raw).expanduser() if raw else None
