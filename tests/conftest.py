"""Shared fixtures: the real sample photos and a tiny, fully materialized pipeline."""

from __future__ import annotations

import datetime as dt
import os
import threading
from pathlib import Path

import pytest
import yaml

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "sofar-public-samples"
DAYS = (dt.date(2026, 11, 1), dt.date(2026, 11, 2))


def prediction_rows(day: dt.date, ids: list[str], prob: float = 0.9):
    """A few rows shaped like the predictions table, for warehouse tests."""
    import pandas as pd

    n = len(ids)
    return pd.DataFrame({"prediction_date": [day] * n, "image_id": ids, "top1_label": ["dirt"] * n,
                         "top1_prob": [prob] * n, "is_ood": [False] * n, "error": [None] * n})


@pytest.fixture(scope="session")
def samples() -> Path:
    if not (SAMPLES / "CAR_DEFECT_RECOGNITION").is_dir():
        pytest.skip(f"real sample photos not found at {SAMPLES} (../shared/data/sofar-public-samples)")
    return SAMPLES


def write_config(folder: Path, data: Path, **overrides) -> Path:
    """A tiny but complete config over SYNTHETIC data in ``data`` (see lib/data/synthetic.py)."""
    cfg = {
        "tasks": {
            "defect": {"folder": str(data / "tasks/defect"),
                       "labels": {"0_NORMAL": "normal", "1_DEFECT": "defect"}},
            "dirt": {"folder": str(data / "tasks/dirt"),
                     "labels": {"0_NORMAL": "normal", "1_DIRT": "dirt"}},
            "wash": {"folder": str(data / "tasks/wash"),
                     "labels": {"0_BUBBLE": "bubble_wash", "1_MACHINE": "wash_machine"}},
            "interior": {"folder": str(data / "tasks/interior"),
                         "labels": {"0_DASHBOARD": "dashboard", "1_SEAT": "seat"}},
        },
        "uploads": {"folder": str(data / "uploads")},
        "ood_sets": {"documents": {"folder": str(data / "ood/documents")}},
        "partitions": {"start_date": "2026-11-01"},
        "storage": {"root": str(folder / "state")},
        "dataset": {"val_fraction": 0.25, "test_fraction": 0.25},
        "model": {"image_size": 64},
        "train": {"epochs": 3, "freeze_backbone": True, "lr": 0.02, "batch_size": 16},
        "inference": {"num_workers": 0, "batch_size": 16},
        "ood": {"score": "knn"},  # daily predictions then serve a feature score (test_pipeline checks it)
        "gate": {"min_ood_auroc": 0.6, "max_ece": 0.5, "max_macro_f1_drop": 0.05},
    }
    for key, value in overrides.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path = folder / "sofar.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    from sofar_assets.lib.data.synthetic import generate_demo_data

    out = tmp_path_factory.mktemp("demo-data")
    generate_demo_data(out, per_class=12, days=DAYS, per_day=9, ood_per_set=8, corrupt_upload_on=DAYS[1])
    return out


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory, demo_data):
    """The training group materialized once on tiny synthetic data (shared by several tests)."""
    import dagster as dg

    from sofar_assets.config import load_config
    from sofar_assets.definitions import TRAINING_SELECTION, build_definitions

    folder = tmp_path_factory.mktemp("pipeline")
    cfg = load_config(write_config(folder, demo_data))
    defs = build_definitions(cfg)
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        _assets(defs), selection=TRAINING_SELECTION,
        resources=defs.resources, instance=instance,
    )
    assert result.success
    return {"cfg": cfg, "defs": defs, "instance": instance, "result": result, "folder": folder}


def _assets(defs):
    """Assets + asset checks of a Definitions, for dagster.materialize."""
    return [*defs.assets, *(defs.asset_checks or [])]


@pytest.fixture(scope="session")
def emulator():
    """The local BigQuery emulator (bqemulator in .venv-bq; `make test` sets it up)."""
    from bq_emulator import Emulator, EmulatorUnavailable

    emu = Emulator()
    try:
        emu.start()
    except EmulatorUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture(autouse=True)
def _no_hub_downloads(monkeypatch):
    # Nothing may download weights at run time: make any attempt fail fast and loudly.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", os.environ.get("TORCH_HOME", "/nonexistent-torch-home"))


SECRET = b"root:x:0:0:SECRET-TOKEN-1234\n"  # what a leaked file would look like in an error row


def _bounded(fn, *args, limit_s: float = 60.0, **kwargs):
    """Call ``fn`` in a daemon thread: a read that blocks (a pipe) fails the test instead of hanging it.

    The bound is generous on purpose: it separates "returns" from "blocks forever", not fast from slow.
    """
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(limit_s)
    assert not t.is_alive(), f"{fn.__name__}{args} still running after {limit_s} s: it blocks"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.fixture
def photos(demo_data) -> list[Path]:
    return sorted((demo_data / "uploads" / DAYS[0].isoformat()).iterdir())[:3]

