"""A day of many photos: streaming, reads in flight, shards committed once, crash safety,
per-partition metadata and the warehouse-computed checks.

The Dagster tests run the real ``daily_predictions`` graph (plan_shards -> score_shard ->
commit_days) on a DuckDB file and a real MLflow registry; only the network is a stand-in: a
"mean colour" model (logits = 5 * mean RGB) loaded in place of the registered weights, so that
every label and OOD verdict is known from the photo's colour.
"""

from __future__ import annotations

import datetime as dt
import threading
import time

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from sofar_assets.config import load_config
from sofar_assets.definitions import build_definitions
from sofar_assets.lib.review import drift
from sofar_assets.lib.serving import daily, registry
from sofar_assets.lib.serving.inference import Item, predict_frame, predict_images

from conftest import _assets

CLASSES = ["red", "green", "blue"]
BRIGHT = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
DARK = (40, 40, 40)  # every logit 5 * 40/255 = 0.78 < threshold 2.0: out of distribution
THRESHOLD = 2.0


class MeanColour(torch.nn.Module):
    def forward(self, x):
        return 5.0 * x.mean(dim=(2, 3))


def _jpeg(path, rgb):
    Image.new("RGB", (24, 24), rgb).save(path, quality=95)


def _write_day(uploads, day: dt.date, colours: list) -> list[str]:
    folder = uploads / day.isoformat()
    folder.mkdir(parents=True, exist_ok=True)
    for i, rgb in enumerate(colours):
        _jpeg(folder / f"{i:04d}.jpg", rgb)
    return [f"{day.isoformat()}/{i:04d}.jpg" for i in range(len(colours))]


@pytest.fixture()
def env(tmp_path, monkeypatch):
    """A config over a tmp uploads folder, a registered + calibrated champion, the stand-in net."""
    from sofar_assets.lib.serving import shards  # the shard step's model loading and spool

    def build(**inference):
        path = tmp_path / "sofar.yaml"
        path.write_text(yaml.safe_dump({
            "tasks": {"defect": {"folder": str(tmp_path / "task"), "labels": {"0": "normal", "1": "defect"}}},
            "uploads": {"folder": str(tmp_path / "uploads")},
            "partitions": {"start_date": "2026-11-01"},
            "storage": {"root": str(tmp_path / "state")},
            "inference": {"num_workers": 0, "batch_size": 4, "device": "cpu", **inference},
        }))
        cfg = load_config(path)
        return cfg, build_definitions(cfg)

    for sub in ("task/0", "task/1", "uploads"):
        (tmp_path / sub).mkdir(parents=True)
    cfg, defs = build()
    res = defs.resources["mlflow_tracking"]
    res.setup()
    client = res.client()
    client.create_registered_model(cfg.model.name)
    mv = client.create_model_version(cfg.model.name, source=str(tmp_path / "weights"))
    registry.write_calibration(client, cfg.model.name, mv.version,
                               registry.Calibration("max_logit", 1.0, THRESHOLD))
    registry.set_champion(client, cfg.model.name, mv.version)
    loads = []

    def load(uri):
        loads.append(uri)
        return MeanColour(), {"classes": CLASSES, "spec": {"image_size": 8}}

    monkeypatch.setattr(shards, "load_registered", load)
    return {"build": build, "uploads": tmp_path / "uploads", "instance": dg.DagsterInstance.ephemeral(),
            "loads": loads, "root": tmp_path / "state", "tmp": tmp_path}


def _run(env, defs, first: dt.date, last: dt.date, raise_on_error=True):
    return dg.materialize(
        _assets(defs), selection=dg.AssetSelection.assets("daily_predictions"),
        tags={"dagster/asset_partition_range_start": first.isoformat(),
              "dagster/asset_partition_range_end": last.isoformat()} if first != last else None,
        partition_key=first.isoformat() if first == last else None,
        resources=defs.resources, instance=env["instance"], raise_on_error=raise_on_error,
    )


def _day_rows(defs, day):
    wh = defs.resources["warehouse"].get()
    return wh.read_range("predictions", "prediction_date", day, day + dt.timedelta(days=1))


D1, D2, D3, D4 = (dt.date(2026, 11, d) for d in (1, 2, 3, 4))


def test_range_run_records_each_days_own_numbers_on_its_partition(env):
    colours = {D1: [BRIGHT["red"]] * 3 + [DARK], D2: [BRIGHT["green"]] * 6, D3: [BRIGHT["blue"], DARK] * 2 + [DARK]}
    for day, c in colours.items():
        _write_day(env["uploads"], day, c)
    cfg, defs = env["build"]()
    result = _run(env, defs, D1, D3)
    assert result.success
    mats = {m.partition: m.metadata for m in result.asset_materializations_for_node("daily_predictions")}
    assert sorted(mats) == [d.isoformat() for d in (D1, D2, D3)]
    wh = defs.resources["warehouse"].get()
    for day, c in colours.items():
        md = mats[day.isoformat()]
        stored = wh.count_range("predictions", "prediction_date", day, day + dt.timedelta(days=1))
        assert stored == len(c)
        assert md["dagster/row_count"].value == md["rows"].value == md["uploads"].value == stored
        assert md["ood_rows"].value == sum(x == DARK for x in c) and md["error_rows"].value == 0
        assert md["days"].value == 3  # run-level facts ride along on every partition
        # the partition's own review queue (a model without label sets: its OOD-flagged photos),
        # listed and drawn; a day with an empty queue has no sheet
        n_ood = sum(x == DARK for x in c)
        assert md["review_queue"].value == n_ood
        if n_ood:
            sheet_rows = md["review_rows"].value
            assert "data:image/png;base64," in md["review_sheet"].value
            assert sheet_rows.count("| `ood` ") == n_ood and f"{day.isoformat()}/" in sheet_rows
        else:
            assert "review_sheet" not in md
    # one shard: the model loads once per run, from its store directly (not models:/ via the server)
    assert env["loads"] == [str(env["tmp"] / "weights")]
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks["rows_match_uploads"].passed
    assert not list((env["root"] / "staging" / "predictions").rglob("*.parquet"))  # committed, cleaned up


def test_shards_of_a_day_commit_once(env, monkeypatch):
    from sofar_assets.lib.warehouse import DuckDBWarehouse

    ids = {D1: _write_day(env["uploads"], D1, [BRIGHT["red"]] * 11 + [DARK] * 3),
           D2: _write_day(env["uploads"], D2, [BRIGHT["blue"]] * 9)}
    cfg, defs = env["build"](shards_per_day=3)
    commits = []
    real = DuckDBWarehouse.replace_day

    def counting(self, schema, day, files):
        commits.append((day, sorted(files)))
        return real(self, schema, day, files)

    monkeypatch.setattr(DuckDBWarehouse, "replace_day", counting)
    result = _run(env, defs, D1, D2)
    assert result.success
    assert [d for d, _ in commits] == [D1, D2]  # ONE replace per day, after all shards are in
    for _day, files in commits:
        assert 2 <= len(files) <= 3 and all("shard-" in f and "-of-3.parquet" in f for f in files)
    steps = {e.step_key for e in result.all_events if e.step_key and "score_shard" in e.step_key}
    assert len(steps) == 3 and len(env["loads"]) == 3  # three steps (pods), each loads the model once
    for day, expected in ids.items():
        rows = _day_rows(defs, day)
        assert sorted(rows["image_id"]) == sorted(expected)  # every photo once, none lost or doubled
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks["rows_match_uploads"].passed
    # the split is deterministic: the same shard for an id in every process and every re-run
    assert [daily.in_shard(i, k, 3) for i in ids[D1] for k in range(3)].count(True) == len(ids[D1])


def test_crash_mid_day_keeps_the_old_day(env, monkeypatch):
    from sofar_assets.lib.serving import shards  # the shard step's model loading and spool

    _write_day(env["uploads"], D1, [BRIGHT["red"]] * 10)
    cfg, defs = env["build"]()
    assert _run(env, defs, D1, D1).success
    before = _day_rows(defs, D1).sort_values("image_id").reset_index(drop=True)
    assert len(before) == 10

    class DiesOnThirdBatch(MeanColour):  # e.g. a CUDA OOM or a killed pod, after 8 rows were staged
        calls = 0

        def forward(self, x):
            DiesOnThirdBatch.calls += 1
            if DiesOnThirdBatch.calls == 3:
                raise RuntimeError("simulated crash in the middle of the day")
            return 5.0 * x.mean(dim=(2, 3))

    for p in (env["uploads"] / D1.isoformat()).iterdir():  # the re-run would predict green everywhere
        _jpeg(p, BRIGHT["green"])
    monkeypatch.setattr(shards, "load_registered",
                        lambda uri: (DiesOnThirdBatch(), {"classes": CLASSES, "spec": {"image_size": 8}}))
    result = _run(env, defs, D1, D1, raise_on_error=False)
    assert not result.success and DiesOnThirdBatch.calls == 3
    after = _day_rows(defs, D1).sort_values("image_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(after, before)  # the old day, whole: not a mix of old and new


def test_checks_fail_when_they_should(env, monkeypatch):
    from sofar_assets.lib.serving import shards  # the shard step's model loading and spool
    from sofar_assets.lib.warehouse import ParquetSpool

    for day in (D1, D2, D3):  # the trailing week: red and green, 10% OOD (dark photos score as red)
        _write_day(env["uploads"], day, [BRIGHT["red"]] * 5 + [BRIGHT["green"]] * 4 + [DARK])
    _write_day(env["uploads"], D4, [DARK] * 3 + [BRIGHT["blue"]] * 7)  # OOD x3 and a new label mix
    cfg, defs = env["build"]()
    assert _run(env, defs, D1, D3).success
    result = _run(env, defs, D4, D4)
    assert result.success  # warnings, not failures
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    spike = checks["ood_rate_vs_trailing_7_days"]
    assert not spike.passed and spike.severity == dg.AssetCheckSeverity.WARN
    assert spike.metadata["days"].value[D4.isoformat()] == {"ood_rate": 0.3, "trailing": 0.1, "spike": True}
    mix = checks["label_mix_vs_trailing_7_days"]  # (red .6, green .4) -> (red .3, blue .7): TV 0.7
    assert not mix.passed and mix.metadata["total_variation"].value[D4.isoformat()] == pytest.approx(0.7)
    assert checks["rows_match_uploads"].passed

    class LosesARow(ParquetSpool):  # a sink that silently drops a row must fail the rows check
        def append(self, rows):
            super().append(rows.slice(1) if hasattr(rows, "slice") else rows.iloc[1:])

    monkeypatch.setattr(shards, "ParquetSpool", LosesARow)
    result = _run(env, defs, D1, D1)
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert not checks["rows_match_uploads"].passed
    facts = checks["rows_match_uploads"].metadata["per_day"].value[D1.isoformat()]
    assert facts["uploads"] == 10 and facts["rows"] < 10


def test_an_ordinary_day_passes_the_drift_checks(env):
    for day in (D1, D2, D3, D4):
        _write_day(env["uploads"], day, [BRIGHT["red"], BRIGHT["green"], BRIGHT["blue"]] * 3 + [DARK])
    cfg, defs = env["build"]()
    result = _run(env, defs, D1, D4)
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert all(c.passed for c in checks.values())
    assert checks["ood_rate_vs_trailing_7_days"].metadata["compared_days"].value == "3"  # D1 has no past


# ---- library level: streaming, reads in flight, shards, drift math ------------------------------


def _items(tmp_path, n, rgb=(255, 0, 0)):
    path = tmp_path / "red.jpg"
    _jpeg(path, rgb)
    return [(f"img{i}", str(path)) for i in range(n)]


def test_items_are_consumed_lazily_not_listed(tmp_path):
    items = _items(tmp_path, 200)
    pulled = []

    def stream():
        for x in items:
            pulled.append(x)
            yield x

    frames = predict_images(MeanColour(), stream(), classes=CLASSES, image_size=8, threshold=THRESHOLD,
                            batch_size=10, num_workers=0, device="cpu")
    first = next(frames)
    assert len(first) == 10 and len(pulled) <= 20  # one batch ahead at most, not the whole day
    assert sum(len(f) for f in frames) == 190


def test_reads_in_flight_overlap_and_are_bounded(tmp_path):
    items = _items(tmp_path, 32)
    data = open(items[0][1], "rb").read()
    active, peak, lock = [0], [0], threading.Lock()

    def slow_read(uri):  # a 50 ms object-store GET
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return data

    t0 = time.perf_counter()
    df = predict_frame(MeanColour(), items, classes=CLASSES, image_size=8, threshold=THRESHOLD, batch_size=16,
                       num_workers=0, device="cpu", read_bytes=slow_read, reads_in_flight=8)
    elapsed = time.perf_counter() - t0
    assert len(df) == 32 and df["error"].isna().all()
    assert peak[0] == 8  # as many as allowed, never more
    assert elapsed < 32 * 0.05 / 2  # sequential reads would take 1.6 s


def test_refused_uploads_become_error_rows_without_a_read(tmp_path):
    items = _items(tmp_path, 2)
    read = []

    def reader(uri):
        read.append(uri)
        return open(uri, "rb").read()

    refused = Item("evil", "/etc/passwd", "UploadRefused: /etc/passwd: outside the allowed roots")
    df = predict_frame(MeanColour(), [items[0], refused, items[1]], classes=CLASSES, image_size=8,
                       threshold=THRESHOLD, num_workers=0, device="cpu", read_bytes=reader)
    assert read == [items[0][1], items[1][1]]
    assert df["error"].tolist() == [None, refused.error, None]


class _ListSpool:
    opened: dict = {}

    def __init__(self, day):
        self.frames = _ListSpool.opened.setdefault(day, [])
        self.closed = False

    def append(self, df):
        assert not self.closed
        self.frames.append(df)

    def close(self):
        self.closed = True
        return sum(len(f) for f in self.frames)


def test_score_days_splits_batches_across_days_and_counts(tmp_path):
    _ListSpool.opened = {}
    red = _items(tmp_path, 5)
    dark = tmp_path / "dark.jpg"
    _jpeg(dark, DARK)
    days = [(D1, iter(red)), (D2, iter([])), (D3, iter([("d0", str(dark)), ("missing", str(tmp_path / "no.jpg"))]))]
    tallies = daily.score_days(MeanColour(), days, open_spool=_ListSpool, columns={"model_version": "7"},
                               rows_per_group=4, classes=CLASSES, image_size=8, threshold=THRESHOLD, batch_size=4,
                               num_workers=0, device="cpu")
    assert list(tallies) == [D1, D2, D3]
    t1, t2, t3 = (tallies[d].as_dict() for d in (D1, D2, D3))
    assert t1 == {"listed": 5, "uploads": 5, "rows": 5, "errors": 0, "ood": 0, "labels": {"red": 5}, "staged_rows": 5}
    assert t2["rows"] == 0 and D2 not in _ListSpool.opened  # an empty day opens no spool
    assert t3 == {"listed": 2, "uploads": 2, "rows": 2, "errors": 1, "ood": 1, "labels": {"red": 1}, "staged_rows": 2}
    # the second batch held D1's last row and D3's two: it was split at the day boundary; rows go
    # out in groups of rows_per_group, and a day's last group when the day ends
    assert [len(f) for f in _ListSpool.opened[D1]] == [4, 1] and [len(f) for f in _ListSpool.opened[D3]] == [2]
    rows = pd.concat(_ListSpool.opened[D3])
    assert (rows["prediction_date"] == D3).all() and (rows["model_version"] == "7").all()


def test_shards_partition_a_day():
    ids = [f"2026-11-01/{i:05d}.jpg" for i in range(3000)]
    members = [[i for i in ids if daily.in_shard(i, k, 3)] for k in range(3)]
    assert sorted(sum(members, [])) == sorted(ids)  # each id in exactly one shard
    assert all(900 < len(m) < 1100 for m in members)  # and the shards are about even
    with pytest.raises(ValueError, match="shard 3 is not in 0..2"):
        daily.score_days(MeanColour(), [], open_spool=_ListSpool, columns={}, shard=3, shards=3,
                         classes=CLASSES, image_size=8, threshold=0.0)


def test_drift_rules():
    assert drift.ood_spike(0.20, 0.02) and not drift.ood_spike(0.16, 0.02)  # margin decides at a low base
    assert not drift.ood_spike(0.40, 0.30) and drift.ood_spike(0.61, 0.30)  # factor decides at a high base
    assert drift.total_variation({"a": 1, "b": 1}, {"a": 5, "b": 5}) == 0.0
    assert drift.total_variation({"a": 3}, {"b": 1}) == 1.0
    assert drift.total_variation({"a": 3, "b": 1}, {"a": 1, "b": 1}) == pytest.approx(0.25)
    assert drift.label_drift(0.51) and not drift.label_drift(0.5)
    counts = pd.DataFrame({"prediction_date": [D1, D1, D2, D2, D3, D3],
                           "is_ood": [False, True, False, True, False, True], "n": [90, 10, 80, 20, 2, 8]})
    out = drift.ood_vs_trailing(counts, [D2, D3])
    assert out[D2] == {"ood_rate": 0.2, "trailing": 0.1, "spike": False}
    assert out[D3] == {"ood_rate": 0.8, "trailing": 0.15, "spike": True}
    assert drift.ood_vs_trailing(counts, [D1]) == {}  # nothing to compare against
    mix = pd.DataFrame({"prediction_date": [D1, D2], "top1_label": ["a", "b"], "n": [3, 4]})
    assert not np.isnan(drift.label_mix_vs_trailing(mix, [D2])[D2]["total_variation"])


def test_read_ahead_keeps_order_bounds_the_queue_and_runs_ahead_of_the_consumer():
    produced: list[int] = []
    more = threading.Condition()

    def source():
        for i in range(20):
            with more:
                produced.append(i)
                more.notify_all()
            yield i

    got, ahead = [], []
    for x in daily.read_ahead(source(), depth=2):
        with more:  # while this item is being consumed, the producer goes on with the next ones
            assert more.wait_for(lambda x=x: len(produced) >= min(x + 3, 20), timeout=10)
        time.sleep(0.005)  # let it run into the bound if it were not bounded
        ahead.append(len(produced) - len(got))  # produced but not yet consumed, this one included
        got.append(x)
    assert got == list(range(20))
    assert max(ahead) <= 2 + 2  # the queue (depth) + this item + the one blocked on a full queue


def test_read_ahead_raises_the_producers_error_and_stops_it_when_the_consumer_stops():
    def failing():
        yield 1
        raise OSError("bucket gone")

    with pytest.raises(OSError, match="bucket gone"):
        list(daily.read_ahead(failing(), depth=2))

    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()  # runs in the producer thread once the consumer stopped

    stream = daily.read_ahead(endless(), depth=3)
    assert [next(stream) for _ in range(5)] == [0, 1, 2, 3, 4]
    stream.close()
    assert closed.wait(2.0)
    assert not any(t.name == "read-ahead" and t.is_alive() for t in threading.enumerate())


def test_staged_rows_are_the_schema_conversion_of_the_frame(tmp_path):
    """The fast Arrow path (Arrow's own conversion + the schema's casts) stores exactly what the
    checked pandas conversion stores, error rows (all-null columns) included."""
    from sofar_assets.lib.serving.inference import as_item
    from sofar_assets.lib.warehouse import PREDICTIONS, run_rows

    red = _items(tmp_path, 3) + [("missing", str(tmp_path / "no.jpg"))]
    # the items carry their day (prediction_date) through the model; the run adds its own columns
    frame = predict_frame(MeanColour(), [as_item(x, D1) for x in red], classes=CLASSES, image_size=8,
                          threshold=THRESHOLD, batch_size=4, num_workers=0, device="cpu")
    constants = {"model_name": "m", "model_version": "3",
                 "predicted_at": pd.Timestamp("2026-11-02 03:04:05")}
    fast = run_rows(frame, constants, PREDICTIONS)
    assert fast.equals(PREDICTIONS.to_arrow(frame.assign(**constants)))
    errors_only = frame.iloc[3:].reset_index(drop=True)  # top-1/top-2 columns all null
    assert run_rows(errors_only, constants, PREDICTIONS).equals(
        PREDICTIONS.to_arrow(errors_only.assign(**constants)))


# ---- a day listed once, shards sized by the day (lib/data/manifest.py) --------------------------------


def _day_of(n: int, day: str = "2026-11-01"):
    from sofar_assets.lib.data.uploads import Upload

    for i in range(n):  # every 7th upload a refused one: it travels as an error record, never read
        path = f"/u/{day}/{i:06d}" + ("-\udcff.jpg" if i % 5 == 1 else ".jpg")  # a name that is not UTF-8
        yield Upload(f"{day}/{i:06d}.jpg", f"/u/{day}/{i:06d}.jpg", None if i % 7 == 3 else path,
                     "UploadRefused: x" if i % 7 == 3 else None)


def _cases():
    rng = np.random.default_rng(22)
    fixed = [(0, 1, 1, 5), (1, 1, 1, 1), (10, 3, 16, 4), (10, 3, 2, 4), (100, 100, 16, 7), (101, 100, 16, 100),
             (999, 10, 16, 64), (1000, 1000, 1, 1000), (1001, 1000, 1, 3)]
    rand = [tuple(int(x) for x in (rng.integers(0, 3000), rng.integers(1, 500), rng.integers(1, 20),
                                   rng.integers(1, 800))) for _ in range(40)]
    return fixed + rand


@pytest.mark.parametrize(("count", "per_shard", "max_shards", "rows_per_group"), _cases())
def test_manifest_lists_a_day_once_and_its_shards_cover_it_exactly(tmp_path, count, per_shard, max_shards,
                                                                   rows_per_group):
    from sofar_assets.lib.data import manifest

    path = tmp_path / "m.parquet"
    assert manifest.write_manifest(_day_of(count), path, rows_per_group=rows_per_group) == count
    assert manifest.manifest_rows(path) == count
    # a second, quiet day in the same run: packed with the first day's last slice when it fits
    quiet = tmp_path / "q.parquet"
    manifest.write_manifest(_day_of(3, "2026-11-02"), quiet)
    units = manifest.pack({"2026-11-01": (str(path), count), "2026-11-02": (str(quiet), 3)},
                          images_per_shard=per_shard, max_shards=max_shards)
    got = {"2026-11-01": [], "2026-11-02": []}
    for unit in units:
        assert len({s["day"] for s in unit}) == len(unit)  # a step scores a day's slice at most once
        assert sum(s["stop"] - s["start"] for s in unit) <= per_shard or len(unit) == 1
        for s in unit:
            got[s["day"]] += list(manifest.read_slice(s["manifest"], s["start"], s["stop"]))
    assert got["2026-11-01"] == list(_day_of(count))  # every upload once, in order: none twice, none missing
    assert got["2026-11-02"] == list(_day_of(3, "2026-11-02"))
    n = {s["shards"] for u in units for s in u if s["day"] == "2026-11-01"}
    assert n == {min(max_shards, max(1, -(-count // per_shard)))}


def test_a_slice_is_read_in_small_batches_not_a_row_group_at_a_time(tmp_path):
    """While a shard's first upload is out, at most ``rows_per_read`` rows of its row group are
    Python objects: the slice streams (it used to turn the whole 10,000-row group into four lists
    at once and keep them while the shard's reads went on)."""
    import tracemalloc

    from sofar_assets.lib.data import manifest

    path = tmp_path / "m.parquet"
    manifest.write_manifest(_day_of(20_000), path, rows_per_group=10_000)
    for start, stop in [(0, 20_000), (9_990, 10_500), (15_000, 15_001)]:
        tracemalloc.start()
        try:
            it = manifest.read_slice(path, start, stop)
            first = next(it)
            held, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert first == list(_day_of(start + 1))[start]
        assert held < 600_000, f"{held} bytes held for one upload of [{start}, {stop})"  # 10,000 rows: ~3 MB
        assert [first, *it] == list(_day_of(stop))[start:]


def test_a_stream_allocates_arrow_memory_from_the_c_heap_and_restores_the_pool(tmp_path):
    """Inside ``score_days`` Arrow allocates from its system pool (the C heap, which
    ``release_free_heap`` hands back after each batch); mimalloc, Arrow's default, kept the pages
    it freed and the shard's RSS crept with the day. The caller's pool is back afterwards."""
    import pyarrow as pa

    from sofar_assets.lib.data import manifest
    from sofar_assets.lib.warehouse import PREDICTIONS, ParquetSpool

    d = tmp_path / "u"
    d.mkdir()
    for i in range(5):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(d / f"{i}.jpg")
    path = tmp_path / "m.parquet"
    from sofar_assets.lib.data.uploads import Upload

    manifest.write_manifest((Upload(f"d/{i}.jpg", str(d / f"{i}.jpg"), str(d / f"{i}.jpg"), None)
                             for i in range(5)), path)
    pools = []

    class Spy(ParquetSpool):
        def append(self, rows):
            pools.append(pa.default_memory_pool().backend_name)
            super().append(rows)

    before = pa.default_memory_pool().backend_name
    tallies = daily.score_days(
        torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 2)),
        [(dt.date(2026, 11, 1), manifest.read_slice(path, 0, 5))],
        open_spool=lambda day: Spy(PREDICTIONS, tmp_path / "s.parquet"), rows_per_group=2,
        columns={"model_name": "m", "model_version": "1", "predicted_at": pd.Timestamp("2026-11-02")},
        classes=["a", "b"], image_size=8, threshold=0.0, batch_size=2, num_workers=0, device="cpu")
    assert tallies[dt.date(2026, 11, 1)].staged_rows == 5
    assert pools and set(pools) == {"system"}
    assert pa.default_memory_pool().backend_name == before


def test_shard_count_follows_the_days_size():
    from sofar_assets.lib.data.manifest import shard_count

    assert [shard_count(n, 100_000, 16) for n in (0, 1, 100_000, 100_001, 1_000_000, 10**8)] == [1, 1, 1, 2, 10, 16]


def test_a_fixed_shards_per_day_cuts_every_day_in_n(tmp_path):
    from sofar_assets.lib.data import manifest

    units = manifest.pack({"a": ("a.parquet", 10), "b": ("b.parquet", 2)}, images_per_shard=1, max_shards=9,
                          fixed_shards=3)
    assert [[(s["day"], s["start"], s["stop"]) for s in u] for u in units] == [
        [("a", 0, 3), ("b", 0, 0)], [("a", 3, 6), ("b", 0, 1)], [("a", 6, 10), ("b", 1, 2)]]


def test_a_run_lists_each_day_once_and_sizes_its_shards_by_the_day(env, monkeypatch):
    """A quiet day and a busy day and an empty one in one run: the busy day gets
    ceil(uploads / images_per_shard) steps, the quiet one shares a step, the empty one is
    committed empty and says so; each day is listed ONCE (not once per shard)."""
    import sofar_assets.lib.warehouse.uploads as day_listing  # where a day folder is listed

    ids = {D1: _write_day(env["uploads"], D1, [BRIGHT["red"]]),
           D2: _write_day(env["uploads"], D2, [BRIGHT["blue"]] * 9 + [DARK])}
    listings = []
    real = day_listing.iter_folder_day

    def counting(folder, day, **kw):
        listings.append(day)
        return real(folder, day, **kw)

    monkeypatch.setattr(day_listing, "iter_folder_day", counting)
    cfg, defs = env["build"](images_per_shard=4, max_shards=8)
    result = _run(env, defs, D1, D3)
    assert result.success
    assert listings == [D1, D2, D3]  # once per day per run
    mats = {m.partition: m.metadata for m in result.asset_materializations_for_node("daily_predictions")}
    assert {d: mats[d.isoformat()]["shards"].value for d in (D1, D2, D3)} == {D1: 1, D2: 3, D3: 1}
    steps = {e.step_key for e in result.all_events if e.step_key and "score_shard" in e.step_key}
    # D1 (1 upload) shares a step with D2's first slice (3 of 10: 4 images); D2's other two slices
    # (3 and 4) a step each, and D3 (no uploads) rides with the last
    assert len(steps) == 3 and len(env["loads"]) == 3
    for day, expected in ids.items():
        assert sorted(_day_rows(defs, day)["image_id"]) == sorted(expected)
    assert mats[D3.isoformat()]["uploads"].value == 0 and mats[D3.isoformat()]["rows"].value == 0
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks["rows_match_uploads"].passed
    assert not checks["uploads_found"].passed and list(checks["uploads_found"].metadata[
        "days_without_uploads"].value) == [D3.isoformat()]
    assert not list((env["root"] / "staging").rglob("*.parquet"))  # manifests and shard files cleaned up


def test_the_uploads_table_is_listed_in_pages_not_read_whole(tmp_path, monkeypatch):
    from pathlib import Path

    from sofar_assets.config import parse_config
    from sofar_assets.defs.predictions import uploads_of_day
    from sofar_assets.lib.warehouse import DuckDBWarehouse

    cfg = parse_config({
        "tasks": {"defect": {"folder": "t", "labels": {"0": "normal", "1": "defect"}}},
        "uploads": {"table": "image_uploads", "allowed_roots": [str(tmp_path)]},
        "partitions": {"start_date": "2026-11-01"},
    }, base_dir=Path(tmp_path))
    wh = DuckDBWarehouse(tmp_path / "w.duckdb")
    wh.write_table("image_uploads", pd.DataFrame({
        "image_id": [f"i{k:03d}" for k in range(120)], "image_uri": [str(tmp_path / f"{k}.jpg") for k in range(120)],
        "uploaded_at": pd.Timestamp("2026-11-01 12:00") + pd.to_timedelta(np.arange(120), unit="s")}))

    def whole_day(*a, **k):
        raise AssertionError("the whole day was read into one frame")

    monkeypatch.setattr(DuckDBWarehouse, "read_range", whole_day)
    pages = []
    real = DuckDBWarehouse.iter_range

    def paged(self, *a, **k):
        for page in real(self, *a, **{**k, "batch_rows": 50}):
            pages.append(len(page))
            yield page

    monkeypatch.setattr(DuckDBWarehouse, "iter_range", paged)
    assert [u.image_id for u in uploads_of_day(cfg, D1, wh)] == [f"i{k:03d}" for k in range(120)]
    assert pages == [50, 50, 20]


# ---- the gs:// connection pool matches the reads in flight (lib/data/storage.py) ----------------------


@pytest.mark.parametrize("in_flight", [16, 32])
def test_gcs_reads_in_flight_reuse_a_pool_of_that_many_connections(monkeypatch, caplog, in_flight):
    """Waves of ``in_flight`` concurrent reads through the real google-cloud-storage client
    against the GCS emulator (50 ms per download): with the pool sized to the reads in flight
    no connection is thrown away; with requests' default pool of 10 (the client before), urllib3
    discards the connections beyond the tenth ("Connection pool is full") and reopens them."""
    import logging
    from concurrent.futures import ThreadPoolExecutor

    from sofar_assets.lib.data import storage
    from sofar_assets.stack.gcs_latency import LatencyGcs

    def discarded(pool_size: int) -> int:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="urllib3.connectionpool"), ThreadPoolExecutor(in_flight) as ex:
            got = list(ex.map(lambda i: storage.read_bytes(f"gs://bench/p/{i % 8}.jpg", max_bytes=1000,
                                                           pool_size=pool_size), range(4 * in_flight)))
        assert got == [bytes([i % 8]) * 100 for i in range(4 * in_flight)]
        return sum("Connection pool is full" in r.getMessage() for r in caplog.records)

    with LatencyGcs(latency_s=0.05) as gcs:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.url)
        storage.gcs_client.cache_clear()
        try:
            client = storage.gcs_client()
            client.create_bucket("bench")
            for i in range(8):
                client.bucket("bench").blob(f"p/{i}.jpg").upload_from_string(bytes([i]) * 100)
            assert discarded(in_flight) == 0
            assert discarded(10) > 0  # the old default pool: the same reads throw connections away
        finally:
            storage.gcs_client.cache_clear()


def test_a_forked_worker_makes_its_own_gcs_client_and_the_emulator_answers_without_nagle(monkeypatch):
    """A forked DataLoader worker starts without its parent's cached client (whose pooled
    keep-alive sockets the two processes would otherwise share), and the latency emulator's
    connections have TCP_NODELAY (Nagle's algorithm held each body for the client's delayed ACK:
    ~40 ms more per read than the 50 ms the benchmark adds)."""
    import os
    import socket

    from sofar_assets.lib.data import storage
    from sofar_assets.stack import gcs_latency

    nodelay = []

    class Handler(gcs_latency._SlowMedia):
        def setup(self):
            super().setup()
            nodelay.append(self.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    monkeypatch.setattr(gcs_latency, "_SlowMedia", Handler)
    with gcs_latency.LatencyGcs(latency_s=0.0) as gcs:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.url)
        storage.gcs_client.cache_clear()
        try:
            client = storage.gcs_client()
            client.create_bucket("b")
            client.bucket("b").blob("x.jpg").upload_from_string(b"abc")
            assert storage.read_bytes("gs://b/x.jpg") == b"abc"
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: report whether it inherited a client, then read through its own
                try:
                    cached = storage.gcs_client.cache_info().currsize
                    ok = storage.read_bytes("gs://b/x.jpg") == b"abc"
                    os.write(w, f"{cached} {ok}".encode())
                finally:
                    os._exit(0)
            os.close(w)
            os.waitpid(pid, 0)
            assert os.read(r, 100).decode() == "0 True"
            os.close(r)
            assert storage.gcs_client.cache_info().currsize > 0  # the parent keeps its own
        finally:
            storage.gcs_client.cache_clear()
    assert nodelay and all(nodelay)


def test_the_latency_emulator_queues_every_connection_a_scoring_run_opens_at_once():
    """Each DataLoader worker opens ``reads_in_flight`` connections at once; the emulator's listen
    backlog was socketserver's 5, and every SYN beyond it was dropped and resent a second later
    (Linux's initial RTO): ~1.2 s on the first batch of every worker, which GCS does not add."""
    from sofar_assets.config import InferenceConfig
    from sofar_assets.stack.gcs_latency import _Server

    inf = InferenceConfig()
    assert _Server.request_queue_size >= inf.num_workers * inf.reads_in_flight


def test_shard_pods_read_the_model_from_the_artifact_store_not_through_the_proxy():
    from sofar_assets.lib.serving.registry import direct_source

    class Client:
        def __init__(self, uri):
            self.uri = uri

        def get_model_version_download_uri(self, name, version):
            return self.uri

    proxied = Client("mlflow-artifacts:/1/models/m-abc/artifacts")
    assert direct_source(proxied, "m", "3", "gs://sofar-ml/mlartifacts/") == "gs://sofar-ml/mlartifacts/1/models/m-abc/artifacts"
    assert direct_source(proxied, "m", "3", None) is None  # destination unknown: through the server
    assert direct_source(Client("gs://b/mlartifacts/1/x/artifacts"), "m", "3") == "gs://b/mlartifacts/1/x/artifacts"
    assert direct_source(Client("/srv/mlartifacts/1/x"), "m", "3") == "/srv/mlartifacts/1/x"
    assert direct_source(Client("s3://other/x"), "m", "3") is None
