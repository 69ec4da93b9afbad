"""The `sofar` command line, run for real against a copy of the session pipeline's state.

The `pipeline` fixture trained and promoted v1. These tests copy its MLflow registry and
DuckDB warehouse into a temporary root (so moving @champion here cannot disturb other tests),
point SOFAR_CONFIG at a config over that copy, predict one day, and run the commands.
"""

from __future__ import annotations

import datetime as dt
import io
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import mlflow
import pytest
import yaml
from PIL import Image

from sofar_assets import cli
from sofar_assets.config import load_config
from sofar_assets.definitions import build_definitions
from sofar_assets.lib.model.gate import GATE_CHECKS
from sofar_assets.lib.serving import registry
from sofar_assets.settings import REPO_ROOT

from conftest import DAYS, _assets, write_config


@pytest.fixture(scope="module")
def state(pipeline, demo_data, tmp_path_factory):
    """A config over a copy of the pipeline's registry + warehouse, with DAYS[0] predicted."""
    folder = tmp_path_factory.mktemp("cli")
    src = Path(pipeline["cfg"].root)
    (folder / "state").mkdir()
    for name in ("mlflow.db", "warehouse.duckdb"):
        shutil.copy2(src / name, folder / "state" / name)
    path = write_config(folder, demo_data)
    cfg = load_config(path)
    defs = build_definitions(cfg)
    result = dg.materialize(_assets(defs), selection=dg.AssetSelection.assets("daily_predictions"),
                            partition_key=DAYS[0].isoformat(), resources=defs.resources,
                            instance=dg.DagsterInstance.ephemeral())
    assert result.success
    client = defs.resources["mlflow_tracking"].client()
    return {"path": path, "cfg": cfg, "client": client, "folder": folder,
            "wh": defs.resources["warehouse"].get()}


@pytest.fixture
def sofar(state, monkeypatch, capsys):
    """Run `sofar ARGS` in process with SOFAR_CONFIG set; returns (exit code, stdout, stderr)."""
    monkeypatch.setenv("SOFAR_CONFIG", str(state["path"]))

    def run(*args: str):
        code = cli.main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def _new_version(state, evaluation: dict, *, calibrated: bool = True) -> str:
    """Register another version of the model (same weights as v1, its own run and evaluation)."""
    client, name = state["client"], state["cfg"].model.name
    v1 = client.get_model_version(name, "1")
    with mlflow.start_run(experiment_id=client.get_run(v1.run_id).info.experiment_id) as run:
        pass
    mv = client.create_model_version(name, v1.source, run_id=run.info.run_id)
    evaluation = {**evaluation, "version": str(mv.version)}  # logged like model_evaluation logs it
    client.log_dict(run.info.run_id, evaluation, "evaluation.json")
    for metric, key in registry.EVIDENCE_METRICS.items():
        client.log_metric(run.info.run_id, metric, evaluation[key])
    if calibrated:
        registry.write_calibration(client, name, mv.version, registry.read_calibration(v1))
    return str(mv.version)


def _evaluation(state, **changes) -> dict:
    v1 = state["client"].get_model_version(state["cfg"].model.name, "1")
    return {**mlflow.artifacts.load_dict(f"runs:/{v1.run_id}/evaluation.json"), **changes}


def _champion(state) -> str:
    return registry.champion_version(state["client"], state["cfg"].model.name)


def test_help_lists_every_command_in_a_real_process():
    out = subprocess.run([sys.executable, "-m", "sofar_assets.cli", "--help"], capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=120)
    assert out.returncode == 0
    for cmd in ("validate", "status", "show", "review", "promote", "rollback", "add-task", "demo-data",
                "summary"):
        assert cmd in out.stdout
    for cmd in ("show", "promote", "rollback", "add-task"):
        sub = subprocess.run([sys.executable, "-m", "sofar_assets.cli", cmd, "--help"], capture_output=True,
                             text=True, cwd=REPO_ROOT, timeout=120)
        assert sub.returncode == 0 and "usage: sofar " + cmd in sub.stdout


def test_validate_broken_config_is_one_block_without_traceback(tmp_path, demo_data):
    bad = yaml.safe_load(write_config(tmp_path, demo_data).read_text())
    bad["train"]["epoch"] = 3                      # typo of 'epochs'
    bad["tasks"]["dirt"]["lables"] = {"x": "y"}    # typo of 'labels'
    bad["inference"]["batch_size"] = 0             # out of range
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    out = subprocess.run([sys.executable, "-m", "sofar_assets.cli", "validate"],
                         capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=120, env={**_env(), "SOFAR_CONFIG": str(path)})
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert lines[0] == f"{path}: invalid config"
    assert "  train.epoch: unknown key; did you mean 'epochs'?" in out.stderr
    assert "  tasks.dirt.lables: unknown key; did you mean 'labels'?" in out.stderr
    assert "  inference.batch_size: Input should be greater than or equal to 1 (got 0)" in out.stderr
    assert len(lines) == 4  # one block: the file, then one line per problem


def _env() -> dict:
    import os

    return dict(os.environ)


def test_validate_ok_and_missing_folder(sofar, state, tmp_path, monkeypatch):
    code, out, _ = sofar("validate")
    assert code == 0 and "OK" in out and "defect" in out
    data = yaml.safe_load(state["path"].read_text())
    data["uploads"]["folder"] = str(tmp_path / "nowhere")
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("SOFAR_CONFIG", str(broken))
    code, out, err = sofar("validate")
    assert code == 2 and f"uploads.folder: folder does not exist: {tmp_path / 'nowhere'}" in err


def test_status_shows_champion_gate_and_day_counts(sofar, state):
    code, out, _ = sofar("status")
    assert code == 0
    assert f"models:/{state['cfg'].model.name}/{_champion(state)}" in out
    n_checks = len(GATE_CHECKS)
    assert f"gate:      passed ({n_checks}/{n_checks} checks)" in out
    rows = len(state["wh"].read_range("predictions", "prediction_date",
                                      DAYS[0], DAYS[0] + dt.timedelta(days=1)))
    assert rows > 0
    assert any(line.split()[:3] == [DAYS[0].isoformat(), "landed", str(rows)] for line in out.splitlines())
    assert "#/models/" in out  # the MLflow version link


def test_show_writes_the_review_sheet_and_prints_the_rows(sofar, state, tmp_path):
    out_file = tmp_path / "sheet.png"
    code, out, _ = sofar("show", DAYS[0].isoformat(), "--out", str(out_file))
    assert code == 0 and out_file.is_file()
    assert Image.open(io.BytesIO(out_file.read_bytes())).format == "PNG"
    rows = state["wh"].read_range("predictions", "prediction_date", DAYS[0], DAYS[0] + dt.timedelta(days=1))
    scored = rows[rows["error"].isna()]
    flagged = scored[scored["is_ood"]]
    assert f"{DAYS[0]}: {len(rows)} rows, {len(flagged)} OOD-flagged" in out
    for image_id in flagged["image_id"]:
        assert image_id in out  # every flagged photo is listed
    assert f"review sheet: {out_file}" in out
    code, out_ood, _ = sofar("show", DAYS[0].isoformat(), "--ood", "--out", str(tmp_path / "ood.png"))
    assert code == 0 and "least_confident" not in out_ood
    code, _, err = sofar("show", "2026-10-01")
    assert code == 1 and "no rows for 2026-10-01" in err


def test_review_prints_the_days_queue_and_draws_it(sofar, state, tmp_path):
    from sofar_assets.lib.review.queue import review_queue_counts

    mv = registry.champion(state["client"], state["cfg"].model.name)
    assert registry.read_calibration(mv).label_sets is not None  # ood_calibration tagged the rule
    rows = state["wh"].read_range("predictions", "prediction_date", DAYS[0], DAYS[0] + dt.timedelta(days=1))
    scored = rows[rows["error"].isna()]
    assert scored["label_set"].notna().all() and rows.loc[rows["error"].notna(), "label_set"].isna().all()
    assert (scored["label_set_size"]
            == scored["label_set"].map(lambda s: len([x for x in s.split("|") if x]))).all()
    in_queue = scored[scored["is_ood"] | (scored["label_set_size"] != 1)]
    counts = review_queue_counts(state["wh"], "predictions", DAYS[0])
    assert sum(counts.values()) == len(in_queue)
    out_file = tmp_path / "queue.png"
    code, out, _ = sofar("review", DAYS[0].isoformat(), "--limit", "200", "--out", str(out_file))
    assert code == 0 and f"{DAYS[0]}: review queue {len(in_queue)} (" in out
    for image_id in in_queue["image_id"]:
        assert image_id in out
    for image_id in set(scored["image_id"]) - set(in_queue["image_id"]):
        assert image_id not in out  # one label and not OOD: not in the queue
    assert (Image.open(io.BytesIO(out_file.read_bytes())).format == "PNG"
            and f"review sheet: {out_file}" in out)
    code, _, err = sofar("review", "2026-10-01")
    assert code == 1 and "no rows for 2026-10-01" in err


def test_promote_checks_the_gate_records_who_and_why_and_rollback_returns(sofar, state):
    name, client = state["cfg"].model.name, state["client"]
    assert _champion(state) == "1"
    # the pipeline's own move (the champion_model asset) is recorded like a move by hand
    first = dict(client.get_model_version(name, "1").tags)
    assert (first["promoted_via"].startswith("champion_model (run ")
            and first["promotion_gate"].startswith("passed"))
    assert first["promoted_from"] == "" and "v- -> v1 by " in client.get_registered_model(name).description
    good = _new_version(state, _evaluation(state, champion_version="1"))
    bad = _new_version(state, _evaluation(state, ece=0.99))  # fails ece_below_ceiling
    raw = _new_version(state, _evaluation(state), calibrated=False)
    try:
        code, _, err = sofar("promote", bad, "--reason", "try it")
        assert code == 1 and "FAILED ece_below_ceiling" in err and _champion(state) == "1"
        code, _, err = sofar("promote", raw, "--reason", "x", "--force")
        assert code == 1 and "no OOD calibration tags" in err and _champion(state) == "1"

        code, out, _ = sofar("promote", good, "--reason", "retrained on November uploads", "--by", "alice")
        assert code == 0 and _champion(state) == good
        tags = dict(client.get_model_version(name, good).tags)
        assert tags["promoted_by"] == "alice" and tags["promoted_reason"] == "retrained on November uploads"
        assert tags["promoted_from"] == "1" and tags["promotion_gate"].startswith("passed")
        assert dt.datetime.fromisoformat(tags["promoted_at"]) <= dt.datetime.now(dt.UTC)
        desc = client.get_registered_model(name).description
        assert f"v1 -> v{good} by alice (sofar promote" in desc

        code, out, _ = sofar("promote", bad, "--reason", "hotfix, gate known bad", "--force", "--by", "bob")
        assert code == 0 and _champion(state) == bad
        assert dict(client.get_model_version(name, bad).tags)["promotion_gate"].startswith("forced; FAILED")

        code, out, _ = sofar("rollback", "--reason", "bad ECE in production", "--by", "carol")
        assert code == 0 and _champion(state) == good  # back to the version `bad` replaced
        tags = dict(client.get_model_version(name, good).tags)
        assert tags["promoted_by"] == "carol" and tags["promoted_via"] == "sofar rollback"
        desc = client.get_registered_model(name).description
        # newest first
        assert desc.index(f"v{bad} -> v{good} by carol") < desc.index(f"v{good} -> v{bad} by bob")
        code, out, _ = sofar("status")
        assert "moved by carol" in out and "bad ECE in production" in out
    finally:
        registry.set_champion(client, name, "1")


def test_promote_takes_numbers_one_line_reasons_the_recorded_gate_and_rollback_walks_back(sofar, state):
    """Issue 23 item 7: `promote 02` recorded `v2 -> v02`; a newline in --reason forged history
    lines; rollback twice went back and forth; the gate was re-checked with the caller's config."""
    name, client = state["cfg"].model.name, state["client"]
    assert _champion(state) == "1"
    a = _new_version(state, _evaluation(state, champion_version="1"))
    b = _new_version(state, _evaluation(state, champion_version="1"))
    strict = _new_version(state, _evaluation(state, champion_version="1", ece=0.3))  # config's ceiling: 0.5
    registry.record_gate_config(client, name, strict, state["cfg"].gate.model_copy(update={"max_ece": 0.2}))
    try:
        code, out, _ = sofar("promote", f"0{a}", "--reason", "leading zero")
        assert code == 0 and _champion(state) == a and f"v1 -> v{a} " in out
        assert f"v1 -> v{a} by " in client.get_registered_model(name).description
        code, _, err = sofar("promote", b, "--reason",
                             "ok\n- 2026-01-01T00:00:00+00:00 v9 -> v1 by admin: forged")
        assert code == 1 and "control character" in err and _champion(state) == a
        assert "forged" not in client.get_registered_model(name).description
        code, _, err = sofar("promote", "2.5", "--reason", "x")
        assert code == 1 and "not a model version" in err
        # the caller's gate (max_ece 0.5) would pass it; the one recorded at training (0.2) does not
        code, _, err = sofar("promote", strict, "--reason", "looser gate")
        assert code == 1 and "FAILED ece_below_ceiling" in err and "trained under" in err
        code, _, _ = sofar("promote", b, "--reason", "next")
        assert code == 0 and _champion(state) == b
        code, _, _ = sofar("rollback", "--reason", "b is bad")
        assert code == 0 and _champion(state) == a
        code, _, _ = sofar("rollback", "--reason", "a is bad too")
        assert code == 0 and _champion(state) == "1"  # two steps back, not back to b
    finally:
        registry.set_champion(client, name, "1")


def test_add_task_writes_the_entry_keeps_comments_and_validates(sofar, state, tmp_path, monkeypatch, samples):
    path = tmp_path / "sofar.yaml"
    path.write_text("# my comment\n" + state["path"].read_text() + "# trailing comment\n")
    monkeypatch.setenv("SOFAR_CONFIG", str(path))
    folder = samples / "CAR_DEFECT_RECOGNITION"
    code, _, err = sofar("add-task", "scratch", str(folder), "--labels", "0_NORMAL=normal")
    assert code == 2 and "1_DEFECT" in err and "not mapped" in err  # validated first: file untouched
    assert "scratch" not in path.read_text()
    code, out, _ = sofar("add-task", "scratch", str(folder),
                         "--labels", "0_NORMAL=normal", "1_DEFECT=scratch")
    assert code == 0, out
    text = path.read_text()
    assert text.startswith("# my comment\n") and text.endswith("# trailing comment\n")
    cfg = load_config(path)
    assert cfg.tasks["scratch"].labels == {"0_NORMAL": "normal", "1_DEFECT": "scratch"}
    assert Path(cfg.resolve(cfg.tasks["scratch"].folder)) == folder.resolve()
    assert "scratch" in cfg.vocabulary() and set(cfg.tasks) >= {"defect", "dirt", "scratch"}
    code, _, err = sofar("add-task", "scratch", str(folder), "--labels", "0_NORMAL=normal")
    assert code == 1 and "already exists" in err
    code, _, err = sofar("add-task", "Bad-Name", str(folder),
                         "--labels", "0_NORMAL=normal", "1_DEFECT=scratch")
    assert code == 2 and "lower_snake_case" in err


def test_demo_data_and_summary(sofar, tmp_path):
    code, out, _ = sofar("demo-data", "--out", str(tmp_path / "demo"))
    assert code == 0 and (tmp_path / "demo" / "SYNTHETIC.md").is_file()
    code, out, _ = sofar("summary")
    assert code == 0 and "=== sofar_assets: summary ===" in out and DAYS[0].isoformat() in out
    assert "sofar show" in out


def test_logging_a_model_prints_no_third_party_warnings(tmp_path, caplog):
    """What made `make run` noisy when a version is registered: MLflow's type-hint and
    input-example UserWarnings and its CloudPickle warning (fixed at source in lib/serving/packaging.py)."""
    import logging
    import warnings

    import pandas as pd
    from PIL import Image

    from sofar_assets.lib.model.models import ModelSpec, build_model
    from sofar_assets.lib.serving import registry
    from sofar_assets.lib.serving.packaging import load_registered, log_and_register

    spec = ModelSpec(num_classes=3, arch="linear", backbone="efficientnet_lite0", image_size=32,
                     pretrained=False, pmg_feature_dim=8)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        exp = mlflow.create_experiment("quiet", artifact_location=(tmp_path / "art").as_uri())
        caplog.set_level(logging.WARNING, logger="mlflow")
        with warnings.catch_warnings(record=True) as caught, mlflow.start_run(experiment_id=exp):
            warnings.simplefilter("always")
            reg = log_and_register(build_model(spec), spec, ["a", "b", "c"], "quiet-model")
            registry.write_calibration(mlflow.MlflowClient(), "quiet-model", str(reg["version"]),
                                       registry.Calibration("max_logit", 1.0, 0.0))
        _, meta = load_registered(reg["model_uri"])
        pyfunc = mlflow.pyfunc.load_model(reg["model_uri"])  # the logged code loads and predicts
        photo = io.BytesIO()
        Image.new("RGB", (40, 30), (200, 10, 10)).save(photo, format="JPEG")
        rows = pyfunc.predict(pd.DataFrame({"image": [photo.getvalue(), b"junk"]}))
        assert list(rows["model_version"]) == ["1", "1"] and rows["error"][0] is None
        assert rows["error"][1].startswith("ImageDecodeError: 1:")
    finally:
        mlflow.set_tracking_uri(previous)
    assert meta["classes"] == ["a", "b", "c"]
    noisy = [str(w.message) for w in caught if "mlflow" in w.filename or issubclass(w.category, UserWarning)]
    assert noisy == []
    assert [r.getMessage() for r in caplog.records
            if r.name.startswith("mlflow") and r.levelno >= logging.WARNING] == []


def test_dagster_and_mlflow_link_each_other(pipeline):
    """Dagster metadata links the MLflow run and version; MLflow carries the Dagster run URL, the
    registry descriptions, and the classic-ML experiment kind."""
    from sofar_assets.lib.common import links

    cfg, result = pipeline["cfg"], pipeline["result"]
    client = pipeline["defs"].resources["mlflow_tracking"].client()
    mv = client.get_model_version(cfg.model.name, "1")
    run = client.get_run(mv.run_id)
    dagster_run = links.dagster_run_url(cfg.ui.dagster_url, result.run_id)
    assert run.data.tags["dagster_run_url"] == dagster_run == dict(mv.tags)["dagster_run_url"]
    assert dagster_run in mv.description and "val macro-F1" in mv.description
    assert "@champion" in client.get_registered_model(cfg.model.name).description
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags[links.EXPERIMENT_KIND_TAG] == links.CLASSIC_ML_KIND
    version_url = links.mlflow_version_url(cfg.ui.mlflow_url, cfg.model.name, "1")
    run_url = links.mlflow_run_url(cfg.ui.mlflow_url, run.info.experiment_id, mv.run_id)
    for asset, expected in (("sofar_classifier", {version_url, run_url}),
                            ("model_evaluation", {version_url, run_url}),
                            ("champion_model", {version_url})):
        md = result.asset_materializations_for_node(asset)[-1].metadata
        assert {v.value for k, v in md.items()
                if k.startswith("mlflow_") and isinstance(v, dg.UrlMetadataValue)} == expected


def test_a_hung_mlflow_api_is_one_line_naming_the_server(tmp_path, demo_data, monkeypatch, capsys):
    """Issue 23 item 11: a server whose /health answers but whose API never does held `sofar
    status` for 100 s and ended in a traceback. A real local HTTP server that accepts and never
    answers (its handler threads wait on an event, released at the end)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    release = threading.Event()
    seen = []

    class Hung(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            seen.append(self.path)
            if self.path == "/health":
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"OK")
                return
            release.wait(60)  # bounded: the test releases it

        do_POST = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hung)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        path = write_config(tmp_path, demo_data, storage={"root": str(tmp_path / "state"), "mlflow": {
            "tracking_uri": uri, "http_timeout_s": 1, "http_max_retries": 0}})
        monkeypatch.setenv("SOFAR_CONFIG", str(path))
        code = cli.main(["status"])
        err = capsys.readouterr().err
    finally:
        release.set()
        server.shutdown()
        server.server_close()
    assert code == 1 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert f"MLflow server {uri} did not answer" in err and "waited 1 s per request, 1 try" in err
    assert any(p.startswith("/api/") for p in seen)  # the API was really asked, and hung
