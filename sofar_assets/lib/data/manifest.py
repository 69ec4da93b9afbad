"""A day's uploads listed ONCE per run, as a manifest; shards sized by the day; each shard reads its slice.

The listing of a day (a folder scanned page by page, or the uploads table read in pages) is
streamed into a Parquet file, the day's *manifest*: one row per upload (``image_id``,
``image_uri``, the ``path`` to read, the ``error`` of an upload refused before any read), in
row groups of ``rows_per_group``. Memory holds one row group, whatever the day's size.

The day's count then decides how many shards it gets (:func:`shard_count`:
``ceil(count / images_per_shard)``, at least 1, at most ``max_shards``), each shard a
contiguous range of the manifest's rows (:func:`slices`), and :func:`read_slice` streams a
range reading only the row groups that overlap it. :func:`pack` groups the slices of a run's
days into work units (one step, i.e. one pod, each): consecutive slices of distinct days up to
``images_per_shard`` images, so a backfill of quiet days runs in one step and a busy day in
several. Every row of a manifest is in exactly one slice of exactly one unit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sofar_assets.lib.data.uploads import Upload

SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("image_uri", pa.string(), nullable=False),
    # the real path's bytes (a file name need not be UTF-8: os.fsencode / os.fsdecode round-trip
    # it); null: never read (the upload was refused; see error)
    pa.field("path", pa.binary()),
    pa.field("error", pa.string()),
])
ROWS_PER_GROUP = 10_000
READ_ROWS = 1024  # rows of a slice turned into Python objects at a time


def write_manifest(uploads: Iterable[Upload], path: str | os.PathLike, *, rows_per_group: int = ROWS_PER_GROUP) -> int:
    """Stream ``uploads`` into a Parquet manifest at ``path`` (one row group per
    ``rows_per_group`` uploads, memory for one group); returns the number of rows written. A
    failed listing removes the partial file."""
    if rows_per_group < 1:
        raise ValueError(f"rows_per_group must be at least 1, got {rows_per_group}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    count = 0
    cols: tuple[list, list, list, list] = ([], [], [], [])

    def flush(writer: pq.ParquetWriter) -> None:
        if cols[0]:
            writer.write_table(pa.Table.from_arrays([pa.array(c, f.type) for c, f in zip(cols, SCHEMA, strict=True)],
                                                    schema=SCHEMA))
            for c in cols:
                c.clear()

    try:
        with pq.ParquetWriter(str(path), SCHEMA) as writer:
            for u in uploads:
                cols[0].append(u.image_id)
                cols[1].append(u.image_uri)
                cols[2].append(None if u.path is None else os.fsencode(u.path))
                cols[3].append(u.error)
                count += 1
                if len(cols[0]) >= rows_per_group:
                    flush(writer)
            flush(writer)
    except BaseException:
        Path(path).unlink(missing_ok=True)
        raise
    return count


def manifest_rows(path: str | os.PathLike) -> int:
    """The number of uploads in a manifest (from its footer; nothing else is read)."""
    return pq.ParquetFile(str(path)).metadata.num_rows


def read_slice(path: str | os.PathLike, start: int, stop: int, *,
               rows_per_read: int = READ_ROWS) -> Iterator[Upload]:
    """The uploads of rows ``[start, stop)`` of a manifest, in order, streamed: only the row
    groups that overlap the range are read, ``rows_per_read`` rows at a time (a whole group as
    Python objects is ~10 MB at 10,000 rows; it stays alive while the shard's reads go on)."""
    if not 0 <= start <= stop:
        raise ValueError(f"not a row range: [{start}, {stop})")
    pf = pq.ParquetFile(str(path))
    first = 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if max(start, first) < min(stop, first + n):
            at = first  # the manifest row of the batch's first row
            for batch in pf.iter_batches(batch_size=rows_per_read, row_groups=[g], use_threads=False):
                lo, hi = max(start, at), min(stop, at + batch.num_rows)
                if lo < hi:
                    part = batch.slice(lo - at, hi - lo)
                    ids, uris, paths, errors = (part.column(c).to_pylist() for c in SCHEMA.names)
                    for image_id, uri, path, error in zip(ids, uris, paths, errors, strict=True):
                        yield Upload(image_id, uri, None if path is None else os.fsdecode(path), error)
                    del part, ids, uris, paths, errors
                at += batch.num_rows
                if at >= stop:
                    return
        first += n
        if first >= stop:
            return


def shard_count(count: int, images_per_shard: int, max_shards: int) -> int:
    """Shards of a day of ``count`` uploads: ``ceil(count / images_per_shard)``, in ``[1, max_shards]``
    (a day without uploads still gets one, which commits the empty day)."""
    if images_per_shard < 1 or max_shards < 1:
        raise ValueError(f"images_per_shard and max_shards must be at least 1, got {images_per_shard}, {max_shards}")
    return max(1, min(max_shards, math.ceil(count / images_per_shard)))


def slices(count: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous row ranges ``[start, stop)`` covering ``0 .. count`` exactly, sizes
    differing by at most one (``count < shards`` leaves some empty)."""
    if shards < 1 or count < 0:
        raise ValueError(f"need count >= 0 and shards >= 1, got {count}, {shards}")
    bounds = [count * k // shards for k in range(shards + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def pack(days: dict, *, images_per_shard: int, max_shards: int, fixed_shards: int | None = None) -> list[list[dict]]:
    """The work units of a run: ``days`` maps a day (ISO string) to ``(manifest_uri, count)``.

    Each day gets :func:`shard_count` slices; the slices, in day order, are packed into units of
    consecutive slices of distinct days holding up to ``images_per_shard`` images (a slice bigger
    than that, because of ``max_shards``, is a unit alone). With ``fixed_shards``
    (``inference.shards_per_day``) every day is cut in that many slices and unit k holds slice k
    of every day. Each slice is ``{"day", "manifest", "start", "stop", "shard", "shards", "count"}``.
    """
    if fixed_shards:  # inference.shards_per_day: unit k holds slice k of every day
        per_day = {day: slices(count, fixed_shards) for day, (_, count) in days.items()}
        return [[{"day": day, "manifest": days[day][0], "start": rng[k][0], "stop": rng[k][1], "shard": k,
                  "shards": fixed_shards, "count": days[day][1]} for day, rng in per_day.items()]
                for k in range(fixed_shards)]
    units: list[list[dict]] = []
    unit: list[dict] = []
    for day, (uri, count) in days.items():
        n = shard_count(count, images_per_shard, max_shards)
        for k, (start, stop) in enumerate(slices(count, n)):
            part = {"day": day, "manifest": uri, "start": start, "stop": stop, "shard": k, "shards": n,
                    "count": count}
            size = sum(p["stop"] - p["start"] for p in unit)
            if unit and (size + stop - start > images_per_shard or any(p["day"] == day for p in unit)):
                units.append(unit)
                unit = []
            unit.append(part)
    if unit:
        units.append(unit)
    return units
