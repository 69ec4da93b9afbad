"""A day's uploads (lib/data/uploads.py): one upload per entry, the allow-list, refused entries as
error rows in listing order; and a hostile day through ``daily_predictions``: one row per entry,
nothing read outside the roots, the backfill goes on."""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import yaml

from sofar_assets.config import ConfigError, load_config, parse_config
from sofar_assets.definitions import build_definitions
from sofar_assets.lib.data import storage, uploads

from conftest import SECRET, _assets, _bounded

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


