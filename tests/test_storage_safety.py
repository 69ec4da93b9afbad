"""Every image read is bounded, and a read confined to the upload roots cannot be redirected:
a folder swapped for a link between the allow-list's check and the read is refused, roots that
normalise to ``/`` allow nothing, and files over the size limit are error rows naming them."""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import yaml
from PIL import Image

from sofar_assets.config import ConfigError, load_config
from sofar_assets.definitions import build_definitions
from sofar_assets.lib.data import dataset as ds
from sofar_assets.lib.data import storage, uploads
from sofar_assets.lib.data.storage import ImageReadError

from conftest import _assets, _bounded, write_config


def _png(path: Path, colour=(10, 200, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (48, 32), colour).save(path)
    return path


def _sparse(path: Path, size: int) -> Path:
    """A file of ``size`` bytes that takes no disk (a hole): the PNG signature, then zeros."""
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.truncate(size)
    return path


# -- item 10: the check and the read are one ----------------------------------------------------------


def test_a_folder_swapped_for_a_link_after_the_check_is_refused_not_followed(tmp_path):
    root, outside = tmp_path / "uploads", tmp_path / "outside"
    _png(root / "day" / "photo.png")
    _png(outside / "photo.png", colour=(250, 0, 0))  # a readable image the roots do not allow
    (upload,) = uploads.iter_table_uploads([("u1", str(root / "day" / "photo.png"))], [str(root)])
    assert upload.error is None and upload.path == str(root / "day" / "photo.png")

    (root / "day").rename(root / "day.old")  # between the check and the read
    (root / "day").symlink_to(outside, target_is_directory=True)

    with pytest.raises(ImageReadError, match="outside the allowed roots") as exc:
        storage.read_bytes(upload.path, within=[str(root)])
    assert exc.value.uri == upload.path


def test_a_link_swapped_in_after_the_path_was_resolved_is_not_followed(tmp_path, monkeypatch):
    """The race's narrowest window: the path resolved inside the roots, then a component becomes a
    link before the open. The open walks the real path without following any link."""
    root, outside = tmp_path / "uploads", tmp_path / "outside"
    _png(root / "day" / "photo.png")
    _png(outside / "photo.png", colour=(250, 0, 0))
    real_realpath = os.path.realpath

    def realpath_then_swap(p, *a, **kw):
        got = real_realpath(p, *a, **kw)
        if got.endswith("photo.png") and not (root / "day").is_symlink():
            (root / "day").rename(root / "day.old")
            (root / "day").symlink_to(outside, target_is_directory=True)
        return got

    monkeypatch.setattr(os.path, "realpath", realpath_then_swap)
    with pytest.raises(ImageReadError, match="symbolic link"):
        storage.read_bytes(str(root / "day" / "photo.png"), within=[str(root)])


def test_confined_reads_still_take_regular_files_and_links_inside_the_roots(tmp_path):
    root = tmp_path / "uploads"
    photo = _png(root / "store" / "a.png")
    (root / "day").mkdir()
    (root / "day" / "link.png").symlink_to(photo)  # a link that stays inside the roots is fine
    assert storage.read_bytes(str(root / "day" / "link.png"), within=[str(root)]) == photo.read_bytes()
    with pytest.raises(ImageReadError, match="outside the allowed roots"):
        storage.read_bytes(str(photo), within=[str(tmp_path / "elsewhere")])


@pytest.mark.parametrize("root", ["/.", "//", "/tmp/..", "/./"])
def test_roots_that_normalise_to_slash_allow_nothing(tmp_path, root):
    photo = _png(tmp_path / "a.png")
    assert not uploads.is_allowed(str(photo), [root])
    assert not uploads.is_allowed("/etc/passwd", [root])
    with pytest.raises(ImageReadError, match="outside the allowed roots"):
        storage.read_bytes("/etc/passwd", within=[root])


@pytest.mark.parametrize("root", ["/.", "/tmp/../", "//"])
def test_a_config_root_that_normalises_to_slash_is_refused(tmp_path, root):
    data = tmp_path / "data"
    (data / "uploads").mkdir(parents=True)
    path = write_config(
        tmp_path, data, uploads={"folder": None, "table": "image_uploads", "allowed_roots": [root]}
    )
    with pytest.raises(ConfigError, match="would allow every file"):
        load_config(path, check_paths=False)


def test_a_config_root_that_resolves_to_slash_is_refused(tmp_path):
    (tmp_path / "everything").symlink_to("/")
    path = write_config(
        tmp_path,
        tmp_path,
        uploads={"folder": None, "table": "image_uploads", "allowed_roots": ["everything"]},
    )
    with pytest.raises(ConfigError, match="whole file system"):
        load_config(path, check_paths=False)


# -- item 6: every image read is bounded -----------------------------------------------------------


def test_reads_are_bounded_by_default(tmp_path):
    big = _sparse(tmp_path / "huge.png", storage.MAX_IMAGE_BYTES + 1)
    with pytest.raises(ImageReadError, match=f"too large: {storage.MAX_IMAGE_BYTES + 1} bytes"):
        storage.read_bytes(str(big))


def test_an_oversized_task_image_is_an_error_row_naming_it(tmp_path):
    from sofar_assets.defs.data import file_inspector
    from sofar_assets.defs.resources import ImageStoreResource

    (tmp_path / "0_NORMAL").mkdir()
    big = _sparse(tmp_path / "0_NORMAL" / "huge.jpg", 3 * 10**9)  # 3 GB, no disk
    inspect = file_inspector(ImageStoreResource(cache_dir=str(tmp_path / "cache")), 32, max_bytes=1_000_000)
    row = ds.scan_row("defect", str(big), "0_NORMAL", {"0_NORMAL": "normal"}, inspect)
    assert row["error"].startswith("ImageReadError") and str(big) in row["error"]
    assert "too large: 3000000000 bytes > max_bytes=1000000" in row["error"]


# -- through the assets: the daily scoring and the corrections' photos --------------------------------


@pytest.fixture
def photos(demo_data) -> list[Path]:
    return sorted((demo_data / "uploads" / "2026-11-01").iterdir())[:2]


def _defs(pipeline, tmp_path, uploads_cfg: dict, **extra):
    base = yaml.safe_load((pipeline["folder"] / "sofar.yaml").read_text())
    base["uploads"] = uploads_cfg
    base["storage"]["warehouse"] = {"kind": "duckdb", "path": str(tmp_path / "safety.duckdb")}
    for key, value in extra.items():
        base[key] = {**base.get(key, {}), **value}
    path = tmp_path / "safety.yaml"
    path.write_text(yaml.safe_dump(base))
    cfg = load_config(path)
    return cfg, build_definitions(cfg)


def _predict(defs, day: dt.date, instance):
    return dg.materialize(
        _assets(defs),
        selection=dg.AssetSelection.assets("daily_predictions"),
        partition_key=day.isoformat(),
        resources=defs.resources,
        instance=instance,
        raise_on_error=False,
    )


def test_a_day_folder_swapped_for_a_link_mid_run_scores_nothing_outside(
    pipeline, tmp_path, photos, monkeypatch
):
    from sofar_assets.defs import predictions

    root, outside, day = tmp_path / "uploads", tmp_path / "outside", dt.date(2026, 11, 21)
    (root / day.isoformat()).mkdir(parents=True)
    outside.mkdir()
    for p in photos:
        shutil.copy(p, root / day.isoformat() / p.name)
        shutil.copy(p, outside / p.name)  # the same photos under the same names, outside the roots
    listed = predictions.uploads_of_day

    def list_then_swap(cfg, d, wh):
        yield from listed(cfg, d, wh)  # every entry checked and yielded; now the folder becomes a link
        (root / d.isoformat()).rename(root / f"{d.isoformat()}.old")
        (root / d.isoformat()).symlink_to(outside, target_is_directory=True)

    monkeypatch.setattr(predictions, "uploads_of_day", list_then_swap)
    _, defs = _defs(pipeline, tmp_path, {"folder": str(root)})

    result = _predict(defs, day, dg.DagsterInstance.ephemeral())

    rows = (
        defs.resources["warehouse"]
        .get()
        .read_range("predictions", "prediction_date", day, day + dt.timedelta(days=1))
    )
    assert len(rows) == len(photos), "one row per upload"
    assert rows["error"].str.contains("outside the allowed roots", regex=False).all(), list(rows["error"])
    assert rows["top1_label"].isna().all(), "nothing outside the roots was scored"
    assert not result.success, "every image of the day failed: the run says so (its rows are written)"


def test_an_oversized_correction_photo_is_rejected_naming_it(pipeline, tmp_path, photos):
    from sofar_assets.lib.review import corrections as corr

    root, day = tmp_path / "uploads", dt.date(2026, 11, 22)
    (root / day.isoformat()).mkdir(parents=True)
    for name, p in zip(("ok.jpg", "grows.jpg"), photos, strict=True):
        shutil.copy(p, root / day.isoformat() / name)
    cfg, defs = _defs(pipeline, tmp_path, {"folder": str(root)}, inference={"max_bytes": 5_000_000})
    instance = dg.DagsterInstance.ephemeral()
    assert _predict(defs, day, instance).success
    wh = defs.resources["warehouse"].get()
    corr.record(
        wh,
        [{"image_id": f"{day}/{n}", "label": "dirt", "where": "test"} for n in ("ok.jpg", "grows.jpg")],
        cfg.vocabulary(),
        inspector="tester",
        what="test",
    )
    grown = _sparse(root / day.isoformat() / "grows.jpg", 60_000_000)  # replaced since it was scored

    result = dg.materialize(
        _assets(defs),
        selection=dg.AssetSelection.assets(["raw_labels", "label_corrections"]),
        resources=defs.resources,
        instance=instance,
        raise_on_error=False,
    )

    assert result.success
    raw = wh.read_table("raw_labels_label_corrections").set_index("image_id")
    error = raw.loc[f"{day}/grows.jpg", "error"]
    assert str(grown) in error and "too large: 60000000 bytes > max_bytes=5000000" in error, error
    assert pd.isna(raw.loc[f"{day}/ok.jpg", "error"])


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
    monkeypatch.setattr(storage, "gcs_client", lambda *_: fake)
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
    monkeypatch.setattr(storage, "gcs_client", lambda *_: fake)
    got = sorted(uploads.iter_folder_day("gs://imgs/up", dt.date(2026, 11, 10)), key=lambda u: u.image_id)
    assert [(u.image_id, u.path is not None) for u in got] == [
        ("2026-11-10/a.jpg", True), ("2026-11-10/album", False), ("2026-11-10/b.jpg", True), ("2026-11-10/c.jpg", True)]
    assert "sub-folder" in got[1].error and got[0].path == "gs://imgs/up/2026-11-10/a.jpg"


