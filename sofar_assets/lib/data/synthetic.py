"""Deterministic SYNTHETIC demo data in the paper's layouts (no real photos, no download).

Draws simple car-inspection-like scenes so that a classifier can learn them in seconds on a
CPU: a car body with wheels (``normal``), the same with scratches and dents (``defect``), with
mud speckles (``dirt``), under foam bubbles (``bubble_wash``), between wash-machine brushes
(``wash_machine``), and interior shots (``dashboard``, ``seat``). Irrelevant images are
document-like pages and receipts. Everything is written as JPEG/PNG files in ImageFolder
layout plus one folder per upload day, and a ``SYNTHETIC.md`` that says what it is.
"""

from __future__ import annotations

import datetime as dt
import io
import random
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SIZE = 256

# task -> {source folder -> canonical label}, the demo's task-centric datasets
DEMO_TASKS: dict[str, dict[str, str]] = {
    "defect": {"0_NORMAL": "normal", "1_DEFECT": "defect"},
    "dirt": {"0_NORMAL": "normal", "1_DIRT": "dirt"},
    "wash": {"0_BUBBLE": "bubble_wash", "1_MACHINE": "wash_machine"},
    "interior": {"0_DASHBOARD": "dashboard", "1_SEAT": "seat"},
}


def _sky(rng: random.Random) -> Image.Image:
    top = tuple(rng.randint(150, 220) for _ in range(3))
    img = Image.new("RGB", (SIZE, SIZE), top)
    d = ImageDraw.Draw(img)
    ground = tuple(rng.randint(60, 110) for _ in range(3))
    d.rectangle([0, int(SIZE * 0.72), SIZE, SIZE], fill=ground)
    return img


def _car(img: Image.Image, rng: random.Random) -> tuple[int, int, int, int]:
    d = ImageDraw.Draw(img)
    colour = tuple(rng.randint(30, 230) for _ in range(3))
    x0 = rng.randint(20, 50)
    x1 = SIZE - rng.randint(20, 50)
    y0 = rng.randint(110, 130)
    y1 = y0 + rng.randint(55, 70)
    d.rounded_rectangle([x0, y0, x1, y1], radius=14, fill=colour)
    cab = [x0 + (x1 - x0) // 4, y0 - rng.randint(35, 45), x1 - (x1 - x0) // 4, y0 + 5]
    d.rounded_rectangle(cab, radius=12, fill=colour)
    d.rectangle([cab[0] + 8, cab[1] + 8, cab[2] - 8, y0 - 2], fill=(170, 200, 230))
    for cx in (x0 + 35, x1 - 35):
        d.ellipse([cx - 20, y1 - 20, cx + 20, y1 + 20], fill=(20, 20, 20))
        d.ellipse([cx - 8, y1 - 8, cx + 8, y1 + 8], fill=(160, 160, 160))
    return x0, y0, x1, y1


def normal(rng: random.Random) -> Image.Image:
    img = _sky(rng)
    _car(img, rng)
    return img


def defect(rng: random.Random) -> Image.Image:
    img = _sky(rng)
    x0, y0, x1, y1 = _car(img, rng)
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(3, 6)):  # scratches: bright jagged lines across the body
        pts = [(rng.randint(x0, x1), rng.randint(y0, y1))]
        for _ in range(4):
            pts.append((pts[-1][0] + rng.randint(-25, 25), pts[-1][1] + rng.randint(-10, 10)))
        d.line(pts, fill=(245, 245, 245), width=3)
    cx, cy = rng.randint(x0 + 20, x1 - 20), rng.randint(y0 + 10, y1 - 10)
    d.ellipse([cx - 18, cy - 12, cx + 18, cy + 12], outline=(0, 0, 0), width=4)  # dent
    return img


def dirt(rng: random.Random) -> Image.Image:
    img = _sky(rng)
    x0, y0, x1, y1 = _car(img, rng)
    _mud(img, rng, (x0, y0 - 30, x1, y1 + 15))
    return img


def _mud(img: Image.Image, rng: random.Random, box: tuple[int, int, int, int]) -> None:
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(140, 220)):
        x, y = rng.randint(box[0], box[2]), rng.randint(box[1], box[3])
        r = rng.randint(2, 6)
        d.ellipse([x - r, y - r, x + r, y + r], fill=(rng.randint(90, 120), rng.randint(60, 80), 30))


def dirty_and_damaged(rng: random.Random) -> Image.Image:
    """The paper's multi-labelable case: one photo that is both dirty and damaged."""
    img = defect(rng)
    _mud(img, rng, (30, 90, SIZE - 30, 200))
    return img


def bubble_wash(rng: random.Random) -> Image.Image:
    img = normal(rng)
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(60, 90)):
        x, y, r = rng.randint(0, SIZE), rng.randint(60, SIZE), rng.randint(6, 18)
        d.ellipse([x - r, y - r, x + r, y + r], fill=(250, 250, 255), outline=(200, 210, 230))
    return img


def wash_machine(rng: random.Random) -> Image.Image:
    img = normal(rng)
    d = ImageDraw.Draw(img)
    hue = rng.choice([(30, 80, 220), (220, 40, 40), (40, 160, 60)])
    for x in range(rng.randint(0, 12), SIZE, 24):  # rotating brushes: dense vertical stripes
        d.rectangle([x, 0, x + 10, SIZE], fill=hue)
    d.rectangle([0, 0, SIZE, 18], fill=(90, 90, 90))
    return img


def dashboard(rng: random.Random) -> Image.Image:
    base = rng.randint(25, 55)
    img = Image.new("RGB", (SIZE, SIZE), (base, base, base + 5))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 0, SIZE, 70], fill=(150, 185, 215))  # windscreen
    for cx in (rng.randint(60, 90), rng.randint(160, 200)):
        cy = rng.randint(130, 160)
        d.ellipse([cx - 34, cy - 34, cx + 34, cy + 34], fill=(10, 10, 10), outline=(230, 230, 230), width=3)
        d.line([cx, cy, cx + rng.randint(-25, 25), cy - 25], fill=(250, 80, 20), width=3)
    d.arc([40, 170, 216, 330], 200, 340, fill=(10, 10, 10), width=14)  # steering wheel
    return img


def seat(rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), tuple(rng.randint(120, 170) for _ in range(3)))
    d = ImageDraw.Draw(img)
    fabric = tuple(rng.randint(20, 90) for _ in range(3))
    d.rounded_rectangle([70, 20, 186, 150], radius=30, fill=fabric)  # backrest
    d.rounded_rectangle([50, 140, 206, 220], radius=20, fill=fabric)  # cushion
    d.rounded_rectangle([100, 0, 156, 28], radius=10, fill=fabric)  # headrest
    for y in range(40, 140, 18):
        d.line([80, y, 176, y], fill=tuple(min(255, c + 40) for c in fabric), width=2)
    return img


def document(rng: random.Random) -> Image.Image:
    """An irrelevant upload: a printed page (out of distribution for every task)."""
    img = Image.new("RGB", (SIZE, SIZE), (rng.randint(235, 255),) * 3)
    d = ImageDraw.Draw(img)
    y = rng.randint(12, 24)
    while y < SIZE - 12:
        words = " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))
                         for _ in range(6))
        d.text((rng.randint(8, 16), y), words, fill=(20, 20, 20))
        y += rng.randint(12, 16)
    return img


def receipt(rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), (rng.randint(70, 110),) * 3)
    d = ImageDraw.Draw(img)
    d.rectangle([70, 0, 186, SIZE], fill=(248, 248, 240))
    for y in range(10, SIZE - 10, 11):
        d.text((76, y), f"{rng.randint(1, 99):>2} x ITEM {rng.randint(100, 999)}", fill=(30, 30, 30))
    return img


GENERATORS: dict[str, Callable[[random.Random], Image.Image]] = {
    "normal": normal,
    "defect": defect,
    "dirt": dirt,
    "bubble_wash": bubble_wash,
    "wash_machine": wash_machine,
    "dashboard": dashboard,
    "seat": seat,
}


def _encode(img: Image.Image, rng: random.Random, fmt: str = "JPEG") -> bytes:
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.8)))
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=90) if fmt == "JPEG" else img.save(buf, format=fmt)
    return buf.getvalue()


def generate_demo_data(
    out: str | Path,
    *,
    per_class: int = 40,
    days: tuple[dt.date, ...] = (dt.date(2026, 11, 1), dt.date(2026, 11, 2), dt.date(2026, 11, 3)),
    per_day: int = 14,
    multilabel: int = 3,
    ood_per_set: int = 12,
    corrupt_upload_on: dt.date | None = dt.date(2026, 11, 2),
    seed: int = 0,
) -> dict[str, int]:
    """Write the synthetic demo tree under ``out``; same seed, same bytes. Returns file counts.

    Layout::

        tasks/<task>/<SOURCE_FOLDER>/<n>.jpg        # one ImageFolder tree per task
        uploads/<YYYY-MM-DD>/<n>.jpg                # the photos uploaded each day
        ood/{documents,receipts}/<n>.png            # irrelevant images for calibration
        corrections.csv                             # inspectors' verdicts on a few uploads
    """
    out = Path(out)
    rng = random.Random(seed)
    counts = {"task_images": 0, "uploads": 0, "ood": 0}

    def write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    for task, folders in DEMO_TASKS.items():
        for source, label in folders.items():
            for i in range(per_class):
                # the shared 'normal' class gets different photos in each task, like the real data
                write(out / "tasks" / task / source / f"{task}_{label}_{i:03d}.jpg",
                      _encode(GENERATORS[label](rng), rng))
                counts["task_images"] += 1
    for i in range(multilabel):
        # the same bytes in two tasks under two labels: kept once, marked multi-label
        data = _encode(dirty_and_damaged(rng), rng)
        write(out / "tasks" / "defect" / "1_DEFECT" / f"dirty_damaged_{i}.jpg", data)
        write(out / "tasks" / "dirt" / "1_DIRT" / f"dirty_damaged_{i}.jpg", data)
        counts["task_images"] += 2

    labels = list(GENERATORS)
    for day in days:
        folder = out / "uploads" / day.isoformat()
        for i in range(per_day):
            if i == per_day - 1:
                img, fmt = document(rng), "PNG"  # every day someone uploads a page by mistake
            else:
                img, fmt = GENERATORS[labels[i % len(labels)]](rng), "JPEG"
            write(folder / f"{day:%Y%m%d}_{i:03d}.{'png' if fmt == 'PNG' else 'jpg'}", _encode(img, rng, fmt))
            counts["uploads"] += 1
        if day == corrupt_upload_on:
            write(folder / f"{day:%Y%m%d}_truncated.jpg", _encode(normal(rng), rng)[:700])
            counts["uploads"] += 1
    for name, gen in (("documents", document), ("receipts", receipt)):
        for i in range(ood_per_set):
            write(out / "ood" / name / f"{name}_{i:03d}.png", _encode(gen(rng), rng, "PNG"))
            counts["ood"] += 1
    demo_corrections(out, days=days, per_day=per_day)
    (out / "SYNTHETIC.md").write_text(
        "# SYNTHETIC demo data\n\nGenerated by `sofar_assets.lib.data.synthetic.generate_demo_data` "
        f"(seed {seed}). Drawn shapes, not photos: for demos and tests only.\n"
    )
    return counts


def demo_corrections(
    out: str | Path,
    *,
    days: tuple[dt.date, ...] = (dt.date(2026, 11, 1), dt.date(2026, 11, 2), dt.date(2026, 11, 3)),
    per_day: int = 14,
    per_day_judged: int = 3,
) -> Path:
    """``out/corrections.csv``: what an inspector would say about a few uploads of each day (the
    drawn class, and ``irrelevant`` for the day's page), for ``sofar correct --csv``. The verdicts
    follow the same upload names as :func:`generate_demo_data`; the model may agree or not."""
    labels = list(GENERATORS)
    lines = ["image_id,label,inspector,corrected_at"]
    for n, day in enumerate(days):
        at = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(9, 0))
        picked = [(n * per_day_judged + k) % (per_day - 1) for k in range(per_day_judged)]
        for k, i in enumerate([*picked, per_day - 1]):
            label = "irrelevant" if i == per_day - 1 else labels[i % len(labels)]
            ext = "png" if i == per_day - 1 else "jpg"
            who = ("kim", "lee")[k % 2]
            lines.append(f"{day.isoformat()}/{day:%Y%m%d}_{i:03d}.{ext},{label},{who},"
                         f"{(at + dt.timedelta(minutes=7 * k)).isoformat()}Z")
    path = Path(out) / "corrections.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
