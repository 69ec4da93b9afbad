import base64
import io

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from sofar_assets.lib.model import plots
from sofar_assets.lib.model.metrics import confusion_matrix, reliability_bins
from sofar_assets.lib.model.ood import auroc, roc_curve, softmax

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _decode(png: bytes) -> Image.Image:
    assert png.startswith(PNG_MAGIC)
    img = Image.open(io.BytesIO(png))
    img.load()
    return img.convert("RGB")


def _assert_real_figure(png: bytes) -> Image.Image:
    img = _decode(png)
    assert 3_000 < len(png) < 200_000
    assert img.width > 150 and img.height > 150
    # a drawn figure has many colours, a blank canvas has one
    assert len(img.getcolors(maxcolors=1_000_000)) > 20
    return img


def test_confusion_matrix_png():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 500)
    pred = np.where(rng.random(500) < 0.7, y, rng.integers(0, 10, 500))
    cm = confusion_matrix(y, pred, 10)
    classes = [f"TASK_{i // 2}/{i % 2}_LABEL" for i in range(10)]
    _assert_real_figure(plots.confusion_matrix_png(cm, classes))
    _assert_real_figure(plots.confusion_matrix_png(cm, classes, normalize=True))
    with pytest.raises(ValueError, match="class names"):
        plots.confusion_matrix_png(cm, classes[:3])


def test_roc_png():
    rng = np.random.default_rng(1)
    pos, neg = rng.normal(1, 1, 200), rng.normal(0, 1, 100)
    fpr, tpr = roc_curve(pos, neg)
    _assert_real_figure(plots.roc_png({"max_logit": (fpr, tpr, auroc(pos, neg))}))


def test_reliability_png():
    rng = np.random.default_rng(2)
    probs = softmax(rng.normal(size=(300, 4)) * 3)
    bins = reliability_bins(probs, rng.integers(0, 4, 300))
    _assert_real_figure(plots.reliability_png(bins))


def test_training_curves_png_skips_missing_values():
    history = [{"epoch": i, "loss": 1 / (i + 1), "val_macro_f1": i / 10} for i in range(8)]
    history[3]["val_macro_f1"] = float("nan")
    del history[5]["loss"]
    _assert_real_figure(plots.training_curves_png(history, ["loss", "val_macro_f1"]))


def test_contact_sheet_layout_and_pixels():
    red = np.zeros((120, 60, 3), np.uint8)
    red[..., 0] = 255
    blue = np.zeros((30, 30, 3), np.uint8)
    blue[..., 2] = 255
    png = plots.contact_sheet_png({"CAR_DIRT/1_DIRT": [red, red, red], "receipt": [blue]}, thumb=96)
    img = _decode(png)
    # width = label 160 + 3 columns * (96 + 4) + 4 pad; height = 2 rows * (96 + 4) + 4
    assert img.size == (160 + 3 * 100 + 4, 2 * 100 + 4)
    # cell (row 0, col 2) starts at x = 160 + 4 + 2*100, y = 4; its centre is red
    assert img.getpixel((164 + 200 + 48, 4 + 48)) == (255, 0, 0)
    # the 30x30 blue image is scaled up to fill the 96x96 cell of row 1, col 0
    assert img.getpixel((164 + 5, 104 + 5)) == (0, 0, 255)
    # row 1 has one image: its col 1 stays white
    assert img.getpixel((264 + 48, 104 + 48)) == (255, 255, 255)
    # label text is drawn in the left margin of each row
    left = np.asarray(img.crop((0, 4, 160, 100)))
    assert (left.sum(axis=2) < 300).sum() > 20
    with pytest.raises(ValueError, match="uint8"):
        plots.contact_sheet_png({"x": [np.zeros((8, 8), np.float32)]})


def test_png_to_markdown_round_trips_and_escapes():
    png = plots.roc_png({})
    md = plots.png_to_markdown(png, "ROC [val]")
    prefix = "![ROC \\[val\\]](data:image/png;base64,"
    assert md.startswith(prefix) and md.endswith(")")
    assert base64.b64decode(md[len(prefix):-1]) == png
    with pytest.raises(ValueError, match="PNG"):
        plots.png_to_markdown(b"GIF89a", "x")


def test_no_pyplot_figures_leak():
    before = plt.get_fignums()
    plots.roc_png({})
    plots.training_curves_png([{"loss": 1.0}], ["loss"])
    assert plt.get_fignums() == before
