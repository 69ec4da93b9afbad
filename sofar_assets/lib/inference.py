"""Streaming batch inference: top-2 labels and an OOD verdict per image, one frame per batch.

Images are read and decoded in DataLoader workers through the shared preprocess
(:func:`images.load_image_array`), so serving sees the same pixels as training. A bad image never
stops the run: its row carries an ``error`` and empty predictions. Memory stays bounded by
``batch_size * (num_workers * 2 + 1)`` decoded images whatever the number of items, because
nothing is materialized beyond the DataLoader's prefetch and the caller consumes one frame at a
time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from sofar_assets.lib import ood, storage
from sofar_assets.lib.devices import resolve_device
from sofar_assets.lib.images import ImageDecodeError, load_image_array

PREDICTION_COLUMNS = (
    "image_id",
    "image_uri",
    "top1_label",
    "top1_prob",
    "top2_label",
    "top2_prob",
    "ood_score",
    "is_ood",
    "error",
)


class _Items(torch.utils.data.Dataset):
    """Item i -> (i, uint8 (S, S, 3) array or None, error message or None); never raises per image."""

    def __init__(self, uris: list[str], size: int, read_bytes: Callable[[str], bytes], max_bytes: int):
        self.uris = uris
        self.size = size
        self.read_bytes = read_bytes
        self.max_bytes = max_bytes

    def __len__(self) -> int:
        return len(self.uris)

    def _too_large(self, n: int) -> str:
        return f"too large: {n} bytes > max_bytes={self.max_bytes}"

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str | None]:
        uri = self.uris[i]
        try:
            if self.read_bytes is storage.read_bytes and not storage.is_gcs(uri):
                # refuse a huge local file before reading it into memory
                try:
                    n = os.path.getsize(uri)
                except OSError:
                    n = 0  # let read_bytes report the precise reason
                if n > self.max_bytes:
                    return i, None, self._too_large(n)
            data = self.read_bytes(uri)
            if len(data) > self.max_bytes:
                return i, None, self._too_large(len(data))
            return i, load_image_array(data, uri, self.size), None
        except (storage.ImageReadError, ImageDecodeError) as exc:
            return i, None, f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # an unexpected decoder failure is still one bad image
            return i, None, f"{type(exc).__name__}: {uri}: {exc}"


def _collate(samples):
    index = [s[0] for s in samples]
    good = [k for k, s in enumerate(samples) if s[1] is not None]
    # (k, S, S, 3) uint8; permuted to NCHW later, which is channels_last in memory for free
    x = torch.from_numpy(np.stack([samples[k][1] for k in good])) if good else None
    return index, good, x, [s[2] for s in samples]


def _frame(ids, uris, errors, good, probs, scores, threshold, classes) -> pd.DataFrame:
    n = len(ids)
    top1_label = np.full(n, None, dtype=object)
    top2_label = np.full(n, None, dtype=object)
    top1_prob = np.full(n, np.nan)
    top2_prob = np.full(n, np.nan)
    ood_score = np.full(n, np.nan)
    is_ood = np.zeros(n, dtype=bool)  # an error row is not an OOD verdict; its error says why
    if good:
        rows = np.asarray(good)
        names = np.asarray(classes, dtype=object)
        order = np.argsort(-probs, axis=1, kind="stable")  # ties: the lower class index first
        top1_label[rows] = names[order[:, 0]]
        top1_prob[rows] = probs[np.arange(len(rows)), order[:, 0]]
        if probs.shape[1] > 1:
            top2_label[rows] = names[order[:, 1]]
            top2_prob[rows] = probs[np.arange(len(rows)), order[:, 1]]
        ood_score[rows] = scores
        is_ood[rows] = scores < threshold
    return pd.DataFrame(
        {
            "image_id": ids,
            "image_uri": uris,
            "top1_label": top1_label,
            "top1_prob": top1_prob,
            "top2_label": top2_label,
            "top2_prob": top2_prob,
            "ood_score": ood_score,
            "is_ood": is_ood,
            "error": np.asarray(errors, dtype=object),
        },
        columns=list(PREDICTION_COLUMNS),
    )


def predict_images(
    model: torch.nn.Module,
    items: Sequence[tuple[str, str]],
    *,
    classes: list[str],
    image_size: int,
    threshold: float,
    score_method: str = "max_logit",
    temperature: float = 1.0,
    batch_size: int = 32,
    num_workers: int = 2,
    device: str | torch.device = "auto",
    read_bytes: Callable[[str], bytes] = storage.read_bytes,
    max_bytes: int = 50_000_000,
    log: Callable[[str], None] | None = None,
    log_every: int = 20,
) -> Iterator[pd.DataFrame]:
    """Yield one frame per batch of ``items`` ((image_id, image_uri) pairs), in input order.

    Columns are :data:`PREDICTION_COLUMNS`. Probabilities are ``softmax(logits / temperature)``;
    ``ood_score = ood.scores(logits, score_method, temperature)`` and ``is_ood = ood_score <
    threshold``. A row whose image could not be read or decoded has ``error`` set ("ImageReadError:
    ...", "ImageDecodeError: ...", "too large: ...") with empty labels, NaN numbers and
    ``is_ood=False``. The model is put in eval mode and moved to ``device``. ``log`` receives a
    progress line every ``log_every`` batches and at the end.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if score_method not in ood.METHODS:
        raise ValueError(f"unknown OOD score method {score_method!r}; valid: {', '.join(ood.METHODS)}")
    items = list(items)
    ids = [str(i) for i, _ in items]
    uris = [str(u) for _, u in items]
    total = len(items)
    if total == 0:
        return
    dev = resolve_device(device)
    model.eval()
    model.to(dev, memory_format=torch.channels_last)
    loader = torch.utils.data.DataLoader(
        _Items(uris, int(image_size), read_bytes, int(max_bytes)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=dev.type == "cuda",
        prefetch_factor=2 if num_workers > 0 else None,
    )
    t0 = time.perf_counter()
    done = errors = 0
    for b, (index, good, x, errs) in enumerate(loader, start=1):
        probs = scores = None
        if good:
            with torch.inference_mode():
                x = x.to(dev, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
                logits = model(x).float().cpu().numpy()
            if logits.shape != (len(good), len(classes)):
                raise ValueError(
                    f"model returned logits of shape {logits.shape} for {len(good)} images, "
                    f"but there are {len(classes)} classes"
                )
            probs = ood.softmax(logits, temperature)
            scores = ood.scores(logits, score_method, temperature)
        yield _frame(
            [ids[i] for i in index], [uris[i] for i in index], errs, good, probs, scores, threshold, classes
        )
        done += len(index)
        errors += len(index) - len(good)
        if log is not None and (b % log_every == 0 or done == total):
            elapsed = time.perf_counter() - t0
            rate = done / elapsed if elapsed > 0 else float("inf")
            eta = (total - done) / rate if rate > 0 else float("inf")
            log(
                f"predicted {done}/{total} images ({100 * done / total:.0f}%), {rate:.1f} images/s, "
                f"ETA {eta:.0f} s, {errors} errors"
            )


def predict_frame(model: torch.nn.Module, items: Sequence[tuple[str, str]], **kwargs) -> pd.DataFrame:
    """All of :func:`predict_images` in one frame (an empty frame with the columns for no items)."""
    frames = list(predict_images(model, items, **kwargs))
    if not frames:
        return _frame([], [], [], [], None, None, 0.0, [])
    return pd.concat(frames, ignore_index=True)
