"""Fault injection and hostile input (issue 11): nothing gets in, nothing gets stuck.

Bounded reads, one row per upload entry, the uploads allow-list, no pickles between steps, the
timezone checked at config load, a hostile upload day through ``daily_predictions``, and a
killed run that must not block the run queue.
"""

from __future__ import annotations

import datetime as dt
import os
import pickle
import shutil
import threading
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import yaml

from sofar_assets.config import ConfigError, load_config, parse_config
from sofar_assets.definitions import build_definitions
from sofar_assets.defs.resources import build_resources
from sofar_assets.lib.data import storage, uploads
from sofar_assets.lib.data.storage import ImageReadError

from conftest import DAYS, _assets

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


# -- item 2: reads are bounded ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["link_to_dev_zero", "named_pipe", "link_to_pipe", "directory"])
def test_reads_refuse_non_regular_files_without_reading(tmp_path, kind):
    target = tmp_path / "x.jpg"
    if kind == "link_to_dev_zero":
        target.symlink_to("/dev/zero")
        expect = "character device"
    elif kind == "named_pipe":
        os.mkfifo(target)  # no writer: opening it for reading would block forever
        expect = "named pipe"
    elif kind == "link_to_pipe":
        os.mkfifo(tmp_path / "fifo")
        target.symlink_to(tmp_path / "fifo")
        expect = "named pipe"
    else:
        target.mkdir()
        expect = "directory"
    with pytest.raises(ImageReadError) as err:
        _bounded(storage.read_bytes, str(target), max_bytes=1000)
    assert str(target) in str(err.value) and expect in str(err.value)


def test_reads_stop_at_max_bytes_plus_one(tmp_path):
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * 5000)
    with pytest.raises(ImageReadError, match=r"too large: 5000 bytes > max_bytes=4999"):
        storage.read_bytes(str(big), max_bytes=4999)
    assert storage.read_bytes(str(big), max_bytes=5000) == b"\xff" * 5000
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert storage.read_bytes(str(empty), max_bytes=10) == b""  # the decoder names it "empty file"
    # a regular file whose size is not known up front (procfs says 0): the read itself stops
    with pytest.raises(ImageReadError, match=r"too large: more than 4 bytes"):
        storage.read_bytes("/proc/self/status", max_bytes=4)


def test_iter_files_streams_and_skips_hidden(tmp_path):
    for name in ("b.jpg", "a.png", ".DS_Store"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.jpg").write_bytes(b"x")
    it = storage.iter_files(str(tmp_path))
    assert iter(it) is it  # a generator, not a list
    assert sorted(it) == [str(tmp_path / "a.png"), str(tmp_path / "b.jpg")]
    assert storage.list_files(str(tmp_path), recursive=True) == sorted(
        [str(tmp_path / "a.png"), str(tmp_path / "b.jpg"), str(tmp_path / "sub" / "c.jpg")])


class _FakeBlob:
    def __init__(self, name: str, data: bytes, calls: list):
        self.name, self.data, self.calls, self.size = name, data, calls, None

    def download_as_bytes(self, start=None, end=None, timeout=None, retry=None):
        self.calls.append({"start": start, "end": end, "timeout": timeout, "retry": retry})
        return self.data[start : None if end is None else end + 1]


class _FakeGcs:
    """Just enough of google-cloud-storage's client for the calls storage.py makes."""

    def __init__(self, objects: dict[str, bytes], page_size: int = 2):
        self.objects, self.calls, self.page_size = objects, [], page_size

    def bucket(self, name):
        return type("B", (), {"blob": lambda _, key: _FakeBlob(key, self.objects[f"{name}/{key}"], self.calls)})()

    def list_blobs(self, bucket, prefix="", delimiter=None):
        keys = sorted(k[len(bucket) + 1 :] for k in self.objects if k.startswith(f"{bucket}/{prefix}"))
        files = [k for k in keys if "/" not in k[len(prefix) :]]
        subs = sorted({prefix + k[len(prefix) :].split("/")[0] + "/" for k in keys if "/" in k[len(prefix) :]})
        pages = [files[i : i + self.page_size] for i in range(0, len(files), self.page_size)] or [[]]
        page_objs = []
        for n, names in enumerate(pages):
            page = [_FakeBlob(k, b"", self.calls) for k in names]
            page_objs.append(type("P", (list,), {"prefixes": tuple(subs) if n == 0 else ()})(page))
        return type("It", (), {"pages": iter(page_objs), "__iter__": lambda it: (b for p in page_objs for b in p)})()


def test_gcs_reads_are_ranged_with_a_timeout_and_bounded_retries(monkeypatch):
    fake = _FakeGcs({"imgs/up/a.jpg": b"x" * 100, "imgs/up/empty.jpg": b""})
    monkeypatch.setattr(storage, "_gcs_client", lambda *_: fake)
    assert storage.read_bytes("gs://imgs/up/a.jpg", max_bytes=100, timeout_s=7, retries=2) == b"x" * 100
    call = fake.calls[-1]
    assert (call["start"], call["end"], call["timeout"]) == (0, 100, 7)  # at most max_bytes + 1 bytes
    assert call["retry"] is not None and call["retry"].timeout == 14
    with pytest.raises(ImageReadError, match=r"gs://imgs/up/a.jpg: too large: more than 99 bytes"):
        storage.read_bytes("gs://imgs/up/a.jpg", max_bytes=99)
    assert fake.calls[-1]["end"] == 99
    assert storage.read_bytes("gs://imgs/up/empty.jpg", max_bytes=10) == b""
    with pytest.raises(ImageReadError, match="not a gs://bucket/object URI"):
        storage.read_bytes("gs://imgs/", max_bytes=10)


def test_gcs_day_gives_one_upload_per_object_and_refuses_sub_folders(monkeypatch):
    fake = _FakeGcs({f"imgs/up/2026-11-10/{n}": b"x" for n in ("a.jpg", "b.jpg", "c.jpg", ".hidden", "album/d.jpg")})
    monkeypatch.setattr(storage, "_gcs_client", lambda *_: fake)
    got = sorted(uploads.iter_folder_day("gs://imgs/up", dt.date(2026, 11, 10)), key=lambda u: u.image_id)
    assert [(u.image_id, u.path is not None) for u in got] == [
        ("2026-11-10/a.jpg", True), ("2026-11-10/album", False), ("2026-11-10/b.jpg", True), ("2026-11-10/c.jpg", True)]
    assert "sub-folder" in got[1].error and got[0].path == "gs://imgs/up/2026-11-10/a.jpg"


# -- items 3 and 5: one Upload per entry of a day folder ---------------------------------------


def _hostile_day(root: Path, day: dt.date, good: list[Path]) -> dict[str, str]:
    """A day folder with good photos beside hostile entries; returns {entry name: expected kind}."""
    folder = root / day.isoformat()
    folder.mkdir(parents=True)
    expected = {}
    for src in good:
        shutil.copy(src, folder / src.name)
        expected[src.name] = "ok"
    # a good photo whose name is not valid UTF-8 (Latin-1 bytes), created through a bytes path
    raw_name = b"caf\xe9-" + os.fsencode(good[0].name)
    shutil.copy(src=good[0], dst=os.path.join(os.fsencode(folder), raw_name))
    expected[raw_name.decode("utf-8", "backslashreplace")] = "ok"
    # an unreadable file with a non-UTF-8 name whose bytes are a secret
    bad_name = b"\xff\xfe-notes.jpg"
    with open(os.path.join(os.fsencode(folder), bad_name), "wb") as f:
        f.write(SECRET)
    expected[bad_name.decode("utf-8", "backslashreplace")] = "decode"
    (folder / "passwd.jpg").symlink_to("/etc/passwd")
    expected["passwd.jpg"] = "leaves the uploads root"
    (folder / "zero.jpg").symlink_to("/dev/zero")
    expected["zero.jpg"] = "leaves the uploads root"
    (folder / "broken.jpg").symlink_to(folder / "gone.jpg")
    expected["broken.jpg"] = "broken symbolic link"
    os.mkfifo(folder / "pipe.jpg")
    expected["pipe.jpg"] = "named pipe"
    (folder / "album").mkdir()
    expected["album"] = "sub-folder"
    (folder / ".DS_Store").write_bytes(b"\0")  # not an upload
    return expected


@pytest.fixture
def photos(demo_data) -> list[Path]:
    return sorted((demo_data / "uploads" / DAYS[0].isoformat()).iterdir())[:3]


def test_every_entry_of_a_day_is_one_upload(tmp_path, photos):
    root = tmp_path / "uploads"
    day = dt.date(2026, 11, 10)
    expected = _hostile_day(root, day, photos)
    (root / day.isoformat() / "outside.jpg").symlink_to(photos[0])  # a photo, but out of the root
    expected["outside.jpg"] = "leaves the uploads root"
    got = _bounded(lambda: list(uploads.iter_folder_day(str(root), day)))
    by_name = {u.image_id.split("/", 1)[1]: u for u in got}
    assert len(got) == len(by_name) == len(expected) and set(by_name) == set(expected)
    for name, kind in expected.items():
        u = by_name[name]
        u.image_id.encode("utf-8"), u.image_uri.encode("utf-8")  # storable as they are
        if kind in ("ok", "decode"):
            assert u.error is None and u.path is not None and os.path.isfile(u.path)
        else:
            assert u.path is None and kind in u.error and name in u.error, (name, u)
    # the non-UTF-8 photo is read at its real (bytes) path and stored escaped
    odd = by_name[next(n for n in expected if n.startswith("caf\\xe9-"))]
    assert os.fsencode(odd.path).endswith(b"caf\xe9-" + os.fsencode(photos[0].name))
    assert odd.image_uri.endswith("caf\\xe9-" + photos[0].name)


def test_links_may_point_into_the_allowed_roots(tmp_path, photos):
    store, root, day = tmp_path / "store", tmp_path / "uploads", dt.date(2026, 11, 10)
    store.mkdir()
    shutil.copy(photos[0], store / "a.jpg")
    (root / day.isoformat()).mkdir(parents=True)
    (root / day.isoformat() / "a.jpg").symlink_to(store / "a.jpg")
    (root / day.isoformat() / "b.jpg").symlink_to(root / day.isoformat() / "a.jpg")  # a link to a link
    assert [u.error for u in uploads.iter_folder_day(str(root), day)] != [None, None]
    got = list(uploads.iter_folder_day(str(root), day, allowed_roots=[str(root), str(store)]))
    assert [u.error for u in got] == [None, None] and {u.path for u in got} == {str(store / "a.jpg")}
    # a day folder that is itself a link out of the root leads nowhere
    (root / "2026-11-11").symlink_to(store)
    assert all("leaves the uploads root" in u.error for u in uploads.iter_folder_day(str(root), dt.date(2026, 11, 11)))


def test_refused_uploads_become_error_rows_in_listing_order():
    from sofar_assets.lib.serving.inference import PREDICTION_COLUMNS

    ups = [uploads.Upload("d/a", "/u/a", "/u/a"), uploads.Upload("d/b", "/u/b", None, "UploadRefused: /u/b: pipe"),
           uploads.Upload("d/\\xff", "/u/\\xff", "/u/\udcff")]
    scored = pd.DataFrame({"image_id": ["d/a", "d/\\xff"], "image_uri": ["/u/a", "/u/\udcff"],
                           "top1_label": ["dirt", None], "top1_prob": [0.9, float("nan")], "is_ood": [False, False],
                           "error": [None, "ImageDecodeError: /u/\udcff: empty file"]})
    rows = uploads.with_refused(ups, scored)
    assert rows["image_id"].tolist() == ["d/a", "d/b", "d/\\xff"]
    assert rows["image_uri"].tolist() == ["/u/a", "/u/b", "/u/\\xff"]  # the stored form, never the real path
    assert rows["error"].tolist()[1:] == ["UploadRefused: /u/b: pipe", "ImageDecodeError: /u/\\xff: empty file"]
    assert rows["top1_label"].tolist()[0] == "dirt" and rows["is_ood"].tolist() == [False] * 3
    # a day where nothing may be read: every entry still gets its row
    only = uploads.with_refused(ups[1:2], pd.DataFrame(columns=list(PREDICTION_COLUMNS)))
    assert only[["image_id", "error", "is_ood"]].to_dict("records") == [
        {"image_id": "d/b", "error": "UploadRefused: /u/b: pipe", "is_ood": False}]
    with pytest.raises(ValueError, match="1 scored rows for 2 readable uploads"):
        uploads.with_refused(ups, scored.iloc[:1])


# -- item 4: URIs from the uploads table must lie under the allowed roots ------------------------


HOSTILE_URIS = ["/etc/passwd", "~/.bashrc", "/proc/self/environ", "../../x", "gs://other-bucket/a.jpg",
                "{root}/../../etc/passwd", "{root}/link-out.jpg", "gs://sofar-images/uploads/../secrets/k.json",
                "gs://sofar-images/uploads-evil/a.jpg", "file:///etc/passwd", ""]


def test_table_uris_outside_the_allowed_roots_are_refused_unread(tmp_path, monkeypatch):
    root = tmp_path / "images"
    root.mkdir()
    (root / "ok.jpg").write_bytes(b"x")
    (root / "link-out.jpg").symlink_to("/etc/passwd")
    roots = [str(root), "gs://sofar-images/uploads"]
    rows = [(f"id{i}", u.format(root=root)) for i, u in enumerate(HOSTILE_URIS)]
    rows += [("good", str(root / "ok.jpg")), ("good-gs", "gs://sofar-images/uploads/2026/a.jpg")]
    got = list(uploads.iter_table_uploads(rows, roots))
    assert len(got) == len(rows)
    for (image_id, uri), u in zip(rows, got, strict=True):
        assert u.image_id == image_id
        if image_id.startswith("good"):
            assert u.error is None and u.path is not None and uploads.is_allowed(uri, roots)
        else:
            assert u.path is None and u.error.startswith("UploadRefused") and not uploads.is_allowed(uri, roots)
            assert uri in u.error if uri else "empty" in u.error


def test_uploads_table_needs_an_allow_list():
    base = {"tasks": {"defect": {"folder": "t", "labels": {"0": "normal", "1": "defect"}}},
            "partitions": {"start_date": "2026-11-01"}}
    with pytest.raises(ConfigError, match=r"uploads\.allowed_roots: .*required with a 'table' source"):
        parse_config({**base, "uploads": {"table": "image_uploads"}}, base_dir=Path("/tmp"))
    with pytest.raises(ConfigError, match=r"uploads\.allowed_roots: .*'/' would allow every file"):
        parse_config({**base, "uploads": {"table": "image_uploads", "allowed_roots": ["/"]}}, base_dir=Path("/tmp"))
    cfg = parse_config({**base, "uploads": {"table": "image_uploads", "allowed_roots": ["imgs", "gs://b/up"]}},
                       base_dir=Path("/srv/sofar"))
    assert cfg.upload_roots == ["/srv/sofar/imgs", "gs://b/up"]


# -- item 8 (timezone part): checked when the config loads ---------------------------------------


def test_unknown_timezone_is_a_config_error_naming_the_key():
    base = {"tasks": {"defect": {"folder": "t", "labels": {"0": "normal", "1": "defect"}}},
            "uploads": {"folder": "up"}}
    for tz in ("Mars/Olympus", "../../etc/localtime", ""):
        with pytest.raises(ConfigError, match=r"partitions\.timezone: .*unknown time zone"):
            parse_config({**base, "partitions": {"start_date": "2026-11-01", "timezone": tz}}, base_dir=Path("/tmp"))
    cfg = parse_config({**base, "partitions": {"start_date": "2026-11-01", "timezone": "Asia/Seoul"}}, base_dir=Path("/tmp"))
    assert cfg.partitions.timezone == "Asia/Seoul"


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


# -- items 2-5 through the asset: a hostile upload day ---------------------------------------------


def _predictions_defs(pipeline, tmp_path, uploads_cfg: dict):
    base = yaml.safe_load((pipeline["folder"] / "sofar.yaml").read_text())
    base["uploads"] = uploads_cfg
    # the pipeline's champion model, but a warehouse of its own: other tests count the shared table's days
    base["storage"]["warehouse"] = {"kind": "duckdb", "path": str(tmp_path / "hostile.duckdb")}
    path = tmp_path / "hostile.yaml"
    path.write_text(yaml.safe_dump(base))
    return build_definitions(load_config(path))


def _materialize(pipeline, defs, start: dt.date, end: dt.date):
    return dg.materialize(
        _assets(defs), selection=dg.AssetSelection.assets("daily_predictions"),
        tags={"dagster/asset_partition_range_start": start.isoformat(),
              "dagster/asset_partition_range_end": end.isoformat()},
        resources=defs.resources, instance=pipeline["instance"], raise_on_error=False,
    )


def _day_rows(defs, day: dt.date) -> pd.DataFrame:
    wh = defs.resources["warehouse"].get()
    return wh.read_range("predictions", "prediction_date", day, day + dt.timedelta(days=1))


def test_hostile_upload_day_gives_one_row_per_entry_and_the_backfill_goes_on(pipeline, tmp_path, photos, monkeypatch):
    root = tmp_path / "uploads"
    day, next_day = dt.date(2026, 11, 12), dt.date(2026, 11, 13)
    expected = _hostile_day(root, day, photos)
    (root / next_day.isoformat()).mkdir()
    for p in photos:
        shutil.copy(p, root / next_day.isoformat() / p.name)
    reads = []
    real_read = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda uri, **kw: reads.append(uri) or real_read(uri, **kw))
    defs = _predictions_defs(pipeline, tmp_path, {"folder": str(root)})

    result = _materialize(pipeline, defs, day, next_day)

    assert result.success
    rows = _day_rows(defs, day)
    names = [i.split("/", 1)[1] for i in rows["image_id"]]
    assert sorted(names) == sorted(expected), "every entry of the day has exactly one row"
    for name, row in zip(names, rows.itertuples(), strict=True):
        kind = expected[name]
        assert row.image_uri.endswith("/" + name)
        if kind == "ok":
            assert pd.isna(row.error) and row.top1_label is not None and 0 < row.top1_prob <= 1, name
        else:
            assert name in row.error and pd.isna(row.top1_prob), (name, row.error)
            if kind != "decode":
                assert kind in row.error, (name, row.error)
    assert not rows["error"].str.contains("root:x|SECRET", na=False).any(), "no file bytes in error rows"
    read_names = {os.path.basename(os.fsencode(u)) for u in reads}
    assert not read_names & {b"passwd.jpg", b"zero.jpg", b"broken.jpg", b"pipe.jpg", b"album"}
    assert not any(os.path.realpath(u) in ("/etc/passwd", "/dev/zero") for u in reads)
    following = _day_rows(defs, next_day)
    assert len(following) == len(photos) and following["error"].isna().all()


def test_hostile_uploads_table_reads_nothing_outside_the_roots(pipeline, tmp_path, photos, monkeypatch):
    root = tmp_path / "images"
    root.mkdir()
    shutil.copy(photos[0], root / "ok.jpg")
    (root / "link-out.jpg").symlink_to("/etc/passwd")
    env = tmp_path / "environ.jpg"  # a file a hostile URI names, outside the roots
    env.write_bytes(SECRET)
    day = dt.date(2026, 11, 14)
    uris = [str(root / "ok.jpg"), "/etc/passwd", "~/.bashrc", "/proc/self/environ", "../../x",
            "gs://other-bucket/a.jpg", str(root / "link-out.jpg"), f"{root}/../environ.jpg"]
    defs = _predictions_defs(pipeline, tmp_path, {"table": "image_uploads", "allowed_roots": [str(root)]})
    defs.resources["warehouse"].get().write_table("image_uploads", pd.DataFrame({
        "image_id": [f"t{i}" for i in range(len(uris))], "image_uri": uris,
        "uploaded_at": [pd.Timestamp(day) + pd.Timedelta(minutes=i) for i in range(len(uris))],
    }))
    reads = []
    real_read = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda uri, **kw: reads.append(uri) or real_read(uri, **kw))

    result = _materialize(pipeline, defs, day, day)

    assert result.success
    rows = _day_rows(defs, day).set_index("image_id").loc[[f"t{i}" for i in range(len(uris))]]
    assert pd.isna(rows.loc["t0", "error"]) and rows.loc["t0", "top1_label"] is not None
    assert rows["error"].iloc[1:].str.startswith("UploadRefused").all()
    assert not rows["error"].str.contains("root:x|SECRET|DAGSTER_", na=False).any()
    images = [u for u in reads if not str(u).startswith(defs_cfg_io_base(defs))]  # not the JSON step outputs
    # only the allowed photo is ever read (for scoring, and again for the day's review sheet)
    assert {os.path.basename(u) for u in images} == {"ok.jpg"}


def defs_cfg_io_base(defs) -> str:
    """Where the JSON IO manager keeps step outputs (it reads them through storage.read_bytes too)."""
    return str(defs.resources["io_manager"].base_dir)


# -- item 1: a killed run does not block the run queue ----------------------------------------------

REPO = Path(__file__).resolve().parents[1]
DAGSTER_BIN = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"

JOBS = '''
import os, time
import dagster as dg

@dg.op
def nap():
    with open({pid_file!r} + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace({pid_file!r} + ".tmp", {pid_file!r})
    time.sleep(600)

@dg.op
def hello():
    return 1

# dagster/max_runtime: the per-run form of run_monitoring.max_runtime_seconds (1 h), short for the test
@dg.job(executor_def=dg.in_process_executor, tags={{"dagster/max_runtime": 20}})
def nap_job():
    nap()

@dg.job(executor_def=dg.in_process_executor)
def hello_job():
    hello()

# the daemon itself queues the second run, as the daily schedule would
@dg.sensor(job=hello_job, minimum_interval_seconds=1, default_status=dg.DefaultSensorStatus.RUNNING)
def after_the_kill():
    if os.path.exists({go_file!r}):
        yield dg.RunRequest(run_key="after-the-kill")

defs = dg.Definitions(jobs=[nap_job, hello_job], sensors=[after_the_kill])
'''


def _wait(what: str, predicate, timeout_s: float, procs=()):
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for p in procs:
            assert p.poll() is None, f"{p.args[:2]} exited with {p.returncode} while waiting for {what}"
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.mark.slow
def test_a_killed_run_is_failed_and_the_queued_run_still_runs(tmp_path):
    """kill -9 a local run (started as `make pipeline` starts them: `dagster job execute`, in one
    process) while it is STARTED and the daemon has queued a second run behind it
    (max_concurrent_runs: 1). With our dagster.yaml's run monitoring the dead run is failed and
    the queued one runs; without it the queue waits forever."""
    import signal
    import subprocess
    import time

    from dagster import DagsterRunStatus

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")  # our queue + monitoring settings
    pid_file, go_file = tmp_path / "nap.pid", tmp_path / "go"
    (tmp_path / "jobs.py").write_text(JOBS.format(pid_file=str(pid_file), go_file=str(go_file)))
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": ""}
    cli = dict(cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    instance = dg.DagsterInstance.from_config(str(home))
    assert instance.run_monitoring_enabled, "run_monitoring is off in dagster_home/dagster.yaml"
    started = time.monotonic()
    daemon = subprocess.Popen([DAGSTER_BIN / "dagster-daemon", "run", "-f", "jobs.py"], **cli)
    run1 = subprocess.Popen([DAGSTER_BIN / "dagster", "job", "execute", "-f", "jobs.py", "-j", "nap_job"], **cli)
    try:
        pid = int(_wait("the run to start", lambda: pid_file.exists() and pid_file.read_text(), 90, [daemon, run1]))
        assert pid == run1.pid  # the op runs in the CLI's own process (in-process executor)
        [killed] = instance.get_runs()
        go_file.touch()  # the daemon queues the next run behind it
        queued = _wait("the daemon to queue the second run", lambda: instance.get_runs(
            dg.RunsFilter(job_name="hello_job", statuses=[DagsterRunStatus.QUEUED])), 60, [daemon])[0]
        assert instance.get_run_by_id(killed.run_id).status == DagsterRunStatus.STARTED
        os.kill(pid, signal.SIGKILL)  # the dead run keeps its slot: only run monitoring will notice
        run1.wait(10)

        def finished():
            a, b = instance.get_run_by_id(killed.run_id), instance.get_run_by_id(queued.run_id)
            return a.is_finished and b.is_finished and (a, b)

        a, b = _wait("the killed run to fail and the queued run to finish", finished, 90, [daemon])
        assert a.status == DagsterRunStatus.FAILURE
        assert b.status == DagsterRunStatus.SUCCESS
        print(f"killed run FAILURE, queued run SUCCESS: {time.monotonic() - started:.0f} s after the start")
    finally:
        for proc in (run1, daemon):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
