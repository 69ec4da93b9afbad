"""Streaming batch inference: top-2 labels and an OOD verdict per image, one frame per batch.

Items arrive as an ITERATOR (a day folder listed as a stream, a table paged): the main process
cuts it into batches lazily, and DataLoader workers read each batch's images with
``reads_in_flight`` concurrent reads (threads: a read waits on the network with the GIL
released), then decode them through the shared preprocess (:func:`images.load_image_array`), so
serving sees the same pixels as training. A bad image never stops the run: its row carries an
``error`` and empty predictions; an item that arrives with an ``error`` already (an upload that
was refused before any read) becomes its error row without being read. Memory stays bounded by
``batch_size * (num_workers * 2 + 1)`` decoded images whatever the number of items: nothing is
materialized beyond the DataLoader's prefetch and the caller consumes one frame at a time.
"""

from __future__ import annotations

import collections
import datetime as dt
import inspect
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from sofar_assets.lib.data import storage
from sofar_assets.lib.data.images import ImageDecodeError, load_image_array
from sofar_assets.lib.data.uploads import safe_text
from sofar_assets.lib.model.conformal import LabelSets
from sofar_assets.lib.serving.predictor import Predictor, Scoring, frame, make_runner  # noqa: F401
from sofar_assets.lib.warehouse.predictions import PREDICTION_COLUMNS  # noqa: F401


class Item(NamedTuple):
    """One image to score: what to store (``image_id``, ``image_uri``), what to read (``path``,
    default the URI), when set, the ``error`` that becomes its row without any read, and the
    ``day`` it was uploaded on, which its row carries (``prediction_date``; None: no day)."""

    image_id: str
    image_uri: str
    error: str | None = None
    path: str | None = None
    day: dt.date | None = None


def as_item(x, day: dt.date | None = None) -> Item:
    """An :class:`Item` from an ``(image_id, image_uri[, error])`` tuple or an object with those
    attributes (``uploads.Upload``, whose ``path`` is what is read); ``day`` sets its day."""
    if isinstance(x, Item):
        return x if day is None else x._replace(day=day)
    if hasattr(x, "image_uri"):
        return Item(str(x.image_id), str(x.image_uri), getattr(x, "error", None), getattr(x, "path", None),
                    day if day is not None else getattr(x, "day", None))
    return Item(str(x[0]), str(x[1]), x[2] if len(x) > 2 else None, None, day)


def _batches(items: Iterable, batch_size: int) -> Iterator[list[Item]]:
    """``items`` cut into lists of ``batch_size``, lazily (the DataLoader's batch sampler)."""
    batch: list[Item] = []
    for x in items:
        batch.append(as_item(x))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _accepts_max_bytes(read_bytes: Callable) -> bool:
    try:
        params = inspect.signature(read_bytes).parameters
    except (TypeError, ValueError):
        return False
    return "max_bytes" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


class _Reads(torch.utils.data.Dataset):
    """A batch of :class:`Item` -> ``[(uint8 (S, S, 3) array or None, error or None)]``; each
    batch's images are read and decoded by up to ``reads_in_flight`` threads of the worker."""

    def __init__(self, size: int, read_bytes: Callable[..., bytes], max_bytes: int, reads_in_flight: int,
                 read_kwargs: dict | None = None):
        self.size = size
        self.read_bytes = read_bytes
        self.max_bytes = max_bytes
        self.reads_in_flight = reads_in_flight
        self.read_kwargs = dict(read_kwargs or {})
        self._bounded = _accepts_max_bytes(read_bytes)  # the reader stops at max_bytes + 1 bytes
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = -1

    def __getstate__(self):  # the pool is per process: a forked or forkserver worker makes its own
        return {k: v for k, v in self.__dict__.items() if k != "_pool"} | {"_pool": None, "_pool_pid": -1}

    def _load(self, item: Item) -> tuple[np.ndarray | None, str | None]:
        if item.error is not None:
            return None, item.error  # refused upstream: never read
        path, name = item.path or item.image_uri, item.image_uri  # read the real path, name the stored URI
        try:
            if self._bounded:  # storage.read_bytes: stops at max_bytes + 1 bytes, regular files only
                kwargs = {"max_bytes": self.max_bytes} | (
                    self.read_kwargs if self.read_bytes is storage.read_bytes else {})
                data = self.read_bytes(path, **kwargs)
            else:
                data = self.read_bytes(path)
            if len(data) > self.max_bytes:  # a reader that does not bound itself is checked after
                return None, f"ImageReadError: {name}: too large: {len(data)} bytes > max_bytes={self.max_bytes}"
            return load_image_array(data, name, self.size), None
        except storage.ImageReadError as exc:
            return None, safe_text(f"ImageReadError: {name}: {exc.reason}")
        except ImageDecodeError as exc:
            return None, safe_text(f"ImageDecodeError: {exc}")
        except Exception as exc:  # an unexpected reader or decoder failure is still one bad image
            return None, safe_text(f"{type(exc).__name__}: {name}: {exc}")

    def __getitem__(self, item: Item):
        return self._load(item)

    def __getitems__(self, batch: list[Item]):
        if self.reads_in_flight <= 1 or len(batch) <= 1:
            return [self._load(it) for it in batch]
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(self.reads_in_flight, thread_name_prefix="image-read")
            self._pool_pid = os.getpid()
        return list(self._pool.map(self._load, batch))


class _Collate:
    """Picklable collate: the batch's items ride along with the decoded arrays."""

    def __call__(self, loaded):
        good = [k for k, (arr, _) in enumerate(loaded) if arr is not None]
        # (k, S, S, 3) uint8; permuted to NCHW later, which is channels_last in memory for free
        x = torch.from_numpy(np.stack([loaded[k][0] for k in good])) if good else None
        return good, x, [err for _, err in loaded]


class _BatchSampler:
    """Feeds the DataLoader the batches of an item iterator, consumed lazily in the main process.
    It also remembers each batch's items, so workers never send ids and URIs back."""

    def __init__(self, items: Iterable, batch_size: int):
        self._it = _batches(items, batch_size)
        self.sent: collections.deque[list[Item]] = collections.deque()
        self._lock = threading.Lock()

    def __iter__(self):
        for batch in self._it:
            with self._lock:
                self.sent.append(batch)
            yield batch

    def pop(self) -> list[Item]:
        with self._lock:
            return self.sent.popleft()


_frame = frame  # the rows of one batch: lib/serving/predictor.py


def predict_images(
    model: torch.nn.Module,
    items: Iterable,
    *,
    classes: list[str],
    image_size: int,
    threshold: float,
    score_method: str = "max_logit",
    temperature: float = 1.0,
    label_sets: LabelSets | None = None,
    ood_stats: dict | None = None,
    knn_k: int = 1,
    batch_size: int = 32,
    num_workers: int = 2,
    device: str | torch.device = "auto",
    read_bytes: Callable[..., bytes] = storage.read_bytes,
    max_bytes: int = 50_000_000,
    reads_in_flight: int = 32,
    read_kwargs: dict | None = None,
    total: int | None = None,
    log: Callable[[str], None] | None = None,
    log_every: int = 10_000,
) -> Iterator[pd.DataFrame]:
    """Yield one frame per batch of ``items``, in input order.

    ``items`` is any iterable (consumed lazily, never listed) of ``(image_id, image_uri)`` or
    ``(image_id, image_uri, error)`` tuples or objects with those attributes; an item with an
    ``error`` becomes its error row without a read. Columns are :data:`PREDICTION_COLUMNS`: an
    item's row carries its ``day`` (an :class:`Item` field) as ``prediction_date``, None without one.
    Probabilities are ``softmax(logits / temperature)``; ``ood_score = ood.score(logits, features,
    score_method, temperature, ood_stats, knn_k=knn_k)`` and ``is_ood = ood_score < threshold``.
    A feature score (``knn``, ``mahalanobis``) takes the penultimate features from
    ``model.forward_features``, the pass the calibration scores with
    (``training.predict_logits_and_features``), and the package's ``ood_stats``; without the
    statistics it needs this raises before reading any image. ``label_set`` is the
    conformal set of ``label_sets`` (lib/model/conformal.py) over those probabilities: its labels by
    descending probability joined by "|" ("" for an empty set), ``label_set_size`` their count
    (both NULL without ``label_sets``). A row whose image could
    not be read or decoded has ``error`` set ("ImageReadError: <uri>: <reason>" (a reason is
    e.g. "file not found" or "too large: ..."), "ImageDecodeError: ...") with empty labels, NaN numbers and ``is_ood=False``.

    Each DataLoader worker reads up to ``reads_in_flight`` images of its batch at once with
    ``read_bytes(uri)`` (``storage.read_bytes`` also gets ``max_bytes`` and ``read_kwargs``, its
    timeout and retries). ``model`` is a torch network (put in eval mode and moved to ``device``)
    or a runner of lib/serving/predictor.py (``make_runner``: e.g. the package's ONNX export on ONNX
    Runtime); the scoring itself is :class:`~sofar_assets.lib.serving.predictor.Predictor`'s. ``log`` receives
    a progress line every ``log_every`` images and a final ``predicted N/N images`` line with the
    rate (``total``, when known, gives the percentage and the ETA on the way).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if reads_in_flight < 1:
        raise ValueError(f"reads_in_flight must be >= 1, got {reads_in_flight}")
    predictor = Predictor(make_runner(model, device=device), Scoring(
        classes, threshold, score_method, temperature, label_sets, ood_stats, knn_k))
    sampler = _BatchSampler(items, batch_size)
    dev = predictor.device
    loader = torch.utils.data.DataLoader(
        _Reads(int(image_size), read_bytes, int(max_bytes), int(reads_in_flight), read_kwargs),
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=_Collate(),
        pin_memory=dev.type == "cuda",
        prefetch_factor=2 if num_workers > 0 else None,
    )
    t0 = time.perf_counter()
    done = errors = 0
    next_log = log_every

    def progress() -> str:
        elapsed = time.perf_counter() - t0
        rate = done / elapsed if elapsed > 0 else float("inf")
        if total is None or total < done:
            return f"predicted {done} images, {rate:.1f} images/s, {errors} errors"
        eta = (total - done) / rate if rate > 0 else float("inf")
        return (f"predicted {done}/{total} images ({100 * done / max(total, 1):.0f}%), {rate:.1f} images/s, "
                f"ETA {eta:.0f} s, {errors} errors")

    for good, x, errs in loader:
        batch = sampler.pop()
        done += len(batch)
        errors += len(batch) - len(good)
        if log is not None and done >= next_log and (total is None or done < total):
            log(progress())
            next_log = (done // log_every + 1) * log_every
        yield predictor.frame([it.image_id for it in batch], [it.image_uri for it in batch], errs, good, x,
                              [it.day for it in batch])
    if log is not None and done:
        total = done  # the final line: every item is accounted for
        log(progress())


def predict_frame(model: torch.nn.Module, items: Iterable, **kwargs) -> pd.DataFrame:
    """All of :func:`predict_images` in one frame (an empty frame with the columns for no items)."""
    frames = list(predict_images(model, items, **kwargs))
    if not frames:
        return _frame([], [], [], [], None, None, 0.0, [])
    return pd.concat(frames, ignore_index=True)
