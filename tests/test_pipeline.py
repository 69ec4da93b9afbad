"""The whole graph materialized in-process on tiny SYNTHETIC data (see conftest.pipeline)."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import dagster as dg
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from sofar_assets.config import load_config
from sofar_assets.definitions import build_definitions
from sofar_assets.lib.data import storage
from sofar_assets.lib.data.images import ImageDataset
from sofar_assets.lib.model import ood
from sofar_assets.lib.serving import registry
from sofar_assets.lib.serving.packaging import load_registered

from conftest import DAYS, _assets, write_config


def _warehouse(pipeline):
    return pipeline["defs"].resources["warehouse"].get()


def _materialize_days(pipeline, start: dt.date, end: dt.date, *, defs=None, raise_on_error=True):
    defs = defs or pipeline["defs"]
    return dg.materialize(
        _assets(defs),
        selection=dg.AssetSelection.assets("daily_predictions"),
        # a range runs as ONE run (single-run backfill policy), as `--partition-range` does
        tags={"dagster/asset_partition_range_start": start.isoformat(),
              "dagster/asset_partition_range_end": end.isoformat()} if start != end else None,
        partition_key=start.isoformat() if start == end else None,
        resources=defs.resources,
        instance=pipeline["instance"],
        raise_on_error=raise_on_error,
    )


def _mat_metadata(result, key):
    mats = result.asset_materializations_for_node(key)
    return mats[-1].metadata


def test_dataset_asset_merges_tasks_and_reports(pipeline):
    wh = _warehouse(pipeline)
    data = wh.read_table("sofar_dataset")
    cfg = pipeline["cfg"]
    assert set(data["label"]) <= set(cfg.vocabulary())
    assert (data["label"] == "normal").any()
    assert data["sha256"].is_unique
    multi = data[data["multi_label"]]
    assert len(multi) == 3 and set(multi["labels"]) == {"defect|dirt"}
    assert data.groupby("sha256")["split"].nunique().max() == 1
    checks = {c.check_name: c for c in pipeline["result"].get_asset_check_evaluations()}
    assert checks["no_image_in_two_splits"].passed
    assert checks["label_conflicts"].metadata["multi_label_images"].value == 3
    md = _mat_metadata(pipeline["result"], "sofar_dataset")
    assert "data:image/png;base64," in md["dataset_card"].value  # the contact sheet


def test_model_is_registered_with_lineage_tags_and_loads_back(pipeline):
    cfg = pipeline["cfg"]
    client = pipeline["defs"].resources["mlflow_tracking"].client()
    mv = client.get_model_version(cfg.model.name, "1")
    tags = dict(mv.tags)
    data = _warehouse(pipeline).read_table("sofar_dataset")
    from sofar_assets.lib.data.dataset import dataset_hash

    assert tags["dataset_hash"] == dataset_hash(data)
    from sofar_assets.settings import git_commit

    assert tags["git_commit"] == git_commit() and len(git_commit()) == 40  # the checkout's commit sha
    threshold = float(tags["ood_threshold"])
    md = _mat_metadata(pipeline["result"], "ood_calibration")
    lo, hi = md["val_score_range"].value
    # ood.threshold "between": at most the val threshold, lowered towards the irrelevant sets' top score
    assert threshold <= hi and (cfg.ood.threshold == "between" or lo <= threshold)
    assert md["val_tpr"].value >= cfg.ood.target_tpr
    # the registered version gives the same logits on reload, and the served pyfunc (ONNX Runtime)
    # answers each photo with the calibrated probabilities of those logits
    model, meta = load_registered(f"models:/{cfg.model.name}/1")
    assert meta["classes"] == cfg.vocabulary()
    rows = data.head(4)
    ds = ImageDataset(list(rows["image_uri"]), [0] * 4, cfg.model.image_size)
    x = torch.stack([ds[i][0] for i in range(4)]).float().div(255)
    with torch.inference_mode():
        ref = model(x).numpy()
    pyfunc = mlflow.pyfunc.load_model(f"models:/{cfg.model.name}/1")
    served = pyfunc.predict(pd.DataFrame({"image_uri": list(rows["image_uri"])}))
    assert served["error"].str.startswith("UploadRefused").all()  # training photos lie outside the upload roots
    served = pyfunc.predict(pd.DataFrame({"image": [storage.read_bytes(u) for u in rows["image_uri"]]}))
    probs = ood.softmax(ref, float(tags["ood_temperature"]))
    assert list(served["top1_label"]) == [cfg.vocabulary()[k] for k in probs.argmax(1)]
    np.testing.assert_allclose(served["top1_prob"].astype(float), probs.max(1), atol=1e-4)
    assert set(served["model_version"]) == {"1"} and served["error"].isna().all()
    again, _ = load_registered(f"models:/{cfg.model.name}/1")
    with torch.inference_mode():
        np.testing.assert_allclose(again(x).numpy(), ref, rtol=0, atol=0)
    assert str(client.get_model_version_by_alias(cfg.model.name, "champion").version) == "1"


def test_daily_predictions_rows_rerun_and_errors(pipeline, demo_data):
    cfg = pipeline["cfg"]
    wh = _warehouse(pipeline)
    result = _materialize_days(pipeline, DAYS[0], DAYS[1])  # a 2-day single-run backfill
    assert result.success
    out = wh.read_table("predictions")
    uploads = {d: len(storage.list_files(str(demo_data / "uploads" / d.isoformat()))) for d in DAYS}
    per_day = out.groupby("prediction_date").size().to_dict()
    assert per_day == uploads  # one row per uploaded photo, error rows included
    assert set(out["top1_label"].dropna()) <= set(cfg.vocabulary())
    assert (out["top1_prob"].dropna() >= out["top2_prob"].dropna()).all()
    bad = out[out["error"].notna()]
    assert len(bad) == 1 and "truncated" in bad["image_uri"].iloc[0] and bad["top1_label"].isna().all()
    assert (out["model_version"] == "1").all()
    # the synthetic page uploaded every day is rejected as out of distribution
    pages = out[out["image_uri"].str.endswith(".png")]
    assert len(pages) == 2 and pages["is_ood"].mean() >= 0.5
    # re-running one day replaces its rows instead of adding more
    assert _materialize_days(pipeline, DAYS[1], DAYS[1]).success
    again = wh.read_table("predictions")
    assert again.groupby("prediction_date").size().to_dict() == uploads
    described = wh.query("DESCRIBE {table:predictions}")
    assert described.set_index("column_name").loc["prediction_date", "column_type"] == "DATE"


def test_empty_day_writes_zero_rows_and_says_so(pipeline):
    empty_day = dt.date(2026, 11, 20)
    result = _materialize_days(pipeline, empty_day, empty_day)
    assert result.success
    md = _mat_metadata(result, "daily_predictions")
    assert md["rows"].value == 0 and md["empty_days"].value == [empty_day.isoformat()]
    # a missing upload day is a WARN check that names the folder it looked in
    check = {c.check_name: c for c in result.get_asset_check_evaluations()}["uploads_found"]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    folder = f"{pipeline['cfg'].resolve(pipeline['cfg'].uploads.folder)}/{empty_day.isoformat()}"
    assert check.metadata["days_without_uploads"].value == {empty_day.isoformat(): folder}
    out = _warehouse(pipeline).read_table("predictions")
    assert (out["prediction_date"] == empty_day).sum() == 0


def _messy_files() -> tuple[dict[str, bytes], set[str]]:
    """User-generated oddities: which must decode (good) and which must be named errors (bad)."""
    import io
    import struct
    import zlib

    from PIL import Image

    def enc(img, fmt, **kw):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        return buf.getvalue()

    rgb = Image.new("RGB", (80, 60), (200, 120, 40))
    jpeg = enc(rgb, "JPEG")
    gif = [Image.new("P", (40, 40), i) for i in (3, 9)]
    buf = io.BytesIO()
    gif[0].save(buf, format="GIF", save_all=True, append_images=gif[1:])
    pal = Image.new("P", (40, 40), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)  # a 10-gigapixel header
    bomb = (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr
            + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)))
    files = {
        "empty.jpg": b"",
        "text.jpg": b"receipt: 2 coffees, 9000 won",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "bomb.png": bomb,
        "jpeg_named.png": jpeg,
        "cmyk.jpg": enc(rgb.convert("CMYK"), "JPEG"),
        "sixteen_bit.png": enc(Image.fromarray(__import__("numpy").full((30, 30), 40000, dtype="uint16")), "PNG"),
        "palette_transparent.png": enc(pal, "PNG", transparency=0),
        "animated.gif": buf.getvalue(),
    }
    return files, {"empty.jpg", "text.jpg", "truncated.jpg", "bomb.png"}


def test_messy_task_files_decode_or_are_named_never_fatal(tmp_path, demo_data):
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    folder = data / "tasks/dirt/1_DIRT"
    files, bad = _messy_files()
    for name, payload in files.items():
        (folder / name).write_bytes(payload)
    cfg = load_config(write_config(tmp_path, data))
    defs = build_definitions(cfg)
    result = dg.materialize(
        _assets(defs), selection=dg.AssetSelection.groups("ingest"), resources=defs.resources,
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert result.success
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert not checks["no_unreadable_files"].passed
    assert checks["no_unreadable_files"].metadata["unreadable"].value == len(bad)
    named = checks["no_unreadable_files"].metadata["files"].value
    wh = defs.resources["warehouse"].get()
    raw = wh.read_table("raw_labels_dirt").set_index("image_uri")
    dataset_uris = set(wh.read_table("sofar_dataset")["image_uri"])
    for name in files:
        uri = str(folder / name)
        if name in bad:
            assert uri in named and raw.loc[uri, "error"].startswith("ImageDecodeError: " + uri)
            assert uri not in dataset_uris
        else:
            assert pd.isna(raw.loc[uri, "error"]), (name, raw.loc[uri, "error"])
    # good oddities are in the dataset (deduplicated: jpeg_named.png has the bytes of no other file)
    assert str(folder / "jpeg_named.png") in dataset_uris and str(folder / "cmyk.jpg") in dataset_uris


def test_no_champion_gives_an_actionable_error(tmp_path, demo_data):
    cfg = load_config(write_config(tmp_path, demo_data))
    defs = build_definitions(cfg)
    result = dg.materialize(
        _assets(defs), selection=dg.AssetSelection.assets("daily_predictions"), partition_key="2026-11-01",
        resources=defs.resources, instance=dg.DagsterInstance.ephemeral(), raise_on_error=False,
    )
    assert not result.success
    failure = result.failure_data_for_node("daily_predictions")
    assert "champion" in str(failure.user_failure_data.description) and "MLflow" in str(
        failure.user_failure_data.description)


@pytest.mark.parametrize("name", ["demo.yaml", "prod.yaml"])
def test_definitions_load_for_each_environment(name, monkeypatch):
    from pathlib import Path

    from sofar_assets.defs.resources import BigQueryWarehouseResource, DuckDBWarehouseResource

    cfg = load_config(Path(__file__).resolve().parents[1] / "config" / name, check_paths=False)
    defs = build_definitions(cfg)
    repo = defs.get_repository_def()
    keys = {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()}
    assert {"sofar_dataset", "sofar_classifier", "ood_calibration", "model_evaluation", "champion_model",
            "daily_predictions"} <= keys
    assert {f"raw_labels/{t}" for t in cfg.tasks} <= keys
    wh = defs.resources["warehouse"]
    if name == "prod.yaml":
        assert isinstance(wh, BigQueryWarehouseResource) and wh.dataset == "sofar"
        assert repo.get_job("train_and_promote").executor_def.name == "k8s"
    else:
        assert isinstance(wh, DuckDBWarehouseResource)
        assert repo.get_job("train_and_promote").executor_def.name == "in_process"
    policy = repo.assets_defs_by_key[dg.AssetKey("daily_predictions")].backfill_policy
    assert policy.max_partitions_per_run == (7 if name == "prod.yaml" else None)
    node = repo.assets_defs_by_key[dg.AssetKey("sofar_classifier")]
    tags = node.op.tags
    assert "nvidia.com/gpu" in str(tags["dagster-k8s/config"])
    assert node.op.pool == "gpu"


def test_irrelevant_images_are_rejected_and_the_rate_is_reported(pipeline):
    md = _mat_metadata(pipeline["result"], "ood_calibration")
    report = md["ood_report"].value["documents"]
    assert md["rejected_share_documents"].value == report["rejected_share"]
    assert report["images"] == 8 and report["rejected_share"] >= 0.75
    assert md["auroc_documents"].value >= 0.9
    run_id = _mat_metadata(pipeline["result"], "sofar_classifier")["mlflow_run_id"].value
    assert md["roc"].value.endswith(f"/get-artifact?path=ood_roc.png&run_uuid={run_id}")  # opens the PNG
    assert md["val_nll_after"].value <= md["val_nll_before"].value + 1e-9


def test_evaluation_maps_the_n_class_model_onto_each_task(pipeline):
    cfg = pipeline["cfg"]
    md = _mat_metadata(pipeline["result"], "model_evaluation")
    per_task = md["per_task"].value
    for task in cfg.tasks:
        assert task in per_task
    assert md["ece"].value <= cfg.gate.max_ece
    # the dirty-and-damaged photos were never trained on; the reported rate is the share whose
    # top-2 holds both labels, recomputed here from the registered model's own logits
    data = _warehouse(pipeline).read_table("sofar_dataset")
    multi = data[data["multi_label"]]
    pipeline["defs"].resources["mlflow_tracking"].setup()  # mlflow's URI is process-global
    model, _ = load_registered(f"models:/{cfg.model.name}/1")
    ds = ImageDataset(list(multi["image_uri"]), [0] * len(multi), cfg.model.image_size)
    with torch.inference_mode():
        logits = model(torch.stack([ds[i][0] for i in range(len(multi))]).float().div(255)).numpy()
    vocab = cfg.vocabulary()
    top2 = [{vocab[j] for j in np.argsort(-row)[:2]} for row in logits]
    hits = [set(labels.split("|")) <= t for labels, t in zip(multi["labels"], top2, strict=True)]
    assert md["top2_joint_hit_rate"].value == pytest.approx(np.mean(hits))
    evaluation = pipeline["result"].output_for_node("model_evaluation")
    assert evaluation["multi_label_images"] == 3
    # two states without new photos: composites of the test split's defect and dirt photos
    comp = evaluation["composites"]
    assert comp["images"] > 0 and comp["images"] % 4 == 0 and set(comp["by_kind"]) == {"halves", "patch"}
    assert md["composites_top2_joint_hit_rate"].value == pytest.approx(comp["top2_joint_hit_rate"], abs=5e-4)
    assert 0.0 <= comp["label_set_joint_coverage"] <= 1.0
    assert set(evaluation["tasks"]) == set(cfg.tasks)
    assert evaluation["tasks"]["defect"]["n"] > 0
    # the label sets of the rule tagged on v1: on the multi-label photos, the share whose set
    # holds all their labels, recomputed here; on the test split, coverage and size per class
    client = pipeline["defs"].resources["mlflow_tracking"].client()
    cal = registry.read_calibration(client.get_model_version(cfg.model.name, "1"))
    assert cal.label_sets.coverage == cfg.conformal.coverage and cal.label_sets.n_cal > 0
    sets = [{vocab[j] for j in np.flatnonzero(m)} for m in cal.label_sets.mask(ood.softmax(logits, cal.temperature))]
    in_set = [set(labels.split("|")) <= st for labels, st in zip(multi["labels"], sets, strict=True)]
    cf = evaluation["conformal"]
    assert cf["multi_label"]["all_labels_in_set"] == pytest.approx(np.mean(in_set))
    assert cf["images"] == evaluation["test_images"] == sum(c["images"] for c in cf["per_class"].values())
    assert md["label_set_coverage"].value == cf["coverage"] and md["label_set_target_coverage"].value == 0.9
    sizes = {int(k): v for k, v in cf["set_size_counts"].items()}
    assert cf["mean_set_size"] == pytest.approx(sum(k * v for k, v in sizes.items()) / cf["images"])
    assert "normal" in md["label_sets_per_class"].value


def test_tasks_and_uploads_from_warehouse_tables(pipeline, demo_data, tmp_path):
    """Label tables and the image_uploads table as sources instead of folders."""
    import pandas as pd
    import yaml

    base = yaml.safe_load((pipeline["folder"] / "sofar.yaml").read_text())
    wh = _warehouse(pipeline)
    wash = demo_data / "tasks/wash"
    labels = pd.DataFrame(
        [(f, "bubble" if sub == "0_BUBBLE" else "machine") for sub in ("0_BUBBLE", "1_MACHINE")
         for f in storage.list_files(str(wash / sub))],
        columns=["image_uri", "label"],
    )
    wh.write_table("labels_wash", labels)
    day = dt.date(2026, 11, 5)
    files = storage.list_files(str(demo_data / "uploads" / DAYS[0].isoformat()))[:5]
    uploads = pd.DataFrame({
        "image_id": [f"u{i}" for i in range(len(files)) ] + ["u-yesterday"],
        "image_uri": files + [files[0]],
        "uploaded_at": [pd.Timestamp(day) + pd.Timedelta(hours=i + 1) for i in range(len(files))]
        + [pd.Timestamp(day) - pd.Timedelta(hours=1)],
    })
    wh.write_table("image_uploads", uploads)
    base["tasks"]["wash"] = {"table": "labels_wash", "labels": {"bubble": "bubble_wash", "machine": "wash_machine"}}
    base["uploads"] = {"table": "image_uploads", "allowed_roots": [str(demo_data / "uploads")]}
    (tmp_path / "tables.yaml").write_text(yaml.safe_dump(base))
    defs = build_definitions(load_config(tmp_path / "tables.yaml"))
    ingest = dg.materialize(_assets(defs), selection=dg.AssetSelection.assets(["raw_labels", "wash"]),
                            resources=defs.resources, instance=pipeline["instance"])
    assert ingest.success
    raw = wh.read_table("raw_labels_wash")
    assert len(raw) == len(labels) and set(raw["label"]) == {"bubble_wash", "wash_machine"}
    assert _materialize_days(pipeline, day, day, defs=defs).success
    out = wh.read_table("predictions")
    out = out[out["prediction_date"] == day]
    assert sorted(out["image_id"]) == [f"u{i}" for i in range(len(files))]  # yesterday's upload is not today's


def test_predictions_with_forkserver_workers(pipeline, tmp_path):
    """Run workers (dagster dev, Kubernetes) may start DataLoader workers with forkserver, which
    pickles the dataset and everything it calls: nothing run-scoped (loggers, resources) may ride along."""
    import multiprocessing

    import yaml

    base = yaml.safe_load((pipeline["folder"] / "sofar.yaml").read_text())
    base["inference"]["num_workers"] = 2
    (tmp_path / "workers.yaml").write_text(yaml.safe_dump(base))
    defs = build_definitions(load_config(tmp_path / "workers.yaml"))
    previous = multiprocessing.get_start_method()
    multiprocessing.set_start_method("forkserver", force=True)
    try:
        result = _materialize_days(pipeline, DAYS[0], DAYS[0], defs=defs)
    finally:
        multiprocessing.set_start_method(previous, force=True)
    assert result.success
    assert _mat_metadata(result, "daily_predictions")["rows"].value > 0


def test_range_backfill_loads_the_model_once(pipeline, monkeypatch):
    import sofar_assets.lib.serving.shards as shards  # the shard step loads the model there

    calls = []
    real = shards.load_registered

    def counting(uri):
        calls.append(uri)
        return real(uri)

    monkeypatch.setattr(shards, "load_registered", counting)
    result = _materialize_days(pipeline, dt.date(2026, 11, 1), dt.date(2026, 11, 3))
    assert result.success
    # once, straight from the artifact store (a local registry's store is a folder), not via models:/
    from mlflow import MlflowClient

    name = pipeline["cfg"].model.name
    uri = pipeline["cfg"].mlflow_tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert calls == [str(client.get_model_version_download_uri(name, "1"))]
    assert calls[0].startswith("file:")
    assert _mat_metadata(result, "daily_predictions")["days"].value == 3


def test_day_of_only_broken_files_fails_loudly_after_writing_error_rows(pipeline, tmp_path):
    import yaml

    base = yaml.safe_load((pipeline["folder"] / "sofar.yaml").read_text())
    uploads = tmp_path / "uploads"
    day = dt.date(2026, 11, 10)
    (uploads / day.isoformat()).mkdir(parents=True)
    for i in range(3):
        (uploads / day.isoformat() / f"{i}.jpg").write_bytes(b"\xff\xd8\xff broken")
    base["uploads"] = {"folder": str(uploads)}
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(base))
    defs = build_definitions(load_config(tmp_path / "broken.yaml"))
    result = _materialize_days(pipeline, day, day, defs=defs, raise_on_error=False)
    assert not result.success
    failure = result.failure_data_for_node("daily_predictions").user_failure_data
    assert "every image failed on 2026-11-10" in failure.description
    rows = _warehouse(pipeline).read_table("predictions")
    rows = rows[rows["prediction_date"] == day]
    assert len(rows) == 3 and rows["error"].notna().all()


def test_ood_spike_against_the_trailing_week_warns(pipeline, demo_data, tmp_path):
    import yaml

    _materialize_days(pipeline, DAYS[0], DAYS[1])  # the trailing days
    base = yaml.safe_load((pipeline["folder"] / "sofar.yaml").read_text())
    uploads = tmp_path / "uploads"
    day = DAYS[1] + dt.timedelta(days=1)
    shutil.copytree(demo_data / "ood/documents", uploads / day.isoformat())  # a day of paperwork
    base["uploads"] = {"folder": str(uploads)}
    (tmp_path / "spike.yaml").write_text(yaml.safe_dump(base))
    defs = build_definitions(load_config(tmp_path / "spike.yaml"))
    result = _materialize_days(pipeline, day, day, defs=defs)
    assert result.success  # a warning, not a failure
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    spike = checks["ood_rate_vs_trailing_7_days"]
    assert not spike.passed and spike.severity == dg.AssetCheckSeverity.WARN
    assert spike.metadata["days"].value[day.isoformat()]["ood_rate"] >= 0.75
    assert checks["rows_match_uploads"].passed


def test_feature_score_champion_serves_its_calibrated_scores(pipeline, demo_data, tmp_path, monkeypatch):
    """The fixture's champion is calibrated with ``ood.score: knn``: a day holding its val photos
    and the OOD set's documents gets, per photo, the kNN score the calibration computed for it."""
    import yaml

    import sofar_assets.lib.serving.shards as shards  # the shard step loads the model there
    from sofar_assets.defs.model import _split

    cal = pipeline["result"].output_for_node("ood_calibration")
    assert cal["score_method"] == pipeline["cfg"].ood.score == "knn"
    client = pipeline["defs"].resources["mlflow_tracking"].client()
    report = mlflow.artifacts.load_dict(f"runs:/{cal['run_id']}/ood_calibration.json")
    day = dt.date(2026, 11, 24)
    folder = tmp_path / "uploads" / day.isoformat()
    folder.mkdir(parents=True)
    expected = {}
    val = _split(_warehouse(pipeline).read_table("sofar_dataset"), "val")
    for i, (uri, score) in enumerate(zip(val["image_uri"], report["val_scores"], strict=True)):
        name = f"val{i:03d}{Path(uri).suffix}"
        shutil.copy(uri, folder / name)
        expected[name] = score
    docs = storage.list_files(pipeline["cfg"].resolve(pipeline["cfg"].ood_sets["documents"].folder))
    for uri, score in zip(docs, cal["ood_scores"]["documents"], strict=True):
        shutil.copy(uri, folder / f"doc_{Path(uri).name}")
        expected[f"doc_{Path(uri).name}"] = score
    base = yaml.safe_load((pipeline["folder"] / "sofar.yaml").read_text())
    base["uploads"] = {"folder": str(tmp_path / "uploads")}
    (tmp_path / "knn.yaml").write_text(yaml.safe_dump(base))
    defs = build_definitions(load_config(tmp_path / "knn.yaml"))
    assert _materialize_days(pipeline, day, day, defs=defs).success
    rows = _warehouse(pipeline).read_table("predictions")
    rows = rows[rows["prediction_date"] == day]
    rows = rows.set_index(rows["image_uri"].map(lambda u: Path(u).name))
    assert sorted(rows.index) == sorted(expected) and rows["error"].isna().all()
    np.testing.assert_allclose(rows["ood_score"], [expected[n] for n in rows.index], rtol=1e-5, atol=1e-5)
    assert (rows["is_ood"] == (rows["ood_score"] < cal["threshold"])).all()
    assert rows.loc[[n for n in rows.index if n.startswith("doc_")], "is_ood"].all()
    assert not rows.loc[[n for n in rows.index if n.startswith("val")], "is_ood"].all()

    # a version whose package lacks the kNN bank fails with its name and the score, before any row
    real = shards.load_registered
    monkeypatch.setattr(shards, "load_registered", lambda uri: (real(uri)[0], {**real(uri)[1], "ood_stats": {}}))
    failed = _materialize_days(pipeline, day, day, defs=defs, raise_on_error=False)
    assert not failed.success
    version = client.get_model_version_by_alias(pipeline["cfg"].model.name, "champion").version
    message = failed.failure_data_for_node("daily_predictions").user_failure_data.description
    assert f"models:/{pipeline['cfg'].model.name}/{version} is calibrated with OOD score 'knn'" in message
    assert "knn_bank" in message


def test_schedule_materializes_yesterday(pipeline):
    repo = pipeline["defs"].get_repository_def()
    schedule = repo.get_schedule_def("daily_predictions_job_schedule")
    when = dt.datetime(2026, 11, 5, 2, 0, tzinfo=dt.UTC)
    with dg.build_schedule_context(scheduled_execution_time=when) as ctx:
        requests = schedule.evaluate_tick(ctx).run_requests
    assert [r.partition_key for r in requests] == ["2026-11-04"]


def test_split_moves_between_dataset_versions_are_flagged(tmp_path, demo_data):
    cfg = load_config(write_config(tmp_path, demo_data))
    defs = build_definitions(cfg)
    run = dict(resources=defs.resources, instance=dg.DagsterInstance.ephemeral())
    first = dg.materialize(_assets(defs), selection=dg.AssetSelection.groups("ingest"), **run)
    assert {c.check_name: c.passed for c in first.get_asset_check_evaluations()}["no_image_in_two_splits"]
    # new split fractions re-deal photos: the champion's training photos could become test photos
    moved_cfg = load_config(write_config(tmp_path, demo_data, dataset={"val_fraction": 0.1, "test_fraction": 0.1}))
    moved_defs = build_definitions(moved_cfg)
    second = dg.materialize(_assets(moved_defs), selection=dg.AssetSelection.assets("sofar_dataset"),
                            resources=moved_defs.resources, instance=run["instance"])
    check = {c.check_name: c for c in second.get_asset_check_evaluations()}["no_image_in_two_splits"]
    assert not check.passed
    moved = check.metadata["moved_since_previous_version"].value
    assert moved and all(m["split_before"] != m["split_now"] for m in moved)
