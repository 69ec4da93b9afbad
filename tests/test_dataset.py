import pandas as pd
import pytest

from sofar_assets.lib.data import dataset as ds
from sofar_assets.lib.data import storage
from sofar_assets.lib.data.images import PreprocessCache, sha256_hex

VOCAB = ["normal", "defect", "dirt"]


def _raw(rows):
    return pd.DataFrame(
        [dict(task=t, image_uri=u, source_label="x", label=lab, sha256=s, n_bytes=1, width=1, height=1, error=e)
         for t, u, lab, s, e in rows],
        columns=ds.RAW_COLUMNS,
    )


def test_shared_label_duplicates_and_conflicts():
    raw = _raw([
        ("defect", "/d/n1.jpg", "normal", "a" * 64, None),
        ("dirt", "/r/n1.jpg", "normal", "a" * 64, None),  # the same photo in both tasks, same label
        ("defect", "/d/x.jpg", "defect", "b" * 64, None),
        ("dirt", "/r/x.jpg", "dirt", "b" * 64, None),  # the same photo, two labels: multi-label
        ("dirt", "/r/bad.jpg", "dirt", None, "ImageDecodeError: /r/bad.jpg: truncated"),
    ])
    data = ds.concatenate(raw, VOCAB, val_fraction=0.2, test_fraction=0.2)
    assert len(data) == 2
    a = data.set_index("sha256").loc["a" * 64]
    assert (a["label"], a["multi_label"], a["tasks"], a["n_sources"]) == ("normal", False, "defect|dirt", 2)
    b = data.set_index("sha256").loc["b" * 64]
    assert (b["labels"], b["multi_label"]) == ("defect|dirt", True)
    counts = ds.counts_by(data, VOCAB)
    assert counts.loc["defect", "multi_label"] == 1 and counts.loc["dirt", "multi_label"] == 1
    assert counts[list(ds.SPLITS)].to_numpy().sum() == 1  # only the single-label photo is counted


def test_splits_are_stable_and_never_leak():
    import hashlib

    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(400)]
    raw = _raw([("t", f"/x/{i}.jpg", VOCAB[i % 3], s, None) for i, s in enumerate(shas)])
    first = ds.concatenate(raw.iloc[:300], VOCAB, val_fraction=0.15, test_fraction=0.15)
    more = ds.concatenate(raw, VOCAB, val_fraction=0.15, test_fraction=0.15)
    merged = first.merge(more, on="sha256", suffixes=("_a", "_b"))
    assert len(merged) == 300 and (merged["split_a"] == merged["split_b"]).all()
    shares = more["split"].value_counts(normalize=True)
    assert 0.6 < shares["train"] < 0.8 and 0.08 < shares["val"] < 0.22 and 0.08 < shares["test"] < 0.22
    # stratified in expectation: every class gets every split
    assert (pd.crosstab(more["label"], more["split"]) >= 8).all().all()
    assert ds.dataset_hash(first) != ds.dataset_hash(more)
    assert ds.dataset_hash(more) == ds.dataset_hash(more.sample(frac=1, random_state=0))


def test_unmapped_label_and_unreadable_file_become_named_error_rows():
    def inspect(uri):
        if uri.endswith("bad.jpg"):
            raise ValueError(f"{uri}: not an image")
        return ("c" * 64, 10, 4, 3)

    df = ds.scan_rows("dirt", [("/x/ok.jpg", "1_DIRT"), ("/x/bad.jpg", "1_DIRT"), ("/x/o.jpg", "9_OTHER")],
                      {"1_DIRT": "dirt"}, inspect)
    assert df["error"].isna().tolist() == [True, False, False]
    assert "/x/bad.jpg: not an image" in df.loc[1, "error"]
    assert "'9_OTHER' is not mapped in tasks.dirt.labels" in df.loc[2, "error"]


def test_typo_of_a_shared_label_is_reported():
    found = ds.suspicious_labels({"defect": {"a": "normal", "b": "defect"}, "dirt": {"a": "nomral", "b": "dirt"},
                                  "wash": {"a": "normal"}})
    assert found == ["label 'nomral' (task dirt) looks like a typo of 'normal' (used by defect, wash)"]
    assert ds.suspicious_labels({"defect": {"a": "normal", "b": "defect"}, "dirt": {"a": "normal", "b": "dirt"}}) == []


def test_real_samples_concatenate_into_one_normal_class(samples, tmp_path):
    cache = PreprocessCache(tmp_path / "cache", 64)

    def inspect(uri):
        data = storage.read_bytes(uri)
        sha = sha256_hex(data)
        arr = cache.get(sha, lambda: data, uri)
        return sha, len(data), arr.shape[1], arr.shape[0]

    frames = []
    for task, folder, mapping in (
        ("defect", "CAR_DEFECT_RECOGNITION", {"0_NORMAL": "normal", "1_DEFECT": "defect"}),
        ("dirt", "CAR_DIRT_RECOGNITION", {"0_NORMAL": "normal", "1_DIRT": "dirt"}),
    ):
        root = samples / folder
        items = [(u, sub) for sub in storage.list_subfolders(str(root)) for u in storage.list_files(str(root / sub))]
        frames.append(ds.scan_rows(task, items, mapping, inspect))
    raw = pd.concat(frames, ignore_index=True)
    assert raw["error"].isna().all() and len(raw) == 20
    data = ds.concatenate(raw, VOCAB, val_fraction=0.2, test_fraction=0.2)
    assert sorted(data["label"].unique()) == ["defect", "dirt", "normal"]
    assert (data["label"] == "normal").sum() == 10  # both tasks' 0_NORMAL photos, one class
    assert cache.misses == 20
    assert set(data["split"]) <= set(ds.SPLITS)
    # adding the same photos again (another task) changes nothing about their splits
    again = ds.concatenate(pd.concat([raw, raw.assign(task="copy")]), VOCAB, val_fraction=0.2, test_fraction=0.2)
    pd.testing.assert_series_equal(again.set_index("sha256")["split"], data.set_index("sha256")["split"])


@pytest.mark.parametrize("bad", [0.0])
def test_split_with_zero_fractions_is_all_train(bad):
    assert ds.split_for("f" * 64, bad, bad) == "train"
