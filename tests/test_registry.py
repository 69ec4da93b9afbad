"""The registry's bookkeeping (lib/serving/registry.py) on a real sqlite MLflow registry: the champion
stack that rollback walks back, version numbers, one-line reasons, and the gate's evidence read
from what the registry holds (the version's logged evaluation and metrics, its recorded gate)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import pytest
from mlflow import MlflowClient

from sofar_assets.config import GateConfig, load_config
from sofar_assets.definitions import build_definitions
from sofar_assets.lib.serving import registry

from conftest import _assets, write_config

NAME = "sofar-classifier"


@pytest.fixture
def client(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)  # not the process-wide registry other tests set
    c.create_experiment("sofar", artifact_location=(tmp_path / "artifacts").as_uri())
    c.create_registered_model(NAME)
    return c


def _evaluation(version: str, **changes) -> dict:
    return {"model_name": NAME, "version": version, "macro_f1": 0.9, "accuracy": 0.9, "ece": 0.05,
            "ece_ci": [0.01, 0.1], "macro_f1_ci": [0.8, 0.95], "test_images": 40, "ood_auroc": {"docs": 0.95},
            "ood_images": {"docs": 20}, "champion_version": None, "champion_macro_f1": None, "probe": {},
            **changes}


def _version(client, evaluation: dict | None = None, *, metrics: dict | None = None) -> str:
    """A registered version whose run logged ``evaluation`` (evaluation.json) and its test metrics."""
    exp = client.get_experiment_by_name("sofar").experiment_id
    run = client.create_run(exp)
    mv = client.create_model_version(NAME, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    ev = evaluation or _evaluation(str(mv.version))
    client.log_dict(run.info.run_id, ev, "evaluation.json")
    logged = {"test_macro_f1": ev["macro_f1"], "test_accuracy": ev["accuracy"], "test_ece": ev["ece"]}
    for k, v in (logged if metrics is None else metrics).items():
        client.log_metric(run.info.run_id, k, v)
    client.set_terminated(run.info.run_id)
    return str(mv.version)


def test_versions_are_numbers():
    assert registry.parse_version("02") == "2" and registry.parse_version("v3") == "3"
    assert registry.parse_version(" 10 ") == "10"
    for bad in ("", "0", "two", "2.0", "-1", "١"):  # the last: an Arabic-Indic digit
        with pytest.raises(ValueError, match="not a model version"):
            registry.parse_version(bad)


def test_promoting_02_records_v2_and_the_chain_holds(client):
    v1, v2 = _version(client), _version(client)
    registry.set_champion(client, NAME, v1)
    previous = registry.set_champion(client, NAME, "02")
    assert previous == v1 and registry.champion_version(client, NAME) == "2"
    registry.record_promotion(client, NAME, "2", previous, by="alice", reason="r", via="test", gate="passed")
    assert f"v{v1} -> v{v2} by alice" in client.get_registered_model(NAME).description
    assert registry.champion_stack(client, NAME) == [v1, v2]


def test_rollback_twice_goes_two_champions_back(client):
    v1, v2, v3 = (_version(client) for _ in range(3))
    for v in (v1, v2, v3):
        registry.set_champion(client, NAME, v)
    target = registry.rollback_target(client, NAME, v3)
    assert target == v2
    registry.set_champion(client, NAME, target, rollback=True)
    target = registry.rollback_target(client, NAME, v2)
    assert target == v1  # the old code went back to v3 (the version v2 replaced last)
    registry.set_champion(client, NAME, target, rollback=True)
    assert registry.champion_version(client, NAME) == v1
    assert registry.rollback_target(client, NAME, v1) is None  # nothing older was champion
    # an alias moved by hand in the MLflow UI: a rollback returns to the champion it replaced
    client.set_registered_model_alias(NAME, registry.CHAMPION, v3)
    assert registry.rollback_target(client, NAME, v3) == v1


@pytest.mark.parametrize("reason", ["ok\n- 2026-01-01T00:00:00+00:00 v9 -> v1 by admin: forged", "a\rb",
                                    "\x1b[2Jcleared", "line\u2028break"])
def test_a_reason_is_one_line(client, reason):
    v1 = _version(client)
    registry.set_champion(client, NAME, v1)
    with pytest.raises(ValueError, match="control character"):
        registry.record_promotion(client, NAME, v1, None, by="x", reason=reason, via="t", gate="passed")
    assert "forged" not in (client.get_registered_model(NAME).description or "")


def test_the_gate_is_rechecked_under_the_gate_recorded_on_the_version(client):
    v1 = _version(client, _evaluation("1", ece=0.15))
    strict = GateConfig(max_ece=0.10)
    registry.record_gate_config(client, NAME, v1, strict)
    loose = GateConfig(max_ece=0.5)  # the caller's config: would pass it
    verdict, source = registry.registry_gate(client, NAME, v1, loose)
    assert not verdict["ece_below_ceiling"][0] and "trained under" in source
    assert verdict["ece_below_ceiling"][1]["ceiling"] == 0.10


def test_an_edited_evaluation_is_refused(client, tmp_path):
    v1 = _version(client, _evaluation("1", ece=0.45))
    gate = GateConfig(max_ece=0.2)
    verdict, _ = registry.registry_gate(client, NAME, v1, gate)
    assert not verdict["ece_below_ceiling"][0]
    # the IO manager's copy edited: refused, naming the field
    with pytest.raises(registry.EvidenceError, match=r"differs .* in ece"):
        registry.registry_gate(client, NAME, v1, gate, offered=_evaluation("1", ece=0.0))
    # the artifact itself edited (the artifact store is a bucket too): the run's metrics disagree
    run_id = client.get_model_version(NAME, v1).run_id
    client.log_dict(run_id, _evaluation("1", ece=0.0), "evaluation.json")
    with pytest.raises(registry.EvidenceError, match="test_ece=0.45"):
        registry.registry_gate(client, NAME, v1, gate)
    # another version's passing evaluation copied into this run
    v2 = _version(client, _evaluation("1"))
    with pytest.raises(registry.EvidenceError, match="not this version"):
        registry.registered_evaluation(client, NAME, v2)


def test_champion_model_refuses_an_edited_io_manager_evaluation(pipeline, demo_data, tmp_path):
    """The IO manager's model_evaluation.json (a bucket in production) edited so that a version
    that failed the gate passes: champion_model must refuse, the champion stays."""
    shutil.copytree(Path(pipeline["cfg"].root), tmp_path / "state")
    cfg = load_config(write_config(tmp_path, demo_data))
    defs = build_definitions(cfg)
    client = defs.resources["mlflow_tracking"].client()
    name = cfg.model.name
    assert registry.champion_version(client, name) == "1"
    # v2: v1's weights, evaluated with an ECE over the ceiling (logged like model_evaluation does)
    v1 = client.get_model_version(name, "1")
    stored = Path(cfg.io_manager_base) / "model_evaluation.json"
    ev = {**json.loads(stored.read_text()), "version": "2", "ece": 0.9, "champion_version": "1"}
    run = client.create_run(client.get_run(v1.run_id).info.experiment_id)
    mv = client.create_model_version(name, v1.source, run_id=run.info.run_id)
    assert str(mv.version) == "2"
    client.log_dict(run.info.run_id, ev, "evaluation.json")
    for k, key in registry.EVIDENCE_METRICS.items():
        client.log_metric(run.info.run_id, k, ev[key])
    registry.write_calibration(client, name, "2", registry.read_calibration(v1))
    stored.write_text(json.dumps({**ev, "ece": 0.0}))  # the edit: ECE 0.0 passes the ceiling

    result = dg.materialize(_assets(defs), selection=dg.AssetSelection.assets("champion_model"),
                            resources=defs.resources, instance=dg.DagsterInstance.ephemeral(),
                            raise_on_error=False)
    assert not result.success
    failure = result.failure_data_for_node("champion_model").user_failure_data.description
    assert "differs from the one logged to its MLflow run in ece" in failure
    assert registry.champion_version(client, name) == "1"
    assert "promotion_gate" not in dict(client.get_model_version(name, "2").tags)
    # the honest stored copy: the registry's verdict (ECE 0.9 over the ceiling) refuses too
    stored.write_text(json.dumps(ev))
    result = dg.materialize(_assets(defs), selection=dg.AssetSelection.assets("champion_model"),
                            resources=defs.resources, instance=dg.DagsterInstance.ephemeral(),
                            raise_on_error=False)
    failure = result.failure_data_for_node("champion_model").user_failure_data.description
    assert "ece_below_ceiling" in failure and registry.champion_version(client, name) == "1"


def test_a_deleted_registry_is_an_error_and_creating_one_is_explicit(pipeline, demo_data, tmp_path, monkeypatch,
                                                                     capsys):
    """Issue 23 item 4: with mlflow.db deleted, training created a new registry and a new "v1"
    while the warehouse held rows saying model_version=1 of the old one."""
    import datetime as dt

    import duckdb
    import pandas as pd

    from sofar_assets import cli
    from sofar_assets.lib.warehouse import PREDICTIONS

    shutil.copytree(Path(pipeline["cfg"].root), tmp_path / "state")
    with duckdb.connect(str(tmp_path / "state" / "warehouse.duckdb")) as con:  # only the rows made here
        for (schema,) in con.execute("SELECT table_schema FROM information_schema.tables "
                                     "WHERE table_name = 'predictions'").fetchall():
            con.execute(f'DROP TABLE "{schema}".predictions')
    path = write_config(tmp_path, demo_data)
    cfg = load_config(path)
    defs = build_definitions(cfg)
    wh = defs.resources["warehouse"].get()
    day = dt.date(2026, 11, 1)
    rows = pd.DataFrame([{"prediction_date": day, "image_id": f"{day}/{i}.jpg", "image_uri": f"/u/{i}.jpg",
                          "model_name": cfg.model.name, "model_version": "1"} for i in range(3)])
    wh.append_rows(PREDICTIONS, rows.reindex(columns=list(PREDICTIONS.columns)))
    db = tmp_path / "state" / "mlflow.db"
    db.unlink()

    result = dg.materialize(_assets(defs), selection=dg.AssetSelection.assets("sofar_classifier"),
                            resources=defs.resources, instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    assert not result.success
    failure = result.failure_data_for_node("sofar_classifier").user_failure_data.description
    assert f"MLflow registry {db} (missing file) has no model {cfg.model.name!r}" in failure
    assert "3 prediction rows from its versions (up to v1)" in failure and "sofar init-registry" in failure
    assert not db.exists()  # nothing was created

    monkeypatch.setenv("SOFAR_CONFIG", str(path))
    assert cli.main(["init-registry"]) == 0
    out = capsys.readouterr().out
    assert f"registered model {cfg.model.name!r} created" in out and "3 prediction rows" in out and db.is_file()
    resource = defs.resources["mlflow_tracking"]
    resource.require_registry(cfg.model.name, registry.predicted_versions(wh, cfg.model.name))  # now it passes
    assert cli.main(["init-registry"]) == 0 and "nothing changed" in capsys.readouterr().out


def test_a_first_run_creates_the_registry(tmp_path, demo_data):
    """An empty warehouse: training may create the registry (the first run)."""
    cfg = load_config(write_config(tmp_path, demo_data))
    defs = build_definitions(cfg)
    resource = defs.resources["mlflow_tracking"]
    predicted = registry.predicted_versions(defs.resources["warehouse"].get(), cfg.model.name)
    assert predicted == {}
    resource.require_registry(cfg.model.name, predicted)  # no error
    assert resource.setup() and (Path(cfg.root) / "mlflow.db").is_file()
