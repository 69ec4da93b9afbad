"""Image store access: local paths locally, ``gs://`` URIs in production.

Every image is addressed by a URI string. Local files are plain paths; ``gs://bucket/key``
goes through google-cloud-storage (installed with dagster-gcp). Only these two functions
touch the store, so the rest of the code never cares where bytes live.
"""

from __future__ import annotations

import functools
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})


class ImageReadError(OSError):
    """The bytes of an image could not be read (missing file, permission, network)."""

    def __init__(self, uri: str, reason: str):
        super().__init__(f"{uri}: {reason}")
        self.uri = uri
        self.reason = reason


def is_gcs(uri: str) -> bool:
    return str(uri).startswith("gs://")


@functools.lru_cache(maxsize=1)
def _gcs_client():
    from google.cloud import storage  # imported lazily: local runs never need credentials

    return storage.Client()


def _split_gcs(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("gs://") :].partition("/")
    return bucket, key


def read_bytes(uri: str) -> bytes:
    """Return the raw bytes at ``uri``; raise :class:`ImageReadError` naming the URI."""
    try:
        if is_gcs(uri):
            bucket, key = _split_gcs(uri)
            return _gcs_client().bucket(bucket).blob(key).download_as_bytes()
        return Path(uri).read_bytes()
    except FileNotFoundError:
        raise ImageReadError(uri, "file not found") from None
    except IsADirectoryError:
        raise ImageReadError(uri, "is a directory, not an image file") from None
    except PermissionError:
        raise ImageReadError(uri, "permission denied") from None
    except Exception as exc:  # network and client errors from GCS
        if isinstance(exc, ImageReadError):
            raise
        raise ImageReadError(uri, f"{type(exc).__name__}: {exc}") from exc


def list_files(folder_uri: str, *, recursive: bool = False) -> list[str]:
    """List the files directly in ``folder_uri`` (or below it when ``recursive``), sorted.

    Hidden files (``.DS_Store``, ``._x.jpg``) are skipped; every other file is returned,
    image suffix or not, so that a mislabeled file still reaches the decoder and gets a named
    error instead of silently disappearing.
    """
    if is_gcs(folder_uri):
        bucket, prefix = _split_gcs(folder_uri.rstrip("/") + "/")
        blobs = _gcs_client().list_blobs(bucket, prefix=prefix, delimiter=None if recursive else "/")
        names = [b.name for b in blobs if not b.name.endswith("/")]
        return sorted(f"gs://{bucket}/{n}" for n in names if not Path(n).name.startswith("."))
    root = Path(folder_uri)
    if not root.is_dir():
        raise FileNotFoundError(f"{folder_uri}: folder does not exist")
    it = root.rglob("*") if recursive else root.iterdir()
    return sorted(str(p) for p in it if p.is_file() and not p.name.startswith("."))


def list_subfolders(folder_uri: str) -> list[str]:
    """Names (not URIs) of the direct sub-folders of ``folder_uri``, sorted."""
    if is_gcs(folder_uri):
        bucket, prefix = _split_gcs(folder_uri.rstrip("/") + "/")
        it = _gcs_client().list_blobs(bucket, prefix=prefix, delimiter="/")
        list(it)  # the prefixes are only filled once the pages were iterated
        return sorted(p[len(prefix) :].rstrip("/") for p in it.prefixes)
    root = Path(folder_uri)
    if not root.is_dir():
        raise FileNotFoundError(f"{folder_uri}: folder does not exist")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
