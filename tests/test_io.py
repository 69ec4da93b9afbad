"""No pickles between steps (defs/io.py): a tampered step output cannot run code, a non-JSON output
is refused naming the asset."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import dagster as dg

from sofar_assets.defs.resources import build_resources

from conftest import _assets

# -- item 6: no pickles between steps -------------------------------------------------------------


class _Payload:
    """Unpickling this creates a file: proof that a pickle loader ran code from the IO base."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_tampered_step_output_cannot_execute_code(pipeline, tmp_path):
    cfg = pipeline["cfg"]
    stored = sorted(p for p in Path(cfg.io_manager_base).rglob("*") if p.is_file() and not p.name.startswith("."))
    evaluation = [p for p in stored if p.name.startswith("model_evaluation")]
    assert evaluation, f"no stored output of model_evaluation under {cfg.io_manager_base}: {stored}"
    # every output between our assets is plain data today (a JSON text file)
    for p in stored:
        assert p.read_bytes()[:1] in (b"{", b"["), f"{p} is not JSON: {p.read_bytes()[:2]!r}"
    # a copy of the IO base, with model_evaluation's output replaced by a code-running pickle
    io_base = tmp_path / "io"
    shutil.copytree(cfg.io_manager_base, io_base)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(str(marker)))
    for p in evaluation:
        (io_base / p.relative_to(cfg.io_manager_base)).write_bytes(payload)
    cfg2 = cfg.model_copy(update={"storage": cfg.storage.model_copy(update={"io_manager_base": str(io_base)})})
    defs = pipeline["defs"]
    result = dg.materialize(
        _assets(defs), selection=dg.AssetSelection.assets("champion_model"),
        resources={**defs.resources, "io_manager": build_resources(cfg2)["io_manager"]},
        instance=pipeline["instance"], raise_on_error=False,
    )
    assert not marker.exists(), "unpickling the tampered output ran code"
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    text = str(failure.step_failure_data.error.to_string())
    assert "model_evaluation" in text and "not JSON" in text and str(io_base) in text


def test_a_non_json_output_is_refused_naming_the_asset(tmp_path):
    import numpy as np

    from sofar_assets.defs.io import JsonIOManager, StepOutputError

    @dg.asset
    def numbers() -> dict:
        return {"count": np.int64(3)}

    result = dg.materialize([numbers], resources={"io_manager": JsonIOManager(base_dir=str(tmp_path))},
                            raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    text = failure.step_failure_data.error.to_string()
    assert StepOutputError.__name__ in text and "asset numbers" in text and "not JSON" in text

    @dg.asset
    def scores() -> dict:
        return {"auroc": float("nan"), "sets": {"receipts": [0.5, 1.0]}}

    @dg.asset
    def report(scores: dict) -> dict:
        return {"sets": list(scores["sets"]), "auroc_is_nan": scores["auroc"] != scores["auroc"]}

    result = dg.materialize([scores, report], resources={"io_manager": JsonIOManager(base_dir=str(tmp_path))})
    assert result.output_for_node("report") == {"sets": ["receipts"], "auroc_is_nan": True}
    assert (tmp_path / "scores.json").read_text().startswith("{")


