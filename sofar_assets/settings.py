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
    head = REPO_ROOT / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            ref_path = REPO_ROOT / ".git" / ref[5:]
            if ref_path.exists():
                return ref_path.read_text().strip()
            packed = REPO_ROOT / ".git" / "packed-refs"
            for line in packed.read_text().splitlines() if packed.exists() else []:
                if line.endswith(" " + ref[5:]):
                    return line.split()[0]
            return "unknown"
        return ref
    except OSError:
        return "unknown"
