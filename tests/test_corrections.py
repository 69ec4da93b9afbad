"""Inspectors' corrections: validated all-or-nothing, a task source of the dataset, and the
champion's real-world accuracy per day (lib/review/corrections.py, lib/review/field_accuracy.py,
defs/corrections.py, `sofar correct`)."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from sofar_assets import cli
from sofar_assets.config import load_config
from sofar_assets.definitions import build_definitions
from sofar_assets.lib.review import corrections as corr
from sofar_assets.lib.review import field_accuracy as fa
from sofar_assets.lib.warehouse import (
    INT64,
    LABEL_CORRECTIONS,
    PREDICTIONS,
    RAW_CORRECTIONS,
    STRING,
    DuckDBWarehouse,
    TableSchema,
)

from conftest import _assets, write_config

D1, D2 = dt.date(2026, 11, 1), dt.date(2026, 11, 2)
# the predictions table once conformal label sets land (the contract: labels joined by "|")
SETS = ("label_set", "label_set_size")
WITH_SETS = TableSchema(PREDICTIONS.name,
                        {**PREDICTIONS.columns, "label_set": STRING, "label_set_size": INT64},
                        partition_column=PREDICTIONS.partition_column, clustering=PREDICTIONS.clustering)
WITHOUT_SETS = TableSchema(PREDICTIONS.name, {c: t for c, t in PREDICTIONS.columns.items() if c not in SETS},
                           partition_column=PREDICTIONS.partition_column, clustering=PREDICTIONS.clustering)


def predictions(day: dt.date, rows: list[tuple], *, uri_root: str = "/uploads",
                sets: bool = True) -> pd.DataFrame:
    """Rows of the predictions table: (image_id, top1_label, is_ood, label_set or None, error or None)."""
    df = pd.DataFrame([{
        "prediction_date": day, "image_id": i, "image_uri": f"{uri_root}/{i}",
        "top1_label": None if err else top1, "top1_prob": None if err else 0.8,
        "top2_label": None, "top2_prob": None, "ood_score": None if err else 3.0,
        "is_ood": None if err else ood, "error": err, "model_name": "m", "model_version": "1",
        "predicted_at": pd.Timestamp("2026-11-03 02:00"),
        **({"label_set": None if err else label_set,
            "label_set_size": (None if err or label_set is None
                               else len([x for x in label_set.split("|") if x]))}
           if sets else {}),
    } for i, top1, ood, label_set, err in rows])
    return df.astype({"label_set_size": "Int64"}) if sets else df


def verdict(image_id: str, label: str, day: dt.date, at: str, who: str = "kim") -> dict:
    return {"image_id": image_id, "image_uri": f"/uploads/{image_id}", "label": label, "inspector": who,
            "corrected_at": pd.Timestamp(at), "prediction_date": day}


@pytest.fixture
def setup(tmp_path, demo_data, monkeypatch):
    """A config over the demo data with a fabricated predictions table (no model needed)."""
    path = write_config(tmp_path, demo_data)
    cfg = load_config(path)
    wh = DuckDBWarehouse(cfg.duckdb_path, schema=cfg.storage.warehouse.schema_)
    wh.append_rows(WITH_SETS,
                   predictions(D1, [(f"{D1}/{n}.jpg", "dirt", False, "dirt", None) for n in "abc"]))
    wh.append_rows(WITH_SETS, predictions(D2, [(f"{D2}/d.jpg", "normal", True, "", None)]))
    monkeypatch.setenv("SOFAR_CONFIG", str(path))
    return {"cfg": cfg, "wh": wh, "path": path, "folder": tmp_path}


def sofar(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def stored(wh) -> pd.DataFrame:
    if not wh.table_exists(LABEL_CORRECTIONS.name):
        return pd.DataFrame()
    return (wh.read_table(LABEL_CORRECTIONS.name)
            .sort_values(["image_id", "corrected_at"]).reset_index(drop=True))


# -- the CLI: a bad batch is rejected whole, naming the row; nothing stored is lost ------------------
def test_correct_one_and_a_csv_then_reimport_adds_nothing(setup, capsys):
    wh = setup["wh"]
    code, out, err = sofar(capsys, "correct", f"{D1}/a.jpg", "normal", "--inspector", "park")
    assert code == 0, err
    assert "1 correction(s) appended" in out
    row = stored(wh).iloc[0]
    assert (row["label"], row["inspector"], row["image_uri"], row["prediction_date"]) == (
        "normal", "park", f"/uploads/{D1}/a.jpg", D1)  # uri and day come from the predictions table
    csv = setup["folder"] / "verdicts.csv"
    csv.write_text(f"image_id,label,corrected_at\n{D1}/b.jpg,dirt,2026-11-02T09:00:00+09:00\n"
                   f"{D2}/d.jpg,irrelevant,2026-11-03 10:00\n")
    code, out, err = sofar(capsys, "correct", "--csv", str(csv), "--inspector", "lee")
    assert code == 0, err
    table = stored(wh)
    assert len(table) == 3
    b = table[table["image_id"] == f"{D1}/b.jpg"].iloc[0]
    assert b["corrected_at"] == pd.Timestamp("2026-11-02 00:00") and b["inspector"] == "lee"  # +09:00 -> UTC
    code, out, _ = sofar(capsys, "correct", "--csv", str(csv), "--inspector", "lee")
    assert code == 0 and "0 correction(s) appended" in out and "2 already stored" in out
    assert len(stored(wh)) == 3


@pytest.mark.parametrize("body, expected", [
    ("image_id,label\n{a},dirt\n{b},dirtt\n", ["row 2 (line 3)", "image_id '{b}'", "'dirtt'", "did you mean 'dirt'"]),
    ("image_id,label\n{a},dirt\n2026-11-01/nope.jpg,normal\n",
     ["row 2 (line 3)", "image_id '2026-11-01/nope.jpg'", "unknown image id"]),
    ("image_id,lable\n{a},dirt\n", ["line 1 (header)", "missing column(s) ['label']", "unknown column 'lable'"]),
    ("image_id,label,corrected_at\n{a},dirt,2026-11-02\n{b},normal,yesterday\n",
     ["row 2 (line 3)", "image_id '{b}'", "corrected_at 'yesterday' is not an ISO 8601 time"]),
    ("image_id,label,corrected_at\n{a},dirt,2062-01-01T00:00:00\n", ["row 1 (line 2)", "in the future"]),
])
def test_a_bad_row_rejects_the_whole_csv_and_keeps_what_is_stored(setup, capsys, body, expected):
    wh = setup["wh"]
    assert sofar(capsys, "correct", f"{D1}/c.jpg", "seat")[0] == 0
    before = stored(wh)
    ids = {"a": f"{D1}/a.jpg", "b": f"{D1}/b.jpg"}
    csv = setup["folder"] / "bad.csv"
    csv.write_text(body.format(**ids))
    code, out, err = sofar(capsys, "correct", "--csv", str(csv))
    assert code == 2, (out, err)
    assert str(csv) in err and "nothing was written" in err
    for text in expected:
        assert text.format(**ids) in err
    assert "Traceback" not in err
    pd.testing.assert_frame_equal(stored(wh), before)  # the good row of the batch was not written either


def test_reimporting_a_csv_without_corrected_at_adds_nothing_and_a_changed_mind_is_kept(setup, capsys):
    """Issue 25: two imports of a two-line file without corrected_at stored 4 rows."""
    wh = setup["wh"]
    csv = setup["folder"] / "verdicts.csv"
    csv.write_text(f"image_id,label,inspector\n{D1}/a.jpg,normal,kim\n{D1}/b.jpg,dirt,kim\n")
    for _ in range(2):
        assert sofar(capsys, "correct", "--csv", str(csv))[0] == 0
    assert len(stored(wh)) == 2
    # the same verdict by another inspector is another verdict; a changed mind (A, B, A) is kept
    code, out, _ = sofar(capsys, "correct", f"{D1}/a.jpg", "normal", "--inspector", "lee")
    assert code == 0 and "1 correction(s) appended" in out
    for label in ("dirt", "normal"):
        assert sofar(capsys, "correct", f"{D1}/a.jpg", label, "--inspector", "lee")[0] == 0
    assert stored(wh)["image_id"].eq(f"{D1}/a.jpg").sum() == 4
    assert corr.latest_per_image(wh).set_index("image_id").loc[f"{D1}/a.jpg", "label"] == "normal"


# Each process waits at every warehouse lookup until the other reached it too: both have read
# what is stored before either appends (the race two operators importing at once can lose).
_RACER = """
import os, sys, time
from pathlib import Path
from sofar_assets.lib.warehouse import DuckDBWarehouse
from sofar_assets import cli

barrier, me, calls = Path(sys.argv[1]), sys.argv[2], [0]
original = DuckDBWarehouse.rows_where_in

def synchronised(self, *args, **kwargs):
    out = original(self, *args, **kwargs)
    calls[0] += 1
    (barrier / f"{calls[0]}-{me}").touch()
    deadline = time.monotonic() + 60
    while len(list(barrier.glob(f"{calls[0]}-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    return out

DuckDBWarehouse.rows_where_in = synchronised
sys.exit(cli.main(["correct", "--csv", sys.argv[3]]))
"""


def test_two_concurrent_imports_of_one_file_store_each_verdict_once(setup):
    """Issue 23 item 8: two `sofar correct --csv` of the same file at once stored each verdict twice."""
    import os
    import subprocess
    import sys

    from sofar_assets.settings import REPO_ROOT

    csv = setup["folder"] / "verdicts.csv"
    csv.write_text(f"image_id,label,inspector,corrected_at\n{D1}/a.jpg,normal,kim,\n{D1}/b.jpg,dirt,kim,\n"
                   f"{D2}/d.jpg,irrelevant,kim,2026-11-03T10:00:00Z\n")
    barrier = setup["folder"] / "barrier"
    barrier.mkdir()
    env = {**os.environ, "SOFAR_CONFIG": str(setup["path"]), "PYTHONPATH": str(REPO_ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(barrier), name, str(csv)], cwd=REPO_ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("p1", "p2")]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert len(list(barrier.glob("1-*"))) == 2  # both met after their first lookup
    table = stored(setup["wh"])
    assert len(table) == 3 and not table.duplicated(["image_id", "label", "inspector"]).any()
    outs = " ".join(out for out, _ in results)
    assert "3 correction(s) appended" in outs and "0 correction(s) appended" in outs


@pytest.mark.parametrize("cell, expected", [
    ("=HYPERLINK(\"http://x\")", "column inspector starts with '='"),
    ("+1", "column inspector starts with '+'"),
    ("-bob", "column inspector starts with '-'"),
    ("@kim", "column inspector starts with '@'"),
    ("\"kim\tlee\"", "column inspector contains the control character \\t"),
    ("\"kim\rlee\"", "column inspector contains the control character \\r"),
    ("kim\x1b[31m", "column inspector contains the control character \\x1b"),
])
def test_inspector_text_refuses_control_characters_and_formulas(setup, capsys, cell, expected):
    csv = setup["folder"] / "hostile.csv"
    csv.write_bytes(f"image_id,label,inspector\n{D1}/a.jpg,normal,kim\n{D1}/b.jpg,dirt,{cell}\n".encode())
    code, _, err = sofar(capsys, "correct", "--csv", str(csv))
    assert code == 2 and f"{csv} row 2 (line " in err and expected in err, err
    assert "Traceback" not in err and stored(setup["wh"]).empty


def test_a_csv_field_over_the_limit_is_an_error_naming_the_row(setup, capsys):
    csv = setup["folder"] / "huge.csv"
    csv.write_text(f"image_id,label,inspector\n{D1}/a.jpg,normal,kim\n{D1}/b.jpg,dirt,{'k' * 131_073}\n")
    code, _, err = sofar(capsys, "correct", "--csv", str(csv))
    assert code == 2 and f"{csv} row 2 (line 3)" in err and "field larger than field limit (131072)" in err
    assert "Traceback" not in err and stored(setup["wh"]).empty


def test_a_file_name_suggests_the_image_id(setup, capsys):
    """Issue 25: `sofar correct 20261102_007.jpg normal` (the sheet's caption) gave no hint."""
    code, _, err = sofar(capsys, "correct", "d.jpg", "normal")
    assert code == 2 and f"unknown image id (not in the predictions table); did you mean '{D2}/d.jpg'?" in err
    code, _, err = sofar(capsys, "correct", "b", "normal")  # without its extension
    assert code == 2 and f"did you mean '{D1}/b.jpg'?" in err


def test_unknown_id_and_label_on_the_command_line_exit_2(setup, capsys):
    code, _, err = sofar(capsys, "correct", "2026-11-09/x.jpg", "Dirt")
    assert code == 2
    assert "image_id '2026-11-09/x.jpg': label 'Dirt' is not a class" in err and "did you mean 'dirt'" in err
    assert "image_id '2026-11-09/x.jpg': unknown image id" in err
    assert not setup["wh"].table_exists(LABEL_CORRECTIONS.name)
    code, _, err = sofar(capsys, "correct", f"{D1}/a.jpg")
    assert code == 1 and "IMAGE_ID LABEL" in err


# -- real-world accuracy per day: a hand count ---------------------------------------------------------
HAND = [  # image, top1, is_ood, label set, error | verdicts (label, corrected_at), the latest wins
    ("a", "dirt", False, "dirt|normal", None, [("dirt", "2026-11-02 09:00")]),  # right, covered
    ("b", "normal", False, "normal", None, [("dirt", "2026-11-02 09:00")]),  # wrong, not covered
    ("c", "defect", False, "defect", None, [("defect", "2026-11-02 09:00"), ("dirt", "2026-11-02 10:00")]),  # wrong
    ("d", "seat", True, "", None, [("irrelevant", "2026-11-02 09:00")]),  # flagged, irrelevant
    ("e", "normal", True, "", None, [("normal", "2026-11-02 09:00")]),  # flagged but relevant; right; empty set
    ("f", "dirt", False, "dirt", None, [("irrelevant", "2026-11-02 09:00")]),  # irrelevant, missed
    ("g", None, None, None, "OSError: unreadable", [("normal", "2026-11-02 09:00")]),  # error row: not counted
    ("h", "dirt", False, "dirt", None, []),  # not judged: not counted
    ("i", "normal", False, "normal|dirt", None, [("normal", "2026-11-02 09:00")]),  # right, covered
    ("j", "dashboard", True, "", None, [("irrelevant", "2026-11-02 09:00")]),  # flagged, irrelevant
    ("k", "seat", False, "seat", None, [("irrelevant", "2026-11-02 09:00")]),  # irrelevant, missed
]
# by hand, D1: judged scored rows a b c d e f i j k = 9; judged a class: a b c e i = 5,
# top-1 right: a e i = 3; verdict in the set: a i = 2 (c's latest verdict is dirt, its set is {defect});
# flagged: d e j = 3, of which irrelevant d j = 2; irrelevant: d f j k = 4, flagged d j = 2.
# D2: one photo, right, covered, not flagged.
HAND_D1 = {"corrected": 9, "in_vocabulary": 5, "top1_correct": 3, "with_label_set": 5, "covered": 2,
           "flagged": 3, "flagged_irrelevant": 2, "irrelevant": 4,
           "accuracy": 3 / 5, "coverage": 2 / 5, "ood_precision": 2 / 3, "ood_recall": 2 / 4}
HAND_D2 = {"corrected": 1, "accuracy": 1.0, "coverage": 1.0, "ood_precision": None, "ood_recall": None}


def _hand_tables(wh, *, sets: bool = True) -> None:
    schema = WITH_SETS if sets else WITHOUT_SETS
    wh.append_rows(schema, predictions(D1, [r[:5] for r in HAND], sets=sets))
    wh.append_rows(schema, predictions(D2, [("m", "seat", False, "seat", None)], sets=sets))
    rows = [verdict(r[0], lab, D1, at) for r in HAND for lab, at in r[5]]
    rows += [verdict("m", "seat", D2, "2026-11-03 09:00"), verdict("a", "normal", D2, "2026-11-03 09:00")]
    wh.append_rows(LABEL_CORRECTIONS, pd.DataFrame(rows))  # "a" on D2: no such prediction, not counted


def test_field_accuracy_per_day_equals_a_hand_count(tmp_path, demo_data):
    cfg = load_config(write_config(tmp_path, demo_data))
    defs = build_definitions(cfg)
    wh = defs.resources["warehouse"].get()
    _hand_tables(wh)
    result = dg.materialize(
        _assets(defs), selection=dg.AssetSelection.assets("field_accuracy"), resources=defs.resources,
        tags={"dagster/asset_partition_range_start": D1.isoformat(),
              "dagster/asset_partition_range_end": D2.isoformat()},
        instance=dg.DagsterInstance.ephemeral())
    assert result.success
    by_day = {}
    for m in result.asset_materializations_for_node("field_accuracy"):
        by_day.setdefault(m.partition, {}).update({k: v.value for k, v in m.metadata.items()})
    for day, hand in ((D1, HAND_D1), (D2, HAND_D2)):
        md = by_day[day.isoformat()]
        for k, v in hand.items():
            if v is None:
                assert k not in md, (day, k)  # no flagged photo judged: no precision, not zero
            else:
                assert md[k] == pytest.approx(v), (day, k)
    # without label sets in the table (a model before conformal sets), coverage is unavailable, not 0
    plain = DuckDBWarehouse(tmp_path / "plain.duckdb")
    _hand_tables(plain, sets=False)
    figures = fa.per_day(fa.daily_counts(plain, D1, D2 + dt.timedelta(days=1)), [D1, D2])
    assert figures[D1]["accuracy"] == pytest.approx(3 / 5) and figures[D1]["coverage"] is None
    assert figures[D1]["with_label_set"] is None


def test_trailing_week_check_warns_on_a_drop_not_on_noise():
    week = [dt.date(2026, 11, 1) + dt.timedelta(days=i) for i in range(9)]

    def counts(last_right: int, last_n: int, week_right: int = 10) -> pd.DataFrame:
        rows = [{"prediction_date": d, "corrected": 12, "in_vocabulary": 10, "top1_correct": week_right,
                 "with_label_set": 10, "covered": 9, "flagged": 2, "flagged_irrelevant": 2, "irrelevant": 2}
                for d in week[:7]]
        rows.append({**rows[0], "prediction_date": week[7],
                     "in_vocabulary": last_n, "top1_correct": last_right})
        return pd.DataFrame(rows)

    drop = fa.vs_trailing(counts(3, 10), [week[7]])[week[7]]
    assert (drop["accuracy"]["dropped"] and drop["accuracy"]["trailing"] == 1.0
            and drop["accuracy"]["day"] == 0.3)
    assert drop["accuracy"]["p_value"] < fa.DROP_ALPHA
    assert not drop["coverage"]["dropped"] and not drop["ood_precision"]["dropped"]
    noise = fa.vs_trailing(counts(2, 3, week_right=9), [week[7]])[week[7]]  # 2 of 3 after 63 of 70: too few
    assert noise["accuracy"]["day"] < noise["accuracy"]["trailing"] - fa.DROP_MARGIN
    assert not noise["accuracy"]["dropped"] and noise["accuracy"]["p_value"] > fa.DROP_ALPHA
    assert fa.vs_trailing(counts(3, 10, week_right=9), [week[7]])[week[7]]["accuracy"]["dropped"]
    small = fa.vs_trailing(counts(9, 10), [week[7]])[week[7]]  # within the margin
    assert not small["accuracy"]["dropped"]
    assert fa.vs_trailing(counts(3, 10), [week[0]]) == {}  # no trailing week yet: not compared


def test_trailing_week_check_is_a_warning_on_the_asset(tmp_path, demo_data):
    cfg = load_config(write_config(tmp_path, demo_data))
    defs = build_definitions(cfg)
    wh = defs.resources["warehouse"].get()
    days = [D1 + dt.timedelta(days=i) for i in range(8)]
    for n, day in enumerate(days):
        ids = [f"{day}/{k}.jpg" for k in range(10)]
        top1 = ["dirt"] * 10 if n < 7 else ["dirt"] * 3 + ["normal"] * 7  # the last day: 3 of 10 right
        wh.append_rows(WITH_SETS,
                       predictions(day, [(i, t, False, t, None) for i, t in zip(ids, top1, strict=True)]))
        wh.append_rows(LABEL_CORRECTIONS,
                       pd.DataFrame([verdict(i, "dirt", day, f"{day} 12:00") for i in ids]))
    result = dg.materialize(
        _assets(defs), selection=dg.AssetSelection.assets("field_accuracy"), resources=defs.resources,
        partition_key=days[-1].isoformat(), instance=dg.DagsterInstance.ephemeral())
    check = ({c.check_name: c for c in result.get_asset_check_evaluations()}
             ["field_accuracy_vs_trailing_7_days"])
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    compared = check.metadata["compared"].value[days[-1].isoformat()]
    assert compared["accuracy"]["dropped"] and compared["accuracy"]["trailing"] == 1.0
    assert compared["coverage"]["dropped"]  # the verdict "dirt" left the sets of the 7 wrong rows too


# -- corrections become labels ----------------------------------------------------------------------
def test_a_flipped_label_is_a_new_dataset_version_the_training_step_reads(pipeline, demo_data, tmp_path,
                                                                           monkeypatch):
    """A photo of the defect task (train split) comes back as an upload; an inspector says it is
    normal. The next sofar_dataset version has it as `normal`, and sofar_classifier hands it to the
    training loop as `normal` (the loop itself is stopped there: training is tested elsewhere)."""
    from sofar_assets.defs import model as model_defs
    from sofar_assets.lib.data import dataset as ds

    src = Path(pipeline["cfg"].root)
    (tmp_path / "state").mkdir()
    for name in ("mlflow.db", "warehouse.duckdb"):
        shutil.copy2(src / name, tmp_path / "state" / name)
    extra = tmp_path / "uploads-b"
    extra.mkdir()
    cfg = load_config(write_config(tmp_path, demo_data, uploads={"folder": str(demo_data / "uploads"),
                                                                 "allowed_roots": [str(extra)]}))
    defs = build_definitions(cfg)
    wh = defs.resources["warehouse"].get()
    before = wh.read_table("sofar_dataset")
    old_hash = ds.dataset_hash(before)
    train_defect = before[(before["split"] == "train") & (before["labels"] == "defect")].iloc[0]
    # the same bytes uploaded under another name (the content hash ties them), and a receipt
    upload = extra / "again"
    upload.write_bytes(Path(train_defect["image_uri"]).read_bytes())
    day = dt.date(2026, 11, 20)
    rows = predictions(day, [("again", "defect", False, "defect", None), ("page", "normal", True, "", None)],
                       uri_root=str(extra))
    shutil.copy(demo_data / "ood/documents/documents_000.png", extra / "page")
    wh.append_rows(WITH_SETS, rows)
    done = corr.record(wh, [{"image_id": "again", "label": "normal"},
                            {"image_id": "page", "label": "irrelevant"}],
                       cfg.vocabulary(), inspector="kim")
    assert done.appended == 2
    # another system appends a bad verdict straight into the table: rejected at read, not fatal
    wh.append_rows(LABEL_CORRECTIONS, pd.DataFrame([verdict("ghost", "normal", day, "2026-11-21 09:00")]))

    class Stop(Exception):
        """Stops the training step at the training call: what it passes is what the model would learn."""

    seen = {}

    def spy(spec, train_ds, val_ds, tcfg, **kw):
        seen["train"] = {(uri, label) for uri, label in zip(train_ds.uris, train_ds.labels, strict=True)}
        raise Stop

    monkeypatch.setattr(model_defs, "train_classifier", spy)
    result = dg.materialize(
        _assets(defs),
        selection=dg.AssetSelection.assets(["raw_labels", "label_corrections"], "sofar_dataset",
                                           "sofar_classifier"),
        resources=defs.resources, instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    # stopped by the spy
    assert [e.step_key for e in result.get_step_failure_events()] == ["sofar_classifier"]
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert not checks["corrections_valid"].passed
    assert ("image_id 'ghost': unknown image id (no prediction on 2026-11-20)"
            in checks["corrections_valid"].metadata["rows"].value)
    raw = wh.read_table(RAW_CORRECTIONS.name)
    assert raw.loc[raw["image_id"] == "again", "sha256"].item() == train_defect["sha256"]

    after = wh.read_table("sofar_dataset")
    new_hash = ds.dataset_hash(after)
    assert new_hash != old_hash
    row = after[after["sha256"] == train_defect["sha256"]].iloc[0]
    assert ((row["label"], row["labels"], row["tasks"], row["split"])
            == ("normal", "normal", "defect", "train"))
    assert pd.notna(row["corrected_at"])
    assert len(after) == len(before)  # the page was in no task: it goes to the OOD set, not the dataset
    assert corr.irrelevant_uris(raw) == [str(extra / "page")]
    # what the training step handed to the training loop, and the version it tagged its run with
    classes = cfg.vocabulary()
    assert (train_defect["image_uri"], classes.index("normal")) in seen["train"]
    assert (train_defect["image_uri"], classes.index("defect")) not in seen["train"]
    client = defs.resources["mlflow_tracking"].client()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              order_by=["attributes.start_time DESC"], max_results=1)
    assert runs[0].data.tags["dataset_hash"] == new_hash
    # a second, later verdict wins: the photo is irrelevant now and leaves the dataset
    corr.record(wh, [{"image_id": "again", "label": "irrelevant"}], cfg.vocabulary(), inspector="lee")
    again = dg.materialize(_assets(defs),
                           selection=dg.AssetSelection.assets(["raw_labels", "label_corrections"],
                                                              "sofar_dataset"),
                           resources=defs.resources, instance=dg.DagsterInstance.ephemeral())
    assert again.success
    after2 = wh.read_table("sofar_dataset")
    assert train_defect["sha256"] not in set(after2["sha256"]) and len(after2) == len(before) - 1
    assert sorted(corr.irrelevant_uris(wh.read_table(RAW_CORRECTIONS.name))) == sorted(
        [str(upload), str(extra / "page")])


def test_irrelevant_verdicts_become_an_ood_set_once_there_are_enough(tmp_path, demo_data):
    import logging

    from sofar_assets.defs.model import _ood_uris

    cfg = load_config(write_config(tmp_path, demo_data, gate={"min_ood_images": 3}))
    resources = build_definitions(cfg).resources
    wh = resources["warehouse"].get()

    class Context:
        log = logging.getLogger("test")

    def raw(labels: list[str]) -> pd.DataFrame:
        n = len(labels)
        return pd.DataFrame({
            **{c: [None] * n for c in RAW_CORRECTIONS.columns},
            "task": [corr.TASK] * n, "image_uri": [f"/u/{k}.png" for k in range(n)], "label": labels,
            "source_label": labels, "sha256": [f"{k:064x}" for k in range(n)],
            "image_id": [str(k) for k in range(n)],
            "corrected_at": [pd.Timestamp("2026-11-02 09:00")] * n, "prediction_date": [D1] * n,
        })

    assert corr.INSPECTOR_OOD_SET not in _ood_uris(cfg, resources["warehouse"], Context)  # no table yet
    wh.write_table(RAW_CORRECTIONS.name, raw(["irrelevant", "irrelevant", "dirt"]), schema=RAW_CORRECTIONS)
    sets = _ood_uris(cfg, resources["warehouse"], Context)
    assert set(sets) == {"documents"}  # 2 < gate.min_ood_images: not yet a set the gate would call too small
    wh.write_table(RAW_CORRECTIONS.name, raw(["irrelevant"] * 3 + ["dirt"]), schema=RAW_CORRECTIONS)
    sets = _ood_uris(cfg, resources["warehouse"], Context)
    assert sets[corr.INSPECTOR_OOD_SET] == ["/u/0.png", "/u/1.png", "/u/2.png"]


# -- BigQuery: the same appends and lookups ------------------------------------------------------------
def test_production_append_is_one_write_append_load_into_the_partitioned_table():
    from google.cloud import bigquery
    from test_warehouse_api import RecordingClient

    from sofar_assets.lib.warehouse import BigQueryWarehouse

    client = RecordingClient()
    wh = BigQueryWarehouse("sofar-prod", "sofar", client=client)
    assert wh.append_rows(LABEL_CORRECTIONS,
                          pd.DataFrame([verdict("a", "dirt", D1, "2026-11-02 09:00")])) == 1
    (load,) = [c for c in client.calls if c[0].startswith("load_")]
    assert load[1] == "sofar-prod.sofar.label_corrections"  # the table, never a partition decorator
    config = load[2]
    assert config.write_disposition == bigquery.WriteDisposition.WRITE_APPEND
    assert config.time_partitioning.field == "prediction_date" and config.clustering_fields == ["image_id"]
    assert [(f.name, f.field_type) for f in config.schema] == list(LABEL_CORRECTIONS.columns.items())
    assert "query" not in client.names() and "delete_table" not in client.names()


@pytest.mark.bigquery
def test_record_and_lookups_on_the_bigquery_emulator(emulator):
    import uuid

    from sofar_assets.lib.warehouse import BigQueryWarehouse

    wh = BigQueryWarehouse(emulator.project, f"sofar_{uuid.uuid4().hex[:8]}", client=emulator.client(),
                           partition_decorator=False)
    wh.ensure_dataset()
    wh.append_rows(WITH_SETS, predictions(D1, [("a'b", "dirt", False, "dirt", None),
                                               ("c", "normal", True, "", None)]))
    vocabulary = ["normal", "dirt"]
    with pytest.raises(corr.CorrectionError, match="image_id 'zz': unknown image id"):
        corr.record(wh, [{"image_id": "a'b", "label": "dirt"},
                         {"image_id": "zz", "label": "dirt", "where": "row 2"}],
                    vocabulary, inspector="kim")
    assert not wh.table_exists(LABEL_CORRECTIONS.name)
    rows = [{"image_id": "a'b", "label": "normal", "corrected_at": "2026-11-02T09:00:00"},
            {"image_id": "c", "label": "irrelevant", "corrected_at": "2026-11-02T09:05:00"}]
    assert corr.record(wh, rows, vocabulary, inspector="kim").appended == 2
    assert corr.record(wh, rows, vocabulary, inspector="kim").already_stored == 2  # appended once
    assert len(wh.read_table(LABEL_CORRECTIONS.name)) == 2
    # without corrected_at: the photo's current verdict again adds nothing (one INSERT ... SELECT)
    assert corr.record(wh, [{"image_id": "a'b", "label": "normal"}], vocabulary,
                       inspector="kim").appended == 0
    assert len(wh.read_table(LABEL_CORRECTIONS.name)) == 2
    latest = corr.latest_per_image(wh)
    reasons = corr.validate_stored(wh, latest, vocabulary)
    assert reasons.isna().all()
    raw = corr.scan(latest, reasons, vocabulary, lambda uri: ("0" * 64, 1, 1, 1), roots=["/elsewhere"])
    wh.write_table(RAW_CORRECTIONS.name, raw, schema=RAW_CORRECTIONS)  # the asset's write, on BigQuery
    back = wh.read_table(RAW_CORRECTIONS.name).sort_values("image_id")
    assert back["error"].str.contains("outside the allowed roots").all() and back["label"].isna().all()
    counts = fa.daily_counts(wh, D1, D2)
    assert counts[["corrected", "in_vocabulary", "top1_correct", "covered", "flagged",
                   "flagged_irrelevant"]].iloc[0].tolist() == [2, 1, 0, 0, 1, 1]


def test_demo_corrections_import_and_the_summary_shows_the_loop(setup, demo_data, capsys):
    wh = setup["wh"]
    demo = pd.read_csv(demo_data / "corrections.csv")
    assert set(demo.columns) == {"image_id", "label", "inspector", "corrected_at"}
    for day in (D1, D2):  # the demo days predicted: right on every photo but the first, the page flagged
        judged = demo[demo["image_id"].str.startswith(day.isoformat())]
        top1 = ["normal" if lab == "irrelevant" else ("seat" if k == 0 else lab)
                for k, lab in enumerate(judged["label"])]
        wh.append_rows(WITH_SETS, predictions(day, [
            (i, t, lab == "irrelevant", "" if lab == "irrelevant" else t, None)
            for i, t, lab in zip(judged["image_id"], top1, judged["label"], strict=True)]))
    code, out, err = sofar(capsys, "correct", "--csv", str(demo_data / "corrections.csv"))
    assert code == 0, err
    assert f"{len(demo)} correction(s) appended" in out

    class Champion:
        version, tags = "1", {"dataset_hash": "0" * 64}

    cli._loop_summary(setup["cfg"], wh, Champion)
    out = capsys.readouterr().out
    assert f"{len(demo)} verdict(s) in 'label_corrections'" in out
    assert "4 agree with top-1, 2 relabel, 2 irrelevant" in out  # 3 classes + 1 page per day, 1 wrong per day
    assert f"  {D1}       4      0.67      0.67           1.00" in out


def test_the_corrections_task_name_is_reserved(tmp_path, demo_data):
    import yaml

    from sofar_assets.config import ConfigError, parse_config

    data = yaml.safe_load(write_config(tmp_path, demo_data).read_text())
    data["tasks"]["label_corrections"] = data["tasks"]["dirt"]
    with pytest.raises(ConfigError, match="tasks: task name 'label_corrections' is reserved"):
        parse_config(data, base_dir=tmp_path)
