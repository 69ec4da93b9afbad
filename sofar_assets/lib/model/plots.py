"""Small PNG figures for asset metadata (confusion matrix, ROC, reliability, samples, curves).

Figures are built as bare ``matplotlib.figure.Figure`` objects on an Agg canvas, never via
``pyplot``, so nothing accumulates in pyplot's global figure registry inside a long-running
Dagster process and no GUI backend is touched. Images are kept small (``DPI`` 80) because
they travel inline as base64 in ``MetadataValue.md``.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont, ImageOps

DPI = 80


def _render(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    finally:
        fig.clear()
    return buf.getvalue()


def png_to_markdown(png_bytes: bytes, alt: str) -> str:
    """Markdown image with the PNG inlined as a data URI (renders in the Dagster UI)."""
    if not png_bytes.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError("png_to_markdown expects PNG bytes")
    safe_alt = alt.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]")
    return f"![{safe_alt}](data:image/png;base64,{base64.b64encode(png_bytes).decode('ascii')})"


def confusion_matrix_png(cm, classes: Sequence[str], normalize: bool = False) -> bytes:
    """Heat map of a confusion matrix (rows = true, columns = predicted), counts annotated.

    ``normalize=True`` colours by row share (recall per true class) and prints percentages.
    """
    m = np.asarray(cm, dtype=np.float64)
    n = len(classes)
    if m.shape != (n, n):
        raise ValueError(f"cm has shape {m.shape} but {n} class names were given")
    if normalize:
        rows = m.sum(axis=1, keepdims=True)
        shown = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    else:
        shown = m
    side = max(3.0, 0.55 * n + 1.5)
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.add_subplot()
    im = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=max(float(shown.max()), 1e-12))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), labels=list(classes), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels=list(classes), fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        cut = shown.max() / 2.0
        for i in range(n):
            for j in range(n):
                text = f"{shown[i, j]:.0%}" if normalize else f"{int(m[i, j])}"
                colour = "white" if shown[i, j] > cut else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color=colour)
    return _render(fig)


def roc_png(curves: Mapping[str, tuple], title: str = "ROC (positives = in-distribution)") -> bytes:
    """ROC curves, one per entry ``name -> (fpr, tpr, auroc)``, with the chance diagonal."""
    fig = Figure(figsize=(4.5, 4.0))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
    for name, (fpr, tpr, area) in curves.items():
        ax.plot(np.asarray(fpr), np.asarray(tpr), linewidth=1.5, label=f"{name} (AUROC {area:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=10)
    if curves:
        ax.legend(loc="lower right", fontsize=8)
    return _render(fig)


def reliability_png(bins: Mapping[str, np.ndarray], title: str = "Reliability") -> bytes:
    """Reliability diagram from ``metrics.reliability_bins``: accuracy per confidence bin."""
    edges = np.asarray(bins["edges"], dtype=np.float64)
    acc = np.asarray(bins["accuracy"], dtype=np.float64)
    conf = np.asarray(bins["confidence"], dtype=np.float64)
    counts = np.asarray(bins["counts"])
    widths = np.diff(edges)
    filled = counts > 0
    fig = Figure(figsize=(4.5, 4.0))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.5", linestyle="--", linewidth=1, label="perfect calibration")
    ax.bar(edges[:-1][filled], acc[filled], width=widths[filled], align="edge",
           edgecolor="black", linewidth=0.5, color="tab:blue", label="accuracy")
    ax.bar(edges[:-1][filled], (conf - acc)[filled], bottom=acc[filled], width=widths[filled],
           align="edge", color="tab:red", alpha=0.3, label="gap to confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"confidence (n = {int(counts.sum())})")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    return _render(fig)


def _fit_thumb(img: np.ndarray, thumb: int) -> Image.Image:
    arr = np.asarray(img)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"images must be uint8 HxWx3, got {arr.dtype} {arr.shape}")
    pil = ImageOps.contain(Image.fromarray(arr), (thumb, thumb), Image.Resampling.BILINEAR)
    cell = Image.new("RGB", (thumb, thumb), (255, 255, 255))
    cell.paste(pil, ((thumb - pil.width) // 2, (thumb - pil.height) // 2))
    return cell


def contact_sheet_png(images: Mapping[str, Sequence[np.ndarray]], thumb: int = 96,
                      label_width: int = 160, pad: int = 4) -> bytes:
    """Grid of thumbnails, one row per label with the label name at the left.

    Each image is scaled to fit ``thumb x thumb`` keeping its aspect ratio. Drawn with PIL
    rather than matplotlib: it is a plain pixel grid and PIL is much faster for it.
    """
    if not images:
        raise ValueError("contact_sheet_png needs at least one label")
    cols = max(1, max(len(v) for v in images.values()))
    width = label_width + cols * (thumb + pad) + pad
    height = len(images) * (thumb + pad) + pad
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=12)
    for r, (label, row) in enumerate(images.items()):
        y = pad + r * (thumb + pad)
        text = str(label)
        while text and draw.textlength(text, font=font) > label_width - 2 * pad:
            text = text[:-1]
        if text != str(label):
            text = text[:-1] + "…"
        draw.text((pad, y + thumb // 2), text, fill=(0, 0, 0), font=font, anchor="lm")
        for c, img in enumerate(row):
            sheet.paste(_fit_thumb(img, thumb), (label_width + pad + c * (thumb + pad), y))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def training_curves_png(history: Sequence[Mapping[str, float]], keys: Sequence[str]) -> bytes:
    """One small panel per key, x = ``row["epoch"]`` when present else the row index.

    Rows missing a key (or holding None/NaN for it) are skipped for that panel.
    """
    if not keys:
        raise ValueError("training_curves_png needs at least one key")
    fig = Figure(figsize=(3.2 * len(keys), 2.8))
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys, strict=True):
        xs, ys = [], []
        for i, row in enumerate(history):
            v = row.get(key)
            if v is None or not np.isfinite(float(v)):
                continue
            xs.append(row.get("epoch", i))
            ys.append(float(v))
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.5)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _render(fig)


def tradeoff_png(systems: Sequence[Mapping], tasks: Sequence[str], ood_sets: Sequence[str]) -> bytes:
    """The trade-off report side by side: per-task accuracy, OOD AUROC per set, s / 1k images.

    ``systems`` are the report's system entries (``tasks[t]["accuracy"]``, ``ood_auroc[set]``,
    ``s_per_1k_images``); a missing value (None) draws no bar.
    """
    panels = [("accuracy per task", list(tasks), lambda s, k: s["tasks"][k]["accuracy"], (0, 1.05))]
    if ood_sets:
        panels.append(("OOD AUROC per set", list(ood_sets), lambda s, k: s["ood_auroc"][k], (0, 1.05)))
    panels.append(("s / 1k images", ["prediction"], lambda s, k: s["s_per_1k_images"], None))
    fig = Figure(figsize=(3.6 * len(panels), 3.2))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    width = 0.8 / max(len(systems), 1)
    for ax, (title, keys, value, ylim) in zip(axes, panels, strict=True):
        x = np.arange(len(keys))
        for j, s in enumerate(systems):
            vals = [value(s, k) for k in keys]
            ys = [np.nan if v is None else float(v) for v in vals]
            ax.bar(x + (j - (len(systems) - 1) / 2) * width, ys, width, label=s["system"])
        ax.set_xticks(x, labels=keys, fontsize=8, rotation=20 if len(keys) > 3 else 0)
        ax.set_title(title, fontsize=10)
        if ylim:
            ax.set_ylim(*ylim)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    handles, labels = axes[0].get_legend_handles_labels()
    # below the panels, so no bar is hidden (bbox_inches="tight" keeps it in the PNG)
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=max(len(systems), 1), fontsize=8)
    return _render(fig)
