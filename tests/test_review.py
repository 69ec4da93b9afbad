"""A day's review: which rows are picked, and the contact sheet drawn from the real photos."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sofar_assets.lib.common import links
from sofar_assets.lib.data import storage
from sofar_assets.lib.data.images import decode_image
from sofar_assets.lib.model.plots import _fit_thumb
from sofar_assets.lib.review.queue import LEAST_CONFIDENT, OOD, review_sheet_png, rows_text, select_for_review


def _rows(uris: list[str]) -> pd.DataFrame:
    n = len(uris)
    rng = np.random.default_rng(0)
    return pd.DataFrame({
        "image_id": [f"id{i}" for i in range(n)], "image_uri": uris,
        "top1_label": ["dirt"] * n, "top1_prob": rng.uniform(0.5, 1.0, n),
        "top2_label": ["normal"] * n, "top2_prob": rng.uniform(0.0, 0.4, n),
        "ood_score": rng.uniform(-2, 8, n), "is_ood": [i % 4 == 0 for i in range(n)], "error": [None] * n,
    })


def test_selection_ood_first_then_least_confident_without_error_rows():
    rows = _rows([f"/x/{i}.jpg" for i in range(20)])
    rows.loc[3, ["error", "top1_prob"]] = ["unreadable", np.nan]  # an error row is never review material
    picked = select_for_review(rows, max_ood=3, least_confident=4)
    flagged = rows[rows["is_ood"]].sort_values("ood_score")
    assert list(picked["reason"]) == [OOD] * 3 + [LEAST_CONFIDENT] * 4
    assert list(picked["image_uri"][:3]) == list(flagged["image_uri"][:3])  # lowest OOD score first
    unsure = rows[~rows["is_ood"] & rows["error"].isna()].sort_values("top1_prob")
    assert list(picked["image_uri"][3:]) == list(unsure["image_uri"][:4])
    assert "/x/3.jpg" not in set(picked["image_uri"])
    only = select_for_review(rows, ood_only=True)
    assert set(only["reason"]) == {OOD} and len(only) == int(rows["is_ood"].sum())


def test_selection_names_missing_columns():
    with pytest.raises(ValueError, match="ood_score"):
        select_for_review(pd.DataFrame({"image_uri": [], "top1_label": [], "top1_prob": [], "is_ood": []}))


def test_sheet_draws_real_photos_and_marks_unreadable_ones(samples):
    uris = [str(p) for p in sorted((samples / "CAR_DIRT_RECOGNITION").rglob("*.jpg"))][:7]
    uris.append(str(samples / "gone.jpg"))  # deleted since it was scored
    picked = select_for_review(_rows(uris), least_confident=10)
    png = review_sheet_png(picked, storage.read_bytes, title="2026-11-01")
    sheet = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert png.startswith(b"\x89PNG")
    assert sheet.shape[0] > 2 * 128 and sheet.shape[1] >= 6 * 128  # two sections, six columns
    # the first cell (below the title and the first section's heading) holds the first row's photo
    def thumb(uri):
        return np.asarray(_fit_thumb(np.asarray(decode_image(storage.read_bytes(uri), uri, target_size=128)), 128),
                          dtype=float)

    cell = sheet[44:44 + 128, 6:6 + 128].astype(float)
    first, other = picked["image_uri"].iloc[0], picked["image_uri"].iloc[1]
    assert np.abs(cell - thumb(first)).mean() < 12 < np.abs(cell - thumb(other)).mean()
    empty = review_sheet_png(picked.iloc[:0], storage.read_bytes)
    assert Image.open(io.BytesIO(empty)).size[1] < sheet.shape[0]
    text = rows_text(picked)
    assert "id7" in text and "least_confident" in text  # the deleted photo is still listed


def test_links_are_built_from_the_configured_bases():
    assert links.mlflow_run_url("http://m:5000/", "3", "abc") == "http://m:5000/#/experiments/3/runs/abc"
    assert links.mlflow_version_url("http://m:5000", "sofar classifier", 7) == \
        "http://m:5000/#/models/sofar%20classifier/versions/7"
    assert links.dagster_run_url("http://d:3000", "r-1") == "http://d:3000/runs/r-1"
    assert links.dagster_asset_url("http://d:3000", "raw_labels/dirt") == "http://d:3000/assets/raw_labels/dirt"
