"""A run's days of uploads -> scored rows staged as parquet, one file per (day, shard).

The predictions table is written in two phases so that a day is never half replaced:

1. :func:`score_days` streams the uploads of every day of a run through
   :func:`~sofar_assets.lib.serving.inference.predict_images` ONCE (one DataLoader, the model loaded
   once) and appends each batch's rows to that day's spool (a parquet file, one row group per
   batch), counting rows, errors, OOD rows and labels on the way. Memory is the DataLoader's
   prefetch plus one batch, whatever a day's size.
2. The caller commits each day with ONE ``replace_day`` from all its staged files, after every
   shard of the day is in.

A day may be split over several steps (pods): :func:`in_shard` assigns each ``image_id`` to one
of ``n`` shards by its SHA-1, so the split is the same in every process and on every re-run.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import datetime as dt
import functools
import hashlib
import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa

from sofar_assets.lib.data import storage
from sofar_assets.lib.serving.inference import as_item, predict_images
from sofar_assets.lib.warehouse.predictions import PREDICTION_DATE, run_rows


class Spool(Protocol):
    def append(self, df: pd.DataFrame) -> None: ...

    def close(self) -> int: ...


def in_shard(image_id: str, shard: int, shards: int) -> bool:
    """Whether ``image_id`` belongs to ``shard`` of ``shards`` (SHA-1 of the id, mod ``shards``)."""
    if shards == 1:
        return True
    return int.from_bytes(hashlib.sha1(image_id.encode()).digest()[:8], "big") % shards == shard


@dataclass
class DayTally:
    """What one day's rows hold, counted while they stream (nothing is re-read to count them)."""

    listed: int = 0  # items of the day seen in the source, every shard's included
    uploads: int = 0  # items of this shard sent to the model
    rows: int = 0  # rows that came out of the model
    errors: int = 0
    ood: int = 0
    labels: collections.Counter = field(default_factory=collections.Counter)
    staged_rows: int = 0  # rows the day's spool reported on close

    def add(self, frame: pd.DataFrame) -> None:
        ok = pd.isna(frame["error"].to_numpy())
        self.rows += len(frame)
        self.errors += int(len(frame) - ok.sum())
        self.ood += int(frame["is_ood"].to_numpy()[ok].sum())
        labels, counts = np.unique(frame["top1_label"].to_numpy()[ok].astype(str), return_counts=True)
        self.labels.update(dict(zip(labels.tolist(), counts.tolist(), strict=True)))

    def as_dict(self) -> dict:
        """JSON-able (ops pass it between steps)."""
        return {"listed": self.listed, "uploads": self.uploads, "rows": self.rows, "errors": self.errors,
                "ood": self.ood,
                "labels": dict(sorted(self.labels.items())), "staged_rows": self.staged_rows}

    @classmethod
    def merged(cls, parts: Iterable[dict]) -> DayTally:
        """The day's tally from its shards' :meth:`as_dict`."""
        out = cls()
        for p in parts:
            out.listed = max(out.listed, p["listed"])
            out.uploads += p["uploads"]
            out.rows += p["rows"]
            out.errors += p["errors"]
            out.ood += p["ood"]
            out.labels.update(p["labels"])
            out.staged_rows += p["staged_rows"]
        return out


@contextlib.contextmanager
def arrow_on_system_heap() -> Iterator[None]:
    """Arrow allocates from the C heap (its system pool) inside the block, then the previous pool.

    Arrow's default pool (mimalloc) keeps the pages it frees: over a stream the manifest's row
    groups, the batches' tables and the spool's writes left a shard's RSS creeping with the day
    (measured: +20 MiB at 40k images vs +4.5 MiB on the system pool, 2.9 MiB of Arrow memory live
    at most), out of reach of :func:`release_free_heap`. Buffers remember their pool: one allocated
    before the block is freed to its own."""
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(previous)


@arrow_on_system_heap()  # the whole pass, the last spool's close included
def score_days(
    model,
    days: Iterable[tuple[dt.date, Iterable]],
    *,
    open_spool: Callable[[dt.date], Spool],
    columns: dict,
    shard: int = 0,
    shards: int = 1,
    rows_per_group: int = 2048,
    read_ahead_batches: int = 2,
    **predict_kwargs,
) -> dict[dt.date, DayTally]:
    """Score the uploads of several days in ONE streaming pass and stage each day's rows.

    ``days`` yields ``(day, items)`` in order; ``items`` are anything
    :func:`~sofar_assets.lib.serving.inference.predict_images` takes and are consumed lazily. Each
    item carries its day through the model (:class:`~sofar_assets.lib.serving.inference.Item`), so each
    batch's rows come out with their ``prediction_date``; with the run's constant ``columns``
    (e.g. model name and version) they go to ``open_spool(day)``, opened at the day's
    first row and closed when its last row is out. Rows are appended in groups of up to
    ``rows_per_group`` (one parquet row group each): a group per 32-row batch would make the
    file's footer, which the writer keeps in memory, grow with the day (~2 KB per group). The
    buffer is kept small on purpose: its many small long-lived allocations pin the freed
    per-batch tensors in glibc's heap (measured: ~12 KB per buffered row), a cost bounded by
    ``rows_per_group``, not by the day. The model loop runs in a background thread at most
    ``read_ahead_batches`` frames ahead of the staging (:func:`read_ahead`), so converting and
    writing a batch's rows overlaps the next batch's model time. A day without items gets a zero tally and no
    spool. With ``shards > 1`` only the items of ``shard`` (:func:`in_shard`) are scored; every
    item still counts as ``listed``. Returns every day's tally, in order.
    """
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is not in 0..{shards - 1}")
    tallies: dict[dt.date, DayTally] = {}

    def flat() -> Iterator:
        for day, items in days:
            tally = tallies[day] = DayTally()
            for x in items:
                tally.listed += 1
                item = as_item(x, day)  # the item carries its day through the model into its row
                if shards > 1 and not in_shard(item.image_id, shard, shards):
                    continue
                tally.uploads += 1
                yield item

    spools: dict[dt.date, Spool] = {}
    # rows not yet appended (< rows_per_group), held as Arrow tables of the spool's schema when it
    # declares one: a 32-row pandas frame costs ~10 KB of overhead, its Arrow table ~1 KB
    pending: dict[dt.date, list] = {}
    pending_rows: collections.Counter = collections.Counter()

    def flush(day: dt.date) -> None:
        frames = pending.pop(day, [])
        pending_rows[day] = 0
        if len(frames) > 1:
            frames = [pa.concat_tables(frames) if isinstance(frames[0], pa.Table)
                      else pd.concat(frames, ignore_index=True)]
        if frames:
            spools[day].append(frames[0])

    def close(day: dt.date) -> None:
        flush(day)
        tallies[day].staged_rows = spools.pop(day).close()

    try:
        # the model loop runs one thread ahead of the rows' conversion and writes: while the
        # accelerator works on batch k+1 (the GIL released), this thread stages batch k
        stream = read_ahead(predict_images(model, flat(), **predict_kwargs), read_ahead_batches)
        with contextlib.closing(stream):
            for frame in stream:
                release_free_heap()  # the freed buffers of the previous batch, back to the OS
                for day, part in day_runs(frame):  # a batch may straddle days
                    for other in [d for d in spools if d != day]:
                        close(other)  # days stream in order: an earlier day is complete
                    if day not in spools:
                        spools[day] = open_spool(day)
                    pending.setdefault(day, []).append(
                        run_rows(part, columns, getattr(spools[day], "schema", None)))
                    pending_rows[day] += len(part)
                    if pending_rows[day] >= rows_per_group:
                        flush(day)
                    tallies[day].add(part)
        for day in list(spools):
            close(day)
    finally:
        for spool in spools.values():  # a failed pass removes its partial files: nothing to commit
            try:
                getattr(spool, "discard", spool.close)()
            except Exception:  # noqa: BLE001 - the original error is the one to report
                pass
    return tallies


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    A long stream allocates and frees many small per-batch buffers from two threads; glibc keeps
    the freed pages of its arenas, so the RSS of a day would creep with the day's size (measured
    here: about +3 MiB per 15k images, and swings of +/-10 MiB between batches). Called once per
    batch; it costs microseconds. Dask's workers trim the same way."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        # the process's own symbols (libc included); ctypes.util.find_library would fork ldconfig
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


def day_runs(frame: pd.DataFrame) -> Iterator[tuple[dt.date, pd.DataFrame]]:
    """A scored batch cut into runs of one day, by each row's own ``prediction_date``."""
    days = frame[PREDICTION_DATE].to_numpy()
    start = 0
    while start < len(frame):
        stop = start + 1
        while stop < len(frame) and days[stop] == days[start]:
            stop += 1
        yield days[start], (frame if (start, stop) == (0, len(frame)) else frame.iloc[start:stop])
        start = stop


T = TypeVar("T")


def read_ahead(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Iterate ``items`` in a background thread, at most ``depth`` items ahead of the consumer.

    Memory stays bounded (``depth`` items queued); an exception of the producer is raised in
    the consumer; when the consumer stops early (an exception, ``close``), the producer stops
    after its current item and ``items`` is closed in its own thread. ``depth=0`` iterates in
    the calling thread.
    """
    if depth <= 0:
        yield from items
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    item_, error_, done_ = 0, 1, 2

    def put(kind: int, value) -> bool:
        while not stop.is_set():
            try:
                q.put((kind, value), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for x in items:
                if not put(item_, x):
                    return
            put(done_, None)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put(error_, exc)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == done_:
                return
            if kind == error_:
                raise value
            yield value
    finally:
        stop.set()
        thread.join()


def write_day(wh, schema, day: dt.date, parts: list[dict]) -> dict:
    """Replace ``day`` of ``schema``'s table with ONE ``replace_day`` from the staged files of all
    its shards (``parts``: each shard's :meth:`DayTally.as_dict` plus its ``file``). Returns the
    day's facts so far; :func:`read_back` completes them with the rows the table holds."""
    tally = DayTally.merged(parts)
    files = [p["file"] for p in parts if p.get("file")]
    written = wh.replace_day(schema, day, files)
    scored = tally.rows - tally.errors
    return {
        "uploads": tally.listed, "error_rows": tally.errors, "ood_rows": tally.ood,
        "ood_rate": round(tally.ood / scored, 4) if scored else 0.0, "staged": tally.staged_rows,
        "written": written, "files": files,
        # the rows check, less the read-back: every shard saw the same listing, and
        # listed == sent to the model == scored == staged == loaded
        "ok": len({p["listed"] for p in parts}) <= 1
        and tally.listed == tally.uploads == tally.rows == tally.staged_rows == written,
    }


def read_back(facts: dict, stored: int) -> dict:
    """A written day's facts with ``rows``, the rows the table holds now; ``ok`` is the rows check:
    the listing agreed and listed == sent == scored == staged == loaded == stored."""
    return {"uploads": facts["uploads"], "rows": stored, **{k: v for k, v in facts.items() if k != "uploads"},
            "ok": facts["ok"] and facts["written"] == stored}


def staging_uri(root: str, day: dt.date, run_id: str, shard: int, shards: int) -> str:
    """Where a shard's rows of one day are staged until the day is committed."""
    name = f"staging/predictions/{day.isoformat()}/{run_id}/shard-{shard}-of-{shards}.parquet"
    return f"{root.rstrip('/')}/{name}" if storage.is_gcs(root) else str(Path(root) / name)


def manifest_uri(root: str, day: dt.date, run_id: str) -> str:
    """Where a run's listing of ``day`` (lib/data/manifest.py) is staged until the day is committed."""
    name = f"staging/manifests/{day.isoformat()}/{run_id}/uploads.parquet"
    return f"{root.rstrip('/')}/{name}" if storage.is_gcs(root) else str(Path(root) / name)


def fetch_local(uri: str) -> tuple[str, bool]:
    """A local path holding ``uri``'s file: itself, or for ``gs://`` a temporary download
    (streamed to disk); the flag says whether the caller must delete it."""
    if not storage.is_gcs(uri):
        return uri, False
    fd, path = tempfile.mkstemp(prefix="manifest-", suffix=".parquet")
    os.close(fd)
    bucket, _, key = uri[len("gs://"):].partition("/")
    storage.gcs_client().bucket(bucket).blob(key).download_to_filename(path)
    return path, True


def local_spool_path(uri: str) -> str:
    """The local file a spool writes for ``uri`` (itself, or a temporary file for ``gs://``)."""
    if not storage.is_gcs(uri):
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        return uri
    fd, path = tempfile.mkstemp(prefix="predictions-", suffix=".parquet")
    os.close(fd)
    return path


def publish(local_path: str, uri: str) -> None:
    """Put a closed spool file at its staging ``uri`` (an upload for ``gs://``, then removed)."""
    if local_path == uri:
        return
    if storage.is_gcs(uri):
        bucket, _, key = uri[len("gs://"):].partition("/")
        storage.gcs_client().bucket(bucket).blob(key).upload_from_filename(local_path)
        os.remove(local_path)
    else:
        shutil.move(local_path, uri)


def remove_staged(uris: Iterable[str]) -> None:
    """Delete committed staging files (and their emptied run folders, locally)."""
    uris = list(uris)
    gcs_uris = [u for u in uris if storage.is_gcs(u)]
    if gcs_uris:
        client = storage.gcs_client()
        for u in gcs_uris:
            bucket, _, key = u[len("gs://"):].partition("/")
            client.bucket(bucket).blob(key).delete()
    for u in uris:
        if not storage.is_gcs(u):
            Path(u).unlink(missing_ok=True)
            try:
                Path(u).parent.rmdir()  # the run's folder, once its last shard is gone
            except OSError:
                pass
