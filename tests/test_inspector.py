"""The inspector's morning and the engineer's commands (issue 25), run for real.

The fixture copies the session pipeline's registry + warehouse (v1 trained and promoted), keeps a
real Dagster instance in a temporary DAGSTER_HOME, predicts 2026-11-01 with v1, registers v2 (v1's
weights, its own run) and promotes it, then predicts 2026-11-02 (uploads) and 2026-11-03 (no
uploads) with v2. Up to 2026-11-06 that is: 11-01 stale, 11-02 landed, 11-03 empty, 11-04..06
missing.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import duckdb
import mlflow
import pandas as pd
import pytest

from sofar_assets import cli
from sofar_assets.config import load_config
from sofar_assets.definitions import build_definitions
from sofar_assets.lib.review import health
from sofar_assets.lib.review import queue as review
from sofar_assets.lib.serving import registry
from sofar_assets.lib.warehouse import LABEL_CORRECTIONS
from sofar_assets.settings import REPO_ROOT

from conftest import DAYS, _assets, write_config

EMPTY_DAY = dt.date(2026, 11, 3)  # no uploads in the demo data
UNTIL = dt.date(2026, 11, 6)


@pytest.fixture(scope="module")
def morning(pipeline, demo_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("morning")
    src = Path(pipeline["cfg"].root)
    (folder / "state").mkdir()
    for name in ("mlflow.db", "warehouse.duckdb"):
        shutil.copy2(src / name, folder / "state" / name)
    with duckdb.connect(str(folder / "state" / "warehouse.duckdb")) as con:  # only the days made here:
        for (schema,) in con.execute("SELECT table_schema FROM information_schema.tables "
                                     "WHERE table_name = 'predictions'").fetchall():
            # other tests' days in the shared state are not ours
            con.execute(f'DROP TABLE "{schema}".predictions')
    path = write_config(folder, demo_data)
    cfg = load_config(path)
    defs = build_definitions(cfg)
    home = folder / "dagster_home"
    home.mkdir()
    instance = dg.DagsterInstance.from_config(str(home))

    def predict(day: dt.date, last: dt.date | None = None):
        tags = None if last is None else {"dagster/asset_partition_range_start": day.isoformat(),
                                          "dagster/asset_partition_range_end": last.isoformat()}
        result = dg.materialize(_assets(defs), selection=dg.AssetSelection.assets("daily_predictions"),
                                partition_key=None if last else day.isoformat(), tags=tags,
                                resources=defs.resources, instance=instance)
        assert result.success
        return result

    predict(DAYS[0])
    client, name = defs.resources["mlflow_tracking"].client(), cfg.model.name
    v1 = client.get_model_version(name, "1")
    with mlflow.start_run(experiment_id=client.get_run(v1.run_id).info.experiment_id) as run:
        mlflow.log_dict(mlflow.artifacts.load_dict(f"runs:/{v1.run_id}/evaluation.json"), "evaluation.json")
    v2 = client.create_model_version(name, v1.source, run_id=run.info.run_id)
    registry.write_calibration(client, name, v2.version, registry.read_calibration(v1))
    for key, value in dict(v1.tags).items():
        if key.startswith(("dataset_hash", "test_")):
            client.set_model_version_tag(name, v2.version, key, value)
    previous = registry.set_champion(client, name, str(v2.version))
    registry.record_promotion(client, name, str(v2.version), previous,
                              by="dora", reason="retrained", via="test", gate="passed")
    ranged = predict(DAYS[1], EMPTY_DAY)
    instance.dispose()
    return {"ranged": ranged, "path": path, "cfg": cfg, "client": client, "home": home,
            "wh": defs.resources["warehouse"].get(), "v2": str(v2.version)}


@pytest.fixture
def sofar(morning, monkeypatch, capsys):
    monkeypatch.setenv("SOFAR_CONFIG", str(morning["path"]))
    monkeypatch.setenv("DAGSTER_HOME", str(morning["home"]))

    def run(*args: str):
        code = cli.main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def _env(morning) -> dict:
    return {**os.environ, "SOFAR_CONFIG": str(morning["path"]), "DAGSTER_HOME": str(morning["home"]),
            "PYTHONPATH": str(REPO_ROOT)}


# -- every day's health ------------------------------------------------------------------------------
def test_versions_compare_as_numbers_and_days_are_marked():
    assert health.newest(["9", "10", "2"]) == "10" and max(["9", "10"]) == "9"  # what max() over text did
    days = health.day_range(dt.date(2026, 11, 1), dt.date(2026, 11, 6))
    counts = {days[0]: {"9": 5}, days[1]: {"10": 4}, days[4]: {"10": 1, "9": 2}}
    marks = health.day_health(days, counts, "10", materialized={days[0], days[1], days[2]}, failed={days[3]})
    assert [m["state"] for m in marks] == ["stale", "landed", "empty", "failed", "stale", "missing"]
    assert list(marks[4]["versions"]) == ["10", "9"]  # newest first, by number
    assert health.backfill_range(marks) == (days[3], days[5])
    assert health.day_range(days[0], days[5], 2) == days[4:]
    # yesterday in the partitions' time zone: at 20:00 UTC on 12-06 it is already 12-07 in Seoul
    at = dt.datetime(2026, 12, 6, 20, tzinfo=dt.UTC)
    assert health.yesterday("UTC", at) == dt.date(2026, 12, 5)
    assert health.yesterday("Asia/Seoul", at) == dt.date(2026, 12, 6)


def test_status_walks_every_day_and_prints_the_backfill(sofar, morning):
    code, out, _ = sofar("status", "--until", UNTIL.isoformat())
    assert code == 0, out
    if os.environ.get("SOFAR_SHOTS_DIR"):  # the text capture for the note
        Path(os.environ["SOFAR_SHOTS_DIR"], "sofar-status.txt").write_text(
            f"$ sofar status --until {UNTIL}\n{out}")
    states = {line.split()[0]: line.split()[1] for line in out.splitlines()
              if line.startswith("  2026-11-0") and " .. " not in line}
    assert states == {"2026-11-01": "stale", "2026-11-02": "landed", "2026-11-03": "empty"}
    assert "2026-11-04 .. 2026-11-06  missing (3 days)" in out
    assert f"(champion is v{morning['v2']})" in out  # the stale day says which version is champion now
    assert "backfill the missing/failed days: sofar backfill 2026-11-04 2026-11-06" in out
    assert "re-score the stale days with v2: sofar backfill 2026-11-01 2026-11-01" in out
    assert "{" not in out and "0.0144967" not in out  # no Python dicts, no 16-digit floats
    code, out, _ = sofar("status", "--until", UNTIL.isoformat(), "--days", "2", "--json")
    report = json.loads(out)
    assert ([(d["day"], d["state"]) for d in report["days"]]
            == [("2026-11-05", "missing"), ("2026-11-06", "missing")])
    assert (report["champion"]["version"] == morning["v2"]
            and report["backfill"] == "sofar backfill 2026-11-05 2026-11-06")


@pytest.mark.parametrize("days", ["0", "-1", "x"])
def test_status_days_must_be_positive(sofar, capsys, days):
    with pytest.raises(SystemExit) as exc:
        cli.main(["status", "--days", days])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "not a positive whole number" in err and "Traceback" not in err


def test_a_closed_pipe_ends_quietly(morning):
    proc = subprocess.Popen([sys.executable, "-m", "sofar_assets.cli", "status"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(morning), cwd=REPO_ROOT)
    proc.stdout.close()  # `sofar status | head -0`: the reader is gone before the first line
    err = proc.stderr.read().decode()
    proc.wait(timeout=300)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_help_imports_nothing_heavy():
    code = ("import sys; from sofar_assets import cli; cli.build_parser().format_help(); "
            "print([m for m in ('pandas', 'dagster', 'mlflow', 'torch') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


# -- show ------------------------------------------------------------------------------------------
def test_show_an_empty_materialized_day_and_a_stale_day(sofar, morning):
    code, out, err = sofar("show", EMPTY_DAY.isoformat())
    assert code == 0 and "was materialized with no uploads" in out and "materialize that partition" not in err
    code, _, err = sofar("show", "2026-11-05")
    assert code == 1 and "materialize that partition" in err
    code, out, _ = sofar("show", DAYS[0].isoformat(), "--out", str(Path(morning["cfg"].root) / "x.png"))
    assert code == 0 and f"stale: scored by v1, the champion is now v{morning['v2']}" in out


def test_show_ood_does_not_overwrite_the_full_sheet(sofar, morning):
    review_dir = Path(morning["cfg"].root) / "review"
    assert sofar("show", DAYS[1].isoformat())[0] == 0
    full = (review_dir / f"{DAYS[1]}.png").read_bytes()
    code, out, _ = sofar("show", DAYS[1].isoformat(), "--ood")
    assert code == 0 and f"review sheet: {review_dir / f'{DAYS[1]}-ood.png'}" in out
    assert (review_dir / f"{DAYS[1]}.png").read_bytes() == full


def test_least_confident_is_not_padded_with_sure_photos():
    rows = pd.DataFrame({"image_id": ["a", "b", "c"], "image_uri": ["/a", "/b", "/c"],
                         "top1_label": ["x"] * 3,
                         "top1_prob": [0.62, 0.9999, 1.0], "ood_score": [0.0] * 3, "is_ood": [False] * 3,
                         "error": [None] * 3})
    picked = review.select_for_review(rows, least_confident=8)
    assert list(picked["image_id"]) == ["a"]


# -- the queue and verdicts ------------------------------------------------------------------------
def test_judged_photos_leave_the_queue_and_a_second_verdict_warns(sofar, morning):
    wh, day = morning["wh"], DAYS[0]
    first = review.review_queue(wh, "predictions", day)
    assert len(first) >= 1  # (fewer OOD flags since ood.threshold: between; one photo is enough here)
    judged = first["image_id"].iloc[0]
    code, _, err = sofar("correct", judged, "irrelevant", "--inspector", "erin")
    assert code == 0 and "already judged" not in err
    code, out, _ = sofar("review", day.isoformat(), "--limit", "200")
    assert code == 0 and judged not in out and "1 already judged" in out
    assert judged not in set(review.review_queue(wh, "predictions", day)["image_id"])
    assert sum(review.review_queue_counts(wh, "predictions", day).values()) == len(first) - 1
    code, _, err = sofar("correct", judged, "irrelevant", "--inspector", "erin")
    assert code == 0 and f"note: {judged} was already judged 'irrelevant' by erin" in err
    code, out, _ = sofar("review", day.isoformat(), "--json")
    assert json.loads(out)["judged"] == 1


def test_page_verdicts_are_validated_stored_once_and_undone(morning):
    wh, day, vocab = morning["wh"], DAYS[1], morning["cfg"].vocabulary()
    image_id = review.review_queue(wh, "predictions", day)["image_id"].iloc[0]
    page = review.page_queue(wh, "predictions", day)
    unsure = page[page["reason"] == review.LEAST_CONFIDENT]
    assert (unsure["top1_prob"] < review.CONFIDENT).all() and (unsure["label_set_size"] == 1).all()
    assert (list(page["image_id"][:len(page) - len(unsure)])
            == list(review.review_queue(wh, "predictions", day)["image_id"]))
    got = review.record_verdict(wh, image_id, vocab[0], vocab, inspector="fay")
    again = review.record_verdict(wh, image_id, vocab[0], vocab, inspector="fay")
    assert got["stored"] and not again["stored"] and again["corrected_at"] == got["corrected_at"]
    rows = review.earlier_verdicts(wh, [image_id])
    assert len(rows[rows["inspector"] == "fay"]) == 1  # a repeated verdict is stored once
    from sofar_assets.lib.review.corrections import CorrectionError

    with pytest.raises(CorrectionError, match="not-a-label"):
        review.record_verdict(wh, image_id, "not-a-label", vocab, inspector="fay")
    assert review.retract_verdict(wh, day, image_id, inspector="fay", corrected_at=got["corrected_at"]) == 1
    assert review.earlier_verdicts(wh, [image_id]).empty
    assert image_id in set(review.review_queue(wh, "predictions", day)["image_id"])
    assert wh.table_exists(LABEL_CORRECTIONS.name)


def test_serve_refuses_to_bind_beyond_loopback(sofar):
    code, _, err = sofar("review", "--serve", "--host", "0.0.0.0")
    assert code == 1 and "refusing to serve on 0.0.0.0" in err and "--i-am-behind-iap" in err


# -- the engineer's commands -----------------------------------------------------------------------
def test_versions_lists_gate_dataset_and_history(sofar, morning):
    code, out, _ = sofar("versions")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].endswith(f"champion v{morning['v2']}")
    v1 = next(line for line in lines if line.strip().startswith("v1 "))
    dataset = dict(morning["client"].get_model_version(morning["cfg"].model.name, "1").tags)["dataset_hash"]
    assert dataset[:12] in v1 and "passed" in v1
    assert any(line.strip().startswith(f"*v{morning['v2']}") for line in lines)
    assert f"v1 -> v{morning['v2']} by dora" in out
    report = json.loads(sofar("versions", "--json")[1])
    assert [v["version"] for v in report["versions"]] == ["1", morning["v2"]]
    assert report["versions"][0]["gate_checks"] and all(report["versions"][0]["gate_checks"].values())


def test_backfill_submits_as_the_ui_does_and_refuses_bad_ranges(sofar, monkeypatch):
    import httpx

    sent = []

    def fake_post(url, json=None, timeout=None):
        sent.append((url, json))
        body = {"data": {"launchPartitionBackfill": {"__typename": "LaunchBackfillSuccess",
                                                     "backfillId": "abc"}}}
        return httpx.Response(200, json=body, request=httpx.Request("POST", url))

    with monkeypatch.context() as m:
        m.setattr(httpx, "post", fake_post)
        code, out, err = sofar("backfill", "2026-11-04", "2026-11-06", "--dagster-url", "http://dagster:3000")
    assert code == 0, err
    url, body = sent[0]
    assert url == "http://dagster:3000/graphql" and "launchPartitionBackfill" in body["query"]
    assert body["variables"]["p"]["partitionNames"] == ["2026-11-04", "2026-11-05", "2026-11-06"]
    assert body["variables"]["p"]["assetSelection"] == [{"path": ["daily_predictions"]}]
    assert "backfill abc" in out and "http://dagster:3000/runs/b/abc" in out
    for args, why in ((("2026-11-06", "2026-11-04"), "backwards"), (("2026-10-01", "2026-11-02"), "before"),
                      (("2026-11-01", "2999-01-01"), "not complete yet")):
        code, _, err = sofar("backfill", *args)
        assert code == 1 and why in err and len(err.strip().splitlines()) == 1
    code, _, err = sofar("backfill", "2026-11-04", "2026-11-04", "--dagster-url", "http://127.0.0.1:9")
    assert code == 1 and "no Dagster webserver answered at http://127.0.0.1:9" in err


def test_retrain_runs_train_and_promote_only(sofar, monkeypatch):
    ran = []

    def fake_run(cmd, check=False):
        ran.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    code, out, _ = sofar("retrain", "--local")
    assert code == 0
    assert ran[0][1:6] == ["launch", "-m", "sofar_assets.definitions", "--job", "train_and_promote"]
    assert not any("demo-data" in part for part in ran[0])


# -- the review page in a real browser -----------------------------------------------------------------
CHROMIUM = Path("/usr/bin/chromium")  # Debian's package: `make chromium` installs it (make test needs it)
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture
def page_url(morning, monkeypatch):
    import socket
    import threading
    import time

    import uvicorn

    monkeypatch.setenv("SOFAR_CONFIG", str(morning["path"]))
    app = cli.review_app(morning["cfg"], DAYS[1], inspector="gus")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(300):
        if server.started:
            break
        time.sleep(0.1)
    assert server.started, "the review page did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


def test_review_page_in_a_real_browser(morning, page_url, tmp_path):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make chromium` (as root; `make test` does it)")
    from playwright.sync_api import sync_playwright

    shots = Path(os.environ.get("SOFAR_SHOTS_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    wh, day, vocab = morning["wh"], DAYS[1], morning["cfg"].vocabulary()
    expected = review.page_queue(wh, "predictions", day)
    assert len(expected) >= 2 and expected["image_id"].is_unique

    def left(page) -> int:
        return int(page.text_content("#left"))

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"{page_url}/?day={day}")
        page.wait_for_function("() => { const i = document.getElementById('photo');"
                               " return i.complete && i.naturalWidth > 0; }")
        assert left(page) == len(expected)
        first = page.text_content("#image-id")
        assert first == expected["image_id"].iloc[0]
        assert "inspector gus" in page.text_content("header")
        page.screenshot(path=str(shots / "review-page-before.png"))
        page.keyboard.press("1")  # the first label of the vocabulary
        page.wait_for_function(f"() => document.getElementById('left').textContent === '{len(expected) - 1}'")
        second = page.text_content("#image-id")
        assert second != first
        page.keyboard.press("i")  # irrelevant
        page.wait_for_function(f"() => document.getElementById('left').textContent === '{len(expected) - 2}'")
        page.keyboard.press("u")  # undo the last one
        page.wait_for_function(f"() => document.getElementById('left').textContent === '{len(expected) - 1}'")
        assert page.text_content("#image-id") == second
        page.wait_for_function("() => { const i = document.getElementById('photo');"
                               " return i.complete && i.naturalWidth > 0; }")
        page.screenshot(path=str(shots / "review-page-after.png"))
        page.reload()  # the queue comes from the warehouse again: the judged photo has left it
        assert left(page) == len(expected) - 1 and page.text_content("#image-id") == second
        browser.close()
    stored = review.earlier_verdicts(wh, [first, second])
    assert stored[["image_id", "label", "inspector"]].values.tolist() == [[first, vocab[0], "gus"]]


# -- the Dagster UI and MLflow at a glance ----------------------------------------------------------
def test_dagster_metadata_reads_at_a_glance(pipeline, morning):
    result = pipeline["result"]
    classifier = result.asset_materializations_for_node("sofar_classifier")[-1].metadata
    run_id = classifier["mlflow_run_id"].value
    assert classifier["training_curves"].value.endswith(
        f"/get-artifact?path=training_curves.png&run_uuid={run_id}")
    evaluation = result.asset_materializations_for_node("model_evaluation")[-1].metadata
    assert evaluation["ece"].value == round(evaluation["ece"].value, 4)  # not 0.014496708800914223
    assert isinstance(evaluation["reliability"], dg.UrlMetadataValue)
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    ece = checks["ece_below_ceiling"].metadata
    assert (isinstance(ece["ceiling"], dg.TextMetadataValue)
            and isinstance(ece["min_test_images"], dg.TextMetadataValue))
    # a range run: each partition's own figures first, the run's after; checks say which days
    mats = {m.partition: m.metadata
            for m in morning["ranged"].asset_materializations_for_node("daily_predictions")}
    own = list(mats[DAYS[1].isoformat()])
    assert (own[:3] == ["dagster/row_count", "uploads", "rows"]
            and own.index("review_page") < own.index("run_rows"))
    assert mats[DAYS[1].isoformat()]["review_page"].value.endswith(f"/?day={DAYS[1]}")
    range_checks = {c.check_name: c for c in morning["ranged"].get_asset_check_evaluations()}
    assert range_checks["ood_rate_vs_trailing_7_days"].description == f"days {DAYS[1]} .. {EMPTY_DAY}"
    assert isinstance(range_checks["ood_rate_vs_trailing_7_days"].metadata["compared_days"],
                      dg.TextMetadataValue)


def test_mlflow_runs_log_their_dataset(pipeline):
    client = pipeline["defs"].resources["mlflow_tracking"].client()
    mv = client.get_model_version(pipeline["cfg"].model.name, "1")
    inputs = client.get_run(mv.run_id).inputs.dataset_inputs
    assert [i.dataset.name for i in inputs] == ["sofar_dataset"]
    assert inputs[0].dataset.digest == dict(mv.tags)["dataset_hash"][:16]
    assert "warehouse.duckdb" in inputs[0].dataset.source and inputs[0].tags[0].value == "training"
