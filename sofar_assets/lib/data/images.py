"""The one image decode + preprocess path shared by training and inference.

Training and serving must see identical pixels for the same bytes, so everything that turns
bytes into a model input lives here: :func:`decode_image` (content-sniffed, bomb-checked,
EXIF-upright RGB), :func:`resize_center_crop`, :func:`load_image_array` (both, with the JPEG
draft fast path), a disk cache of the preprocessed arrays and a torch ``Dataset``.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import os
import re
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from sofar_assets.lib.data import storage

# Bump whenever the pixels produced by load_image_array change (resampling filter, draft
# policy, colour handling): cached arrays of an older version are then simply never read.
PREPROCESS_VERSION = "1"

_WHITE = (255, 255, 255)
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})

# Pillow's BILINEAR resize is a true (antialiased) triangle filter whose support grows with the
# scale factor, so it does not alias like a 2x2 bilinear tap. After the JPEG draft the remaining
# factor is below 2 (e.g. 384 -> 224), where BILINEAR and LANCZOS are visually alike while
# LANCZOS costs ~2x as much (about 40% of the draft decode time). reducing_gap=3 only kicks in
# for big factors (non-JPEG or no draft): a box reduce first, then the filter, at a cost in
# quality that is invisible at 224 px.
_RESAMPLE = Image.Resampling.BILINEAR
_REDUCING_GAP = 3.0


class ImageDecodeError(ValueError):
    """The bytes are not a usable image; ``str(e)`` names the source and the reason."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _open_unchecked(data: bytes) -> Image.Image | None:
    """Identify ``data`` like ``Image.open`` but without Pillow's global bomb check.

    Only used after Pillow refused the header, so that our per-call ``max_pixels`` decides (and
    the error can name the dimensions). Plugin factories only parse the header here.
    """
    Image.init()
    prefix = data[:16]
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        try:
            accepted = not accept or accept(prefix)
            if not accepted or isinstance(accepted, str):  # a str is Pillow's "maybe, but" warning
                continue
            return factory(io.BytesIO(data), "")
        except Exception:
            continue
    return None


_BYTES_REPR_RE = re.compile(r"b'(?:[^'\\]|\\.)*'|b\"(?:[^\"\\]|\\.)*\"")


def _no_bytes(exc: BaseException) -> str:
    """A decoder's message without quoted file bytes (Pillow quotes e.g. a PNG chunk id)."""
    return _BYTES_REPR_RE.sub("<bytes>", str(exc))


def _open(data: bytes, source: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        img = _open_unchecked(data)
        if img is None:
            raise ImageDecodeError(source, "decompression bomb: refused by Pillow's pixel limit") from None
        return img
    except UnidentifiedImageError:
        # the reason never quotes the bytes: a refused file may be a secret (an env dump, a key)
        raise ImageDecodeError(source, "not a recognised image format, or its header is corrupt") from None
    except Exception as exc:  # corrupt headers surface as SyntaxError, struct.error, OSError...
        raise ImageDecodeError(source, f"unreadable image header: {type(exc).__name__}: {_no_bytes(exc)}") from exc


def _high_depth_to_uint8(img: Image.Image) -> np.ndarray:
    """16-bit/32-bit/float grey to uint8 by scaling the value range, never by clipping."""
    a = np.asarray(img)
    if img.mode.startswith("I;16"):
        # round(v * 255 / 65535) == round(v / 257): the full 16-bit range maps onto 0..255
        return ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
    a = a.astype(np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if img.mode == "I" and lo >= 0 and hi <= 65535:
        # mode "I" almost always holds 16-bit samples (16-bit PNG/TIFF in older Pillows)
        return np.rint(a / 257.0).astype(np.uint8)
    if img.mode == "F" and lo >= 0 and hi <= 1:
        return np.rint(a * 255.0).astype(np.uint8)
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB; transparency is composited on white."""
    if img.mode in _HIGH_DEPTH_MODES:
        return Image.fromarray(_high_depth_to_uint8(img), "L").convert("RGB")
    if img.has_transparency_data:  # RGBA, LA, PA, RGBa, P/L/RGB with a tRNS colour
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, _WHITE)
        out.paste(rgba, (0, 0), rgba)
        return out
    if img.mode == "RGB":
        return img
    return img.convert("RGB")


def decode_image(
    data: bytes,
    source: str = "<bytes>",
    *,
    target_size: int | None = None,
    max_pixels: int = 80_000_000,
) -> Image.Image:
    """Decode ``data`` into an upright RGB image, or raise :class:`ImageDecodeError`.

    The format is sniffed from the bytes, never from ``source``. ``max_pixels`` is checked on
    the header's dimensions before any pixel is decoded. With ``target_size``, JPEGs are decoded
    at 1/2, 1/4 or 1/8 scale (DCT scaling) while both sides stay >= ``target_size``; the result
    is then not pixel-identical to a full decode, so callers who need train/serve parity must
    use the same ``target_size`` (:func:`load_image_array` does). Animated images give their
    first frame.
    """
    if not data:
        raise ImageDecodeError(source, "empty file")
    img = _open(data, source)
    width, height = img.size
    if width * height > max_pixels:
        raise ImageDecodeError(
            source, f"decompression bomb: {width} x {height} pixels exceeds max_pixels={max_pixels}"
        )
    if width == 0 or height == 0:
        raise ImageDecodeError(source, f"image has no pixels ({width} x {height})")
    # MPO (phone photos with an embedded preview/depth frame) subclasses JpegImageFile
    if target_size is not None and isinstance(img, JpegImagePlugin.JpegImageFile):
        # Draft scales the stored (unrotated) raster; requesting a square keeps *both* sides
        # >= target_size, so the shorter side is large enough whatever the EXIF rotation.
        img.draft("RGB", (target_size, target_size))
    try:
        img.load()
    except Exception as exc:  # truncated streams raise OSError; broken ones also SyntaxError etc.
        raise ImageDecodeError(
            source, f"truncated or corrupt {img.format or 'image'} data: {type(exc).__name__}: {_no_bytes(exc)}"
        ) from exc
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:
        # A malformed EXIF block should not discard an otherwise good photo: keep the stored
        # orientation, which is what most viewers show in that case too.
        pass
    try:
        return _to_rgb(img)
    except Exception as exc:
        raise ImageDecodeError(source, f"cannot convert mode {img.mode} to RGB: {exc}") from exc


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """Scale the shorter side to ``size`` and take the centred ``size`` x ``size`` square.

    Done as one resize of the central square (same geometry as resize-then-crop, but only the
    kept pixels are filtered). Returns a writable uint8 array of shape (size, size, 3).
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    if img.mode != "RGB":
        img = _to_rgb(img)
    w, h = img.size
    s = min(w, h)
    box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
    out = img.resize((size, size), _RESAMPLE, box=box, reducing_gap=_REDUCING_GAP)
    return np.array(out, dtype=np.uint8)


def load_image_array(data: bytes, source: str, size: int) -> np.ndarray:
    """Bytes to the model's uint8 (size, size, 3) input: the single train/serve preprocess.

    The full-size raster exists only while :data:`DECODE_BUDGET` holds its pixels (see below)."""
    with DECODE_BUDGET.hold(decoded_pixels(data, size)):
        return resize_center_crop(decode_image(data, source, target_size=size), size)


# -- decode memory: a budget of pixels in flight per process ---------------------------------------
# A file's size says nothing about its raster: a 231 KB PNG of 8,900 x 8,900 pixels passes the
# 80-megapixel limit and needs ~300 MB to decode and resize, and a worker decodes up to
# `inference.reads_in_flight` (32) images at once. Every decode of load_image_array first reserves
# its pixel count (read from the header; a JPEG's is the reduced draft size) and keeps it until the
# full-size raster is gone, so one process never holds more than DECODE_PIXELS_IN_FLIGHT decoded
# pixels (~4 bytes each at the peak), however the day's images are sized. An image larger than
# the budget decodes alone. Waiters are served in arrival order, so a big image is not starved.

DECODE_PIXELS_IN_FLIGHT = 100_000_000
"""Decoded pixels one process holds at once (~5 bytes each at the peak: about 500 MB; the 80 MP
limit fits)."""

# Pillow allocates a raster in blocks of 16 MB by default. glibc serves blocks under its mmap
# threshold (at most 32 MB) from per-thread arenas and keeps them after they are freed, so 32
# decode threads taking turns under the budget still grew the process to 3.1 GB (8 links to one
# 79 MP PNG, measured). Blocks of 64 MB are always mmap-ed and go back to the system on free
# (1.3 GB for the same day): what the budget bounds is then what the process holds. This is
# Pillow's own PILLOW_BLOCK_SIZE setting, applied here so every process that decodes has it.
_BLOCK_BYTES = 64 * 1024 * 1024
if Image.core.get_block_size() < _BLOCK_BYTES:
    Image.core.set_block_size(_BLOCK_BYTES)


class PixelBudget:
    """A counting semaphore of pixels, first come first served (thread-safe, per process)."""

    def __init__(self, pixels: int):
        if pixels <= 0:
            raise ValueError(f"a pixel budget must be positive, got {pixels}")
        self.capacity = int(pixels)
        self.in_use = 0
        self.peak = 0  # the most pixels held at once (for tests and benchmarks)
        self._cond = threading.Condition()
        self._queue: collections.deque[object] = collections.deque()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[int]:
        """Reserve ``pixels`` (at most the whole budget) for the ``with`` block."""
        need = max(0, min(int(pixels), self.capacity))
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            try:
                self._cond.wait_for(lambda: self._queue[0] is ticket and self.in_use + need <= self.capacity)
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()  # the next in line may fit too
            self.in_use += need
            self.peak = max(self.peak, self.in_use)
        try:
            yield need
        finally:
            with self._cond:
                self.in_use -= need
                self._cond.notify_all()


DECODE_BUDGET = PixelBudget(DECODE_PIXELS_IN_FLIGHT)


def decoded_pixels(data: bytes, target_size: int | None = None) -> int:
    """How many pixels decoding ``data`` produces, from its header only (Pillow's lazy open): the
    stored raster, or a JPEG's reduced draft size when ``target_size`` lets it decode smaller (the
    request :func:`decode_image` makes). 0 for bytes without a readable header: the decode then
    fails before it allocates a raster."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if target_size is not None and isinstance(img, JpegImagePlugin.JpegImageFile):
                img.draft("RGB", (target_size, target_size))
            width, height = img.size
    except Exception:  # a bomb over Pillow's own limit, an unknown format: decode_image names it
        return 0
    return width * height


class PreprocessCache:
    """Disk cache of :func:`load_image_array` results keyed by (sha256, size, PREPROCESS_VERSION).

    Files live at ``root/v{PREPROCESS_VERSION}-{size}/sha[:2]/sha.npy`` and are written to a temp
    file then ``os.replace``-d, so concurrent workers or processes never read half a file. An
    unreadable or wrong-shaped file counts as a miss and is rewritten. ``root=None`` disables
    caching (every get decodes). ``hits``/``misses`` count this instance only (each DataLoader
    worker process has its own copy).
    """

    def __init__(self, root: str | Path | None, size: int):
        self.root = Path(root) if root is not None else None
        self.size = int(size)
        self.hits = 0
        self.misses = 0

    def path(self, sha256: str) -> Path:
        if self.root is None:
            raise ValueError("this cache has no root directory")
        if not _SHA256_RE.fullmatch(sha256):
            raise ValueError(f"not a lowercase hex sha256: {sha256!r}")
        # the module global is read on every call, so a version bump takes effect immediately
        return self.root / f"v{PREPROCESS_VERSION}-{self.size}" / sha256[:2] / f"{sha256}.npy"

    def _read(self, path: Path) -> np.ndarray | None:
        try:
            arr = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError):
            return None  # half-written by a killed process, or corrupted on disk
        if arr.shape != (self.size, self.size, 3) or arr.dtype != np.uint8:
            return None
        return arr

    def _write(self, path: Path, arr: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem[:16]}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, arr, allow_pickle=False)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def get(self, sha256: str, loader: Callable[[], bytes], source: str) -> np.ndarray:
        """The preprocessed array for the image whose bytes hash to ``sha256``.

        ``loader`` is only called on a miss; ``source`` names the image in decode errors.
        """
        if self.root is None:
            self.misses += 1
            return load_image_array(loader(), source, self.size)
        path = self.path(sha256)
        arr = self._read(path)
        if arr is not None:
            self.hits += 1
            return arr
        self.misses += 1
        arr = load_image_array(loader(), source, self.size)
        self._write(path, arr)
        return arr


class ImageDataset(torch.utils.data.Dataset):
    """(uint8 (3, size, size) tensor, int label) pairs read through the shared preprocess.

    Without ``sha256s`` but with a cache, the bytes are read and hashed on every access (the
    decode is still saved). ``hflip`` flips half of the samples left-right with torch's RNG, so
    DataLoader worker seeding makes it reproducible.
    """

    def __init__(
        self,
        uris: Sequence[str],
        labels: Sequence[int],
        size: int,
        *,
        cache: PreprocessCache | None = None,
        sha256s: Sequence[str] | None = None,
        read_bytes: Callable[[str], bytes] = storage.read_bytes,
        hflip: bool = False,
    ):
        if len(uris) != len(labels):
            raise ValueError(f"{len(uris)} uris but {len(labels)} labels")
        if sha256s is not None and len(sha256s) != len(uris):
            raise ValueError(f"{len(uris)} uris but {len(sha256s)} sha256s")
        if cache is not None and cache.size != size:
            raise ValueError(f"cache holds size {cache.size} arrays, dataset wants {size}")
        self.uris = list(uris)
        self.labels = [int(y) for y in labels]
        self.size = int(size)
        self.cache = cache
        self.sha256s = list(sha256s) if sha256s is not None else None
        self.read_bytes = read_bytes
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.uris)

    def _verified_bytes(self, uri: str, sha256: str) -> bytes:
        """Bytes that still hash to the ingested sha256 (else the cache would store other content)."""
        data = self.read_bytes(uri)
        if sha256_hex(data) != sha256:
            raise ImageDecodeError(
                uri, f"content changed since ingest (sha256 {sha256[:12]}…); re-run the ingest assets")
        return data

    def _array(self, i: int) -> np.ndarray:
        uri = self.uris[i]
        if self.cache is None:
            return load_image_array(self.read_bytes(uri), uri, self.size)
        if self.sha256s is not None:
            return self.cache.get(self.sha256s[i], lambda: self._verified_bytes(uri, self.sha256s[i]), uri)
        data = self.read_bytes(uri)
        return self.cache.get(sha256_hex(data), lambda: data, uri)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(self._array(i)).permute(2, 0, 1)
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x.contiguous(), self.labels[i]
