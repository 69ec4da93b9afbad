"""Image store access: local paths locally, ``gs://`` URIs in production.

Every image is addressed by a URI string. Local files are plain paths; ``gs://bucket/key``
goes through google-cloud-storage (installed with dagster-gcp). Only the functions here touch
the store, so the rest of the code never cares where bytes live.

Reads are bounded: only regular files are read (a pipe, a device such as ``/dev/zero`` or a
link to one is refused before a byte is read), never more than ``max_bytes + 1`` bytes
(:data:`MAX_IMAGE_BYTES` unless the caller says otherwise), and ``gs://`` downloads carry a
timeout and a bounded retry. A read confined to allowed roots (``within``) resolves the path,
checks it, then opens it without following a link at any component, so a folder swapped for a
link between the check and the read is refused instead of followed.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
MAX_IMAGE_BYTES = 50_000_000
"""What :func:`read_bytes` reads at most unless told otherwise (the default of ``inference.max_bytes``)."""
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class ImageReadError(OSError):
    """The bytes of an image could not be read (missing file, permission, network, not a file)."""

    def __init__(self, uri: str, reason: str):
        super().__init__(f"{uri}: {reason}")
        self.uri = uri
        self.reason = reason


def is_gcs(uri: str) -> bool:
    return str(uri).startswith("gs://")


GCS_POOL_SIZE = 32  # the default inference.reads_in_flight


@functools.lru_cache(maxsize=4)
def gcs_client(pool_size: int = GCS_POOL_SIZE, *, endpoint: str | None = None, project: str | None = None):
    """The process's google-cloud-storage client: the ONE factory (image reads, the daily path's
    staging, the BigQuery warehouse's downloads, ``sofar doctor`` and the local stack's emulator
    all get theirs here).

    Its HTTP connection pool is sized for ``pool_size`` concurrent requests
    (``inference.reads_in_flight`` reads per worker): with requests' default of 10, the 11th
    concurrent read opens a connection that is thrown away afterwards ("Connection pool is full,
    discarding connection"), a new TCP + TLS handshake per read beyond the tenth. ``endpoint``
    (with anonymous credentials) addresses a GCS emulator directly, as the local stack does to
    create its buckets; otherwise the environment decides (credentials, ``STORAGE_EMULATOR_HOST``)."""
    import requests
    from google.cloud import storage  # imported lazily: local runs never need credentials

    if endpoint is None:
        client = storage.Client(project=project)
    else:
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials

        client = storage.Client(project=project, credentials=AnonymousCredentials(),
                                client_options=ClientOptions(api_endpoint=endpoint))
    adapter = requests.adapters.HTTPAdapter(pool_connections=pool_size, pool_maxsize=pool_size)
    for prefix in ("https://", "http://"):  # http: the GCS emulator (STORAGE_EMULATOR_HOST)
        client._http.mount(prefix, adapter)
    return client


# A forked DataLoader worker must not reuse its parent's client: the pooled keep-alive connections
# (sockets) would be shared by the processes, their requests and responses interleaved on one socket
os.register_at_fork(after_in_child=gcs_client.cache_clear)


def _split_gcs(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("gs://") :].partition("/")
    return bucket, key


def file_kind(mode: int) -> str:
    """What a ``st_mode`` is, in words, for error messages."""
    for test, kind in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def _too_large(size: int | None, max_bytes: int) -> str:
    if size is None:
        return f"too large: more than {max_bytes} bytes (max_bytes={max_bytes})"
    return f"too large: {size} bytes > max_bytes={max_bytes}"


def _open_regular(uri: str) -> int:
    # stat first (it follows links): a device or a pipe is refused without being opened, since
    # opening some devices has side effects and opening a pipe blocks until a writer appears.
    st = os.stat(uri)
    if not stat.S_ISREG(st.st_mode):
        raise ImageReadError(uri, f"is {file_kind(st.st_mode)}, not a regular file; refused without reading")
    # O_NONBLOCK: if the path was swapped for a pipe since the stat, open() still returns at once
    return os.open(uri, os.O_RDONLY | os.O_NONBLOCK | _CLOEXEC)


def within_root(real: str, root_real: str) -> bool:
    """Whether the real path ``real`` is ``root_real`` or lies below it (both already resolved)."""
    return real == root_real or real.startswith(root_real.rstrip("/") + "/")


def _open_confined(uri: str, roots: Sequence[str]) -> int:
    """Open ``uri`` only if its real path lies under one of the local ``roots``, without following
    a link at any component of that real path (``openat`` one component at a time, each with
    ``O_NOFOLLOW``): a component swapped for a link after the check makes the open fail."""
    real = os.path.realpath(uri)
    root_reals = [os.path.realpath(r) for r in roots if not is_gcs(r)]
    if not any(within_root(real, r) and r != "/" for r in root_reals):
        raise ImageReadError(uri, f"outside the allowed roots ({', '.join(roots)}); refused without reading")
    parts = real.split("/")[1:]
    if not parts or not parts[-1] or any(p in ("", ".", "..") for p in parts):
        raise ImageReadError(uri, "not a file path")
    dir_flags = os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW | _CLOEXEC
    fd = os.open("/", dir_flags)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, dir_flags, dir_fd=fd)
            os.close(fd)
            fd = nxt
        st = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):  # a link here too: it was not one when realpath looked
            raise ImageReadError(uri, f"is {file_kind(st.st_mode)} (at {real}), not a regular file; "
                                 "refused without reading")
        return os.open(parts[-1], os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW | _CLOEXEC, dir_fd=fd)
    except ImageReadError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        raise ImageReadError(uri, f"a component of {real} became a symbolic link or stopped being a folder "
                             "while it was opened; links are not followed here, refused") from None
    finally:
        os.close(fd)


def _read_local(uri: str, max_bytes: int | None, within: Sequence[str] | None = None) -> bytes:
    fd = _open_regular(uri) if within is None else _open_confined(uri, within)
    with os.fdopen(fd, "rb", buffering=0) as f:
        st = os.fstat(f.fileno())  # what was actually opened
        if not stat.S_ISREG(st.st_mode):
            raise ImageReadError(uri, f"is {file_kind(st.st_mode)}, not a regular file; refused without reading")
        if max_bytes is not None and st.st_size > max_bytes:
            raise ImageReadError(uri, _too_large(st.st_size, max_bytes))
        if max_bytes is None:
            return f.read()
        chunks, total = [], 0
        while total <= max_bytes:  # a file that grows while it is read still stops at max_bytes + 1
            chunk = f.read(max_bytes + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:
            raise ImageReadError(uri, _too_large(None, max_bytes))
        return b"".join(chunks)


def _read_gcs(uri: str, max_bytes: int | None, timeout_s: float, retries: int,
              pool_size: int = GCS_POOL_SIZE) -> bytes:
    from google.cloud.storage.retry import DEFAULT_RETRY

    bucket, key = _split_gcs(uri)
    if not bucket or not key or key.endswith("/"):
        raise ImageReadError(uri, "not a gs://bucket/object URI")
    # Each HTTP attempt times out after timeout_s; the library's retry (transient errors only:
    # 429, 5xx, connection resets) gives up once about `retries` attempts' time has passed.
    retry = DEFAULT_RETRY.with_timeout(timeout_s * max(retries, 1)) if retries > 0 else None
    blob = gcs_client(pool_size).bucket(bucket).blob(key)
    if max_bytes is None:
        return blob.download_as_bytes(timeout=timeout_s, retry=retry)
    # A ranged download of max_bytes + 1 bytes (end is inclusive): a larger object is refused
    # without downloading it whole, and a 0-byte object comes back empty.
    data = blob.download_as_bytes(start=0, end=max_bytes, timeout=timeout_s, retry=retry)
    if len(data) > max_bytes:
        raise ImageReadError(uri, _too_large(blob.size, max_bytes))
    return data


def read_bytes(uri: str, *, max_bytes: int | None = MAX_IMAGE_BYTES, timeout_s: float = 30.0,
               retries: int = 3, within: Sequence[str] | None = None, pool_size: int = GCS_POOL_SIZE) -> bytes:
    """Return the raw bytes at ``uri``; raise :class:`ImageReadError` naming the URI and the reason.

    Local paths: only regular files (links are followed, then the target must be a regular
    file); a directory, pipe, device or socket is refused without reading. ``max_bytes``
    (default :data:`MAX_IMAGE_BYTES`; ``None`` only for callers that bound the size otherwise)
    refuses anything larger ("too large: ..."), reading at most ``max_bytes + 1`` bytes.
    ``within`` (local roots): the path's real path must lie under one of them, and it is opened
    without following any link, so it cannot be redirected between the check and the read.
    ``gs://``: one ranged download with a ``timeout_s`` per attempt and bounded retries, on a
    client whose connection pool holds ``pool_size`` connections (pass the reads in flight).
    The error text never contains file bytes.
    """
    try:
        if is_gcs(uri):
            return _read_gcs(uri, max_bytes, timeout_s, retries, pool_size)
        return _read_local(uri, max_bytes, within)
    except ImageReadError:
        raise
    except FileNotFoundError:
        reason = "file not found"
        if not is_gcs(uri) and os.path.islink(uri):
            reason = "broken symbolic link (its target does not exist)"
        raise ImageReadError(uri, reason) from None
    except IsADirectoryError:
        raise ImageReadError(uri, "is a directory, not an image file") from None
    except PermissionError:
        raise ImageReadError(uri, "permission denied") from None
    except Exception as exc:  # OSError (ELOOP, ENAMETOOLONG...), network and client errors from GCS
        if type(exc).__name__ == "NotFound":
            raise ImageReadError(uri, "file not found") from None
        if type(exc).__name__ == "Forbidden":
            raise ImageReadError(uri, "permission denied") from None
        raise ImageReadError(uri, f"{type(exc).__name__}: {exc}") from exc


def write_bytes(uri: str, data: bytes, *, content_type: str = "application/octet-stream",
                timeout_s: float = 60.0, retries: int = 3) -> None:
    """Write ``data`` at ``uri`` whole or not at all: a local file is written beside its target
    and renamed over it; a ``gs://`` object is one upload (with a timeout and bounded retries)."""
    if is_gcs(uri):
        from google.cloud.storage.retry import DEFAULT_RETRY

        bucket, key = _split_gcs(uri)
        retry = DEFAULT_RETRY.with_timeout(timeout_s * max(retries, 1)) if retries > 0 else None
        gcs_client().bucket(bucket).blob(key).upload_from_string(
            data, content_type=content_type, timeout=timeout_s, retry=retry
        )
        return
    folder = os.path.dirname(uri) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(uri)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, uri)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _hidden(name: str) -> bool:
    return name.startswith(".")


def iter_files(folder_uri: str, *, recursive: bool = False) -> Iterator[str]:
    """The files directly in ``folder_uri`` (or below it when ``recursive``), streamed.

    Never materializes the listing: local folders are read with ``os.scandir``, ``gs://``
    prefixes page by page. The order is the store's (lexicographic on GCS, directory order
    locally). Hidden files (``.DS_Store``, ``._x.jpg``) are skipped; every other file is given,
    image suffix or not, so that a mislabeled file still reaches the decoder and gets a named
    error instead of silently disappearing.
    """
    if is_gcs(folder_uri):
        bucket, prefix = _split_gcs(folder_uri.rstrip("/") + "/")
        blobs = gcs_client().list_blobs(bucket, prefix=prefix, delimiter=None if recursive else "/")
        for blob in blobs:
            if not blob.name.endswith("/") and not _hidden(blob.name.rsplit("/", 1)[-1]):
                yield f"gs://{bucket}/{blob.name}"
        return
    if not os.path.isdir(folder_uri):
        raise FileNotFoundError(f"{folder_uri}: folder does not exist")
    stack = [folder_uri]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if _hidden(entry.name):
                    continue
                if entry.is_file():
                    yield entry.path
                elif recursive and entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)


def list_files(folder_uri: str, *, recursive: bool = False) -> list[str]:
    """:func:`iter_files`, sorted (for small folders whose order matters: task folders, OOD sets)."""
    return sorted(iter_files(folder_uri, recursive=recursive))


def list_subfolders(folder_uri: str) -> list[str]:
    """Names (not URIs) of the direct sub-folders of ``folder_uri``, sorted."""
    if is_gcs(folder_uri):
        bucket, prefix = _split_gcs(folder_uri.rstrip("/") + "/")
        it = gcs_client().list_blobs(bucket, prefix=prefix, delimiter="/")
        list(it)  # the prefixes are only filled once the pages were iterated
        return sorted(p[len(prefix) :].rstrip("/") for p in it.prefixes)
    root = Path(folder_uri)
    if not root.is_dir():
        raise FileNotFoundError(f"{folder_uri}: folder does not exist")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
