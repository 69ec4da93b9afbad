"""A day's uploads as :class:`Upload` records: one per entry, each readable or an error.

Two sources, one rule: every entry of a day yields exactly one :class:`Upload`, and nothing
outside the allowed roots is ever read.

- A folder ``PATH/<YYYY-MM-DD>/``: a regular file (or a link to one inside the roots) is
  readable; a link leaving the roots, a broken link, a named pipe, a device, a socket or a
  sub-folder is an error record. Hidden files (``.DS_Store``, half-written ``.part`` files) are
  not uploads and are skipped.
- The ``image_uploads`` table: a URI is readable only when it lies under one of the configured
  roots after normalisation (``..`` and symlinks resolved for local paths; bucket + prefix for
  ``gs://``). ``~``, relative paths and other schemes are refused.

Checking is not enough on its own: the scoring step reads ``Upload.path`` with
``storage.read_bytes(..., within=roots)``, which resolves and checks it again and opens it
without following any link, so a folder swapped for a link after this listing is refused.

Names are stored safely: a file name that is not valid UTF-8 keeps its real path in
``Upload.path`` (to read it) and is stored backslash-escaped in ``image_id``/``image_uri``.
No error text here contains file bytes.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from sofar_assets.lib.data import storage

REFUSED = "UploadRefused"


@dataclass(frozen=True)
class Upload:
    """One upload: what to store (``image_id``, ``image_uri``) and what to read (``path``)."""

    image_id: str  # valid UTF-8 always
    image_uri: str  # valid UTF-8 always; the real path is in `path`
    path: str | None  # what to read; None when the entry must not be read
    error: str | None = None  # set: an error row, never read


def safe_text(text: str) -> str:
    """``text`` as valid UTF-8: undecodable bytes of a file name (surrogate-escaped by Python)
    are written as ``\\xNN``; everything else is unchanged."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # lone surrogates that did not come from a file name
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _refused(uri: str, reason: str) -> str:
    return f"{REFUSED}: {safe_text(uri)}: {reason}"


def _within(real: str, root_real: str) -> bool:
    return real == root_real or real.startswith(root_real.rstrip("/") + "/")


def _gcs_root(root: str) -> tuple[str, str]:
    """(bucket, prefix ending with '/' or empty) of a gs:// root."""
    bucket, _, prefix = root[len("gs://") :].partition("/")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def _local_roots(roots: Sequence[str]) -> list[str]:
    """The real paths of the local roots; one that resolves to ``/`` (``/.``, a link to ``/``)
    would allow every file and allows none."""
    reals = (os.path.realpath(r) for r in roots if not storage.is_gcs(r))
    return [r for r in reals if r != "/"]


def refusal(uri: str, roots: Sequence[str]) -> str | None:
    """Why ``uri`` may not be read under ``roots`` (None: it may).

    Local: an absolute path whose real path (``..`` and links resolved) lies under the real path
    of a local root. ``gs://``: same bucket, key under the root's prefix, no ``.``/``..`` segments.
    """
    return _refusal(uri, roots, None)[0]


def _refusal(uri: str, roots: Sequence[str], root_reals: list[str] | None) -> tuple[str | None, str | None]:
    """(:func:`refusal`'s reason, the real path of a local URI): ``root_reals`` (the roots' real
    paths) computed once by a caller that checks many URIs."""
    reason = _refusal_reason(uri, roots, root_reals)
    if isinstance(reason, _Real):  # a local URI that may be read, at this real path
        return None, str(reason)
    return reason, None


class _Real(str):
    """A local URI's real path, returned by :func:`_refusal_reason` when it may be read."""


def _refusal_reason(uri: str, roots: Sequence[str], root_reals: list[str] | None):
    if not roots:
        return "no allowed roots are configured (uploads.allowed_roots), so nothing may be read"
    if not uri:
        return "empty URI"
    if "\x00" in uri:
        return "contains a NUL character"
    if storage.is_gcs(uri):
        bucket, _, key = uri[len("gs://") :].partition("/")
        if not bucket or not key or key.endswith("/"):
            return "not a gs://bucket/object URI"
        if any(seg in (".", "..") for seg in key.split("/")):
            return "has '.' or '..' path segments"
        for root in roots:
            if storage.is_gcs(root):
                rbucket, rprefix = _gcs_root(root)
                if bucket == rbucket and key.startswith(rprefix):
                    return None
        return f"outside the allowed roots ({', '.join(roots)})"
    if "://" in uri or uri.startswith("file:"):
        return "unsupported scheme: only absolute local paths and gs:// URIs are read"
    if uri.startswith("~"):
        return "starts with '~': home folders are never expanded"
    if not os.path.isabs(uri):
        return "a relative path: the uploads table must hold absolute paths or gs:// URIs"
    real = os.path.realpath(uri)
    if any(_within(real, r) for r in (_local_roots(roots) if root_reals is None else root_reals)):
        return _Real(real)
    where = "" if real == os.path.normpath(uri) else f" (it resolves to {safe_text(real)})"
    return f"outside the allowed roots ({', '.join(roots)}){where}"


def is_allowed(uri: str, roots: Sequence[str]) -> bool:
    """Whether ``uri`` lies under one of ``roots`` (see :func:`refusal`)."""
    return refusal(uri, roots) is None


def iter_table_uploads(rows: Iterable[tuple[object, object]], allowed_roots: Sequence[str]) -> Iterator[Upload]:
    """One :class:`Upload` per ``(image_id, image_uri)`` row of the uploads table.

    A URI outside ``allowed_roots`` (or empty, relative, ``~``, another scheme) becomes an error
    record and is never read. A local URI is read at its resolved real path, the one checked.
    """
    root_reals = _local_roots(allowed_roots)  # once, not per row: a day may hold a million rows
    for image_id, image_uri in rows:
        uid = safe_text(str(image_id))
        if not isinstance(image_uri, str) or not image_uri:
            yield Upload(uid, "", None, f"{REFUSED}: image {uid}: the image_uri is empty")
            continue
        reason, real = _refusal(image_uri, allowed_roots, root_reals)
        if reason is not None:
            yield Upload(uid, safe_text(image_uri), None, _refused(image_uri, reason))
        else:
            path = image_uri if storage.is_gcs(image_uri) else real
            yield Upload(uid, safe_text(image_uri), path)


def _entry(day: dt.date, folder: str, entry: os.DirEntry, root_reals: list[str], roots: Sequence[str]) -> Upload:
    image_id = f"{day.isoformat()}/{safe_text(entry.name)}"
    uri = safe_text(entry.path)
    is_link = entry.is_symlink()
    try:
        st = os.stat(entry.path)  # follows links
    except FileNotFoundError:
        if is_link:
            return Upload(image_id, uri, None, _refused(entry.path, "broken symbolic link (its target does not exist)"))
        return Upload(image_id, uri, None, _refused(entry.path, "vanished while the folder was listed"))
    except OSError as exc:  # a link loop, a name too long...
        return Upload(image_id, uri, None, _refused(entry.path, f"cannot stat: {exc.strerror}"))
    # the real path decides (a linked day folder could lead out too), and it is what gets read
    path = os.path.realpath(entry.path)
    if not any(_within(path, r) for r in root_reals):
        what = "symbolic link to" if is_link else "resolves to"
        return Upload(image_id, uri, None, _refused(
            entry.path, f"{what} {safe_text(path)}, which leaves the uploads root ({', '.join(roots)})"))
    if stat.S_ISDIR(st.st_mode):
        return Upload(image_id, uri, None, _refused(
            entry.path, f"is a sub-folder; a day's uploads are the files directly in {safe_text(folder)}"))
    if not stat.S_ISREG(st.st_mode):
        return Upload(image_id, uri, None, _refused(entry.path, f"is {storage.file_kind(st.st_mode)}, not an image file"))
    return Upload(image_id, uri, path)


def iter_folder_day(folder_uri: str, day: dt.date, *, allowed_roots: Sequence[str] | None = None) -> Iterator[Upload]:
    """One :class:`Upload` per entry of ``folder_uri/<YYYY-MM-DD>/``, streamed (nothing if the day
    has no folder). Links may point anywhere under ``allowed_roots`` (default: ``folder_uri``)."""
    folder = f"{folder_uri.rstrip('/')}/{day.isoformat()}"
    if storage.is_gcs(folder):
        yield from _gcs_day(folder, day)
        return
    if not os.path.isdir(folder):
        return  # nothing was uploaded that day
    roots = list(allowed_roots) if allowed_roots else [folder_uri]
    root_reals = _local_roots(roots)
    with os.scandir(folder) as entries:
        for entry in entries:
            if not entry.name.startswith("."):
                yield _entry(day, folder, entry, root_reals, roots)


def _gcs_day(folder: str, day: dt.date) -> Iterator[Upload]:
    bucket, prefix = _gcs_root(folder)
    pages = storage.gcs_client().list_blobs(bucket, prefix=prefix, delimiter="/").pages
    for page in pages:
        for blob in page:
            name = blob.name[len(prefix) :]
            if name and not name.startswith("."):  # "" is the folder's own placeholder object
                uri = f"gs://{bucket}/{blob.name}"
                yield Upload(f"{day.isoformat()}/{name}", uri, uri)
        for sub in page.prefixes:
            uri = f"gs://{bucket}/{sub}"
            yield Upload(f"{day.isoformat()}/{sub[len(prefix):].rstrip('/')}", uri, None,
                         _refused(uri, f"is a sub-folder; a day's uploads are the objects directly in {folder}/"))


def with_refused(uploads: Sequence[Upload], scored: pd.DataFrame) -> pd.DataFrame:
    """One row per upload, in ``uploads`` order: ``scored`` holds the rows of the readable ones
    (those with a ``path``, in order, as scored from ``(image_id, path)``); each refused upload
    becomes an error row. ``image_uri`` is the stored (safe) form, never the real path, and
    error texts are made valid UTF-8 (a read error names the real path)."""
    readable = [k for k, u in enumerate(uploads) if u.path is not None]
    if len(readable) != len(scored):
        raise ValueError(f"{len(scored)} scored rows for {len(readable)} readable uploads")
    refused = [k for k, u in enumerate(uploads) if u.path is None]
    scored = scored.set_axis(readable).assign(
        image_uri=pd.Series([uploads[k].image_uri for k in readable], index=readable, dtype=object),
        error=pd.Series([None if pd.isna(e) else safe_text(str(e)) for e in scored["error"]], index=readable,
                        dtype=object),
    )
    if not refused:
        return scored.reset_index(drop=True)
    given = {"image_id": [uploads[k].image_id for k in refused], "image_uri": [uploads[k].image_uri for k in refused],
             "error": [uploads[k].error for k in refused]}
    columns = {}
    for c in scored.columns:  # an error row: no labels, NaN numbers, not OOD (its error says why)
        if c in given:
            columns[c] = pd.Series(given[c], index=refused, dtype=object)
        elif c == "is_ood" or scored[c].dtype == bool:
            columns[c] = pd.Series(False, index=refused, dtype=bool)
        elif scored[c].dtype.kind == "f":
            columns[c] = pd.Series(np.nan, index=refused, dtype=scored[c].dtype)
        else:
            columns[c] = pd.Series(None, index=refused, dtype=object)
    errors = pd.DataFrame(columns, columns=scored.columns)
    return pd.concat([scored, errors] if readable else [errors]).sort_index().reset_index(drop=True)
