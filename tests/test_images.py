"""Decode, preprocess, cache and Dataset behaviour on real phone photos and crafted bad files."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image

from sofar_assets.lib.data import images
from sofar_assets.lib.data.images import (
    ImageDataset,
    ImageDecodeError,
    PreprocessCache,
    decode_image,
    load_image_array,
    resize_center_crop,
    sha256_hex,
)

SAMPLES = Path(__file__).resolve().parents[2] / "shared/data/sofar-public-samples"


def sample_photos() -> list[Path]:
    photos = sorted(SAMPLES.glob("*/*/*.jpg"))
    if not photos:
        pytest.skip(f"real sample photos not found under {SAMPLES}")
    return photos


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def two_colour(w: int = 40, h: int = 20) -> Image.Image:
    """Left half red, right half blue: asymmetric, so flips and rotations are visible."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (255, 0, 0)
    a[:, w // 2 :] = (0, 0, 255)
    return Image.fromarray(a)


def stored_orientation(path: Path) -> tuple[tuple[int, int], int]:
    with Image.open(path) as im:
        return im.size, im.getexif().get(ExifTags.Base.Orientation, 1)


# ---------------------------------------------------------------- real photos


def test_real_photos_decode_upright():
    photos = sample_photos()
    rotated = 0
    for path in photos:
        (w, h), orientation = stored_orientation(path)
        img = decode_image(path.read_bytes(), str(path))
        assert img.mode == "RGB"
        expected = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
        assert img.size == expected, f"{path}: orientation {orientation}, stored {(w, h)}"
        rotated += orientation in (5, 6, 7, 8)
    assert rotated >= 10  # the sample set is mostly orientation-6 phone shots; the test needs them


def test_draft_path_keeps_orientation_and_min_side():
    for path in sample_photos():
        data = path.read_bytes()
        full = decode_image(data, str(path))
        small = decode_image(data, str(path), target_size=224)
        assert (small.width > small.height) == (full.width > full.height)
        assert min(small.size) >= 224
        # the DCT scaling really engaged: every sample has a shorter side >= 1080 = 4 * 270
        ceil_div = [(-(-full.width // s), -(-full.height // s)) for s in (2, 4, 8)]
        assert small.size in ceil_div, f"{path}: {full.size} -> {small.size}"


def test_load_image_array_matches_full_decode():
    for path in sample_photos():
        data = path.read_bytes()
        arr = load_image_array(data, str(path), 224)
        assert arr.shape == (224, 224, 3) and arr.dtype == np.uint8
        reference = resize_center_crop(decode_image(data, str(path)), 224)
        # draft changes pixels slightly (DCT scaling), never the framing or orientation
        diff = np.abs(arr.astype(np.int16) - reference.astype(np.int16)).mean()
        assert diff < 3.5, f"{path}: mean abs diff {diff:.2f}"


# ---------------------------------------------------------------- generated files


def test_empty_file(tmp_path):
    with pytest.raises(ImageDecodeError) as err:
        decode_image(b"", "uploads/empty.jpg")
    assert str(err.value) == "uploads/empty.jpg: empty file"
    assert err.value.source == "uploads/empty.jpg" and err.value.reason == "empty file"


def test_text_named_jpg(tmp_path):
    path = tmp_path / "receipt.jpg"
    path.write_text("this is a text file, not a photo\n")
    with pytest.raises(ImageDecodeError) as err:
        decode_image(path.read_bytes(), str(path))
    assert str(err.value).startswith(f"{path}: not a recognised image format")


def test_truncated_jpeg_is_an_error():
    data = encode(Image.effect_noise((256, 256), 60).convert("RGB"), "JPEG", quality=90)
    for target_size in (None, 64):
        with pytest.raises(ImageDecodeError) as err:
            decode_image(data[: len(data) // 2], "cut.jpg", target_size=target_size)
        assert err.value.source == "cut.jpg"
        assert "truncated" in err.value.reason


def test_truncated_real_photo_is_an_error():
    path = sample_photos()[0]
    data = path.read_bytes()
    with pytest.raises(ImageDecodeError, match="truncated"):
        load_image_array(data[: len(data) // 2], str(path), 224)


def test_jpeg_named_png_decodes(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(encode(two_colour(), "JPEG", quality=95))
    img = decode_image(path.read_bytes(), str(path))
    a = np.asarray(img)
    assert img.mode == "RGB" and img.size == (40, 20)
    assert a[10, 5, 0] > 230 and a[10, 5, 2] < 30  # red on the left
    assert a[10, 35, 2] > 230 and a[10, 35, 0] < 30  # blue on the right


def test_mpo_first_frame_uses_draft():
    frames = [Image.new("RGB", (512, 384), (255, 0, 0)), Image.new("RGB", (512, 384), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "MPO", save_all=True, append_images=frames[1:], quality=95)
    assert Image.open(io.BytesIO(buf.getvalue())).format == "MPO"
    img = decode_image(buf.getvalue(), "phone.jpg", target_size=64)
    assert img.size == (128, 96)  # 1/4 scale: 384 // 64 = 6 -> largest power of two 4
    r, g, b = np.asarray(img)[48, 64]
    assert r > 230 and g < 30 and b < 30


def test_cmyk_jpeg():
    data = encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    r, g, b = np.asarray(decode_image(data, "cmyk.jpg"))[16, 16]
    assert r > 230 and g < 30 and b < 30


def test_16bit_grayscale_png_scaled_not_clipped():
    ramp = np.tile(np.linspace(0, 65535, 512).round().astype(np.uint16), (3, 1))
    data = encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    a = np.asarray(decode_image(data, "ramp16.png"))
    row = a[1, :, 0].astype(int)
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    assert row[0] == 0 and row[-1] == 255 and row[256] in (127, 128)
    assert (np.diff(row) >= 0).all()
    assert len(np.unique(row)) == 256  # clipping would give a handful of values, mostly 255


def test_palette_png_transparency_is_white():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 255, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    img.putpixel((1, 1), 1)
    data = encode(img, "PNG", transparency=0)  # palette index 0 (green) is fully transparent
    a = np.asarray(decode_image(data, "pal.png"))
    assert tuple(a[0, 0]) == (255, 255, 255)
    assert tuple(a[1, 1]) == (255, 0, 0)


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)
    assert Image.open(io.BytesIO(buf.getvalue())).n_frames == 3
    a = np.asarray(decode_image(buf.getvalue(), "anim.gif"))
    assert a.shape == (16, 16, 3) and (a == (255, 0, 0)).all()


def _png_with_header_dims(width: int, height: int) -> bytes:
    """A valid tiny PNG whose IHDR (with a correct CRC) claims ``width`` x ``height``."""
    png = encode(Image.new("L", (8, 8)), "PNG")
    body = b"IHDR" + struct.pack(">II", width, height) + png[24:29]
    return png[:12] + body + zlib.crc32(body).to_bytes(4, "big") + png[33:]


def test_decompression_bomb_header_refused_before_decode():
    data = _png_with_header_dims(100_000, 100_000)
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data, "bomb.png")
    assert str(err.value) == (
        "bomb.png: decompression bomb: 100000 x 100000 pixels exceeds max_pixels=80000000"
    )


def test_max_pixels_is_per_call():
    data = encode(Image.new("RGB", (300, 200), (10, 20, 30)), "PNG")
    with pytest.raises(ImageDecodeError, match=r"300 x 200 pixels exceeds max_pixels=59999"):
        decode_image(data, "big.png", max_pixels=59_999)
    assert decode_image(data, "big.png", max_pixels=60_000).size == (300, 200)
    # a raised limit is honoured even beyond Pillow's own global bomb limit: the 1e10-pixel
    # header passes our check and the (absent) pixel data is what fails
    with pytest.raises(ImageDecodeError) as err:
        decode_image(_png_with_header_dims(100_000, 100_000), "huge.png", max_pixels=10**11)
    assert "decompression bomb" not in err.value.reason


def test_grayscale_and_rgba():
    grey = Image.fromarray(np.tile(np.arange(0, 256, 16, dtype=np.uint8), (4, 1)))
    a = np.asarray(decode_image(encode(grey, "PNG"), "grey.png"))
    assert a.shape == (4, 16, 3) and (a[0, :, 0] == np.arange(0, 256, 16)).all()
    assert (a[..., 0] == a[..., 2]).all()
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (0, 0, 255, 255)  # opaque blue
    rgba[0, 1] = (0, 0, 255, 0)  # fully transparent -> white
    rgba[1, 0] = (0, 0, 0, 128)  # half black over white -> ~127 grey
    out = np.asarray(decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), "a.png")).astype(int)
    assert tuple(out[0, 0]) == (0, 0, 255)
    assert tuple(out[0, 1]) == (255, 255, 255)
    assert all(abs(v - 127) <= 1 for v in out[1, 0])


def test_generated_exif_rotation():
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # stored raster must be turned 90 degrees clockwise
    data = encode(two_colour(40, 20), "JPEG", quality=95, exif=exif)
    img = decode_image(data, "rot.jpg")
    a = np.asarray(img)
    assert img.size == (20, 40)
    assert a[5, 10, 0] > 230 and a[5, 10, 2] < 30  # stored left (red) is now on top
    assert a[35, 10, 2] > 230 and a[35, 10, 0] < 30


def test_resize_center_crop_geometry():
    # 300 x 100: a 100-wide centre square (x 100..200) survives; mark it green, sides red
    a = np.zeros((100, 300, 3), np.uint8)
    a[:, :] = (255, 0, 0)
    a[:, 100:200] = (0, 255, 0)
    out = resize_center_crop(Image.fromarray(a), 50)
    assert out.shape == (50, 50, 3) and out.dtype == np.uint8 and out.flags.writeable
    assert (out[:, 2:-2] == (0, 255, 0)).all()


# ---------------------------------------------------------------- cache


class CountingLoader:
    def __init__(self, data: bytes):
        self.data = data
        self.calls = 0

    def __call__(self) -> bytes:
        self.calls += 1
        return self.data


def _jpeg() -> tuple[bytes, str]:
    data = encode(two_colour(64, 48), "JPEG", quality=90)
    return data, sha256_hex(data)


def test_cache_hit_skips_loader_and_equals_uncached(tmp_path):
    data, sha = _jpeg()
    cache = PreprocessCache(tmp_path, 32)
    loader = CountingLoader(data)
    first = cache.get(sha, loader, "x.jpg")
    second = cache.get(sha, loader, "x.jpg")
    assert loader.calls == 1 and (cache.hits, cache.misses) == (1, 1)
    expected = load_image_array(data, "x.jpg", 32)
    assert np.array_equal(first, expected) and np.array_equal(second, expected)
    assert cache.path(sha) == tmp_path / f"v{images.PREPROCESS_VERSION}-32" / sha[:2] / f"{sha}.npy"
    assert cache.path(sha).is_file()
    assert not list(cache.path(sha).parent.glob("*.tmp"))


def test_cache_size_and_version_are_part_of_the_key(tmp_path, monkeypatch):
    data, sha = _jpeg()
    PreprocessCache(tmp_path, 32).get(sha, CountingLoader(data), "x.jpg")
    other_size = PreprocessCache(tmp_path, 24)
    loader = CountingLoader(data)
    assert other_size.get(sha, loader, "x.jpg").shape == (24, 24, 3)
    assert loader.calls == 1 and other_size.misses == 1
    monkeypatch.setattr(images, "PREPROCESS_VERSION", "999")
    bumped = PreprocessCache(tmp_path, 32)
    bumped.get(sha, loader, "x.jpg")
    assert loader.calls == 2 and bumped.misses == 1
    assert (tmp_path / "v999-32" / sha[:2] / f"{sha}.npy").is_file()


@pytest.mark.parametrize("damage", ["garbage", "half"])
def test_corrupt_cache_file_is_rewritten(tmp_path, damage):
    data, sha = _jpeg()
    cache = PreprocessCache(tmp_path, 32)
    good = cache.get(sha, CountingLoader(data), "x.jpg")
    path = cache.path(sha)
    raw = path.read_bytes()
    path.write_bytes(b"\x00not npy" * 10 if damage == "garbage" else raw[: len(raw) // 2])
    loader = CountingLoader(data)
    again = cache.get(sha, loader, "x.jpg")
    assert loader.calls == 1 and cache.misses == 2 and np.array_equal(again, good)
    assert path.read_bytes() == raw
    assert cache.get(sha, loader, "x.jpg") is not None and loader.calls == 1 and cache.hits == 1


def test_cache_write_crash_leaves_no_file(tmp_path, monkeypatch):
    data, sha = _jpeg()
    cache = PreprocessCache(tmp_path, 32)

    def crashing_save(f, arr, allow_pickle=False):
        f.write(b"\x93NUMPY partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(images.np, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        cache.get(sha, CountingLoader(data), "x.jpg")
    assert not cache.path(sha).exists()
    assert list(cache.path(sha).parent.iterdir()) == []


def test_cache_without_root_passes_through(tmp_path):
    data, sha = _jpeg()
    cache = PreprocessCache(None, 32)
    loader = CountingLoader(data)
    a = cache.get(sha, loader, "x.jpg")
    cache.get(sha, loader, "x.jpg")
    assert loader.calls == 2 and cache.hits == 0 and cache.misses == 2
    assert np.array_equal(a, load_image_array(data, "x.jpg", 32))


def test_cache_rejects_non_sha_keys(tmp_path):
    with pytest.raises(ValueError):
        PreprocessCache(tmp_path, 32).get("../../etc/passwd", CountingLoader(b""), "x")


def test_cache_decode_error_names_source_and_writes_nothing(tmp_path):
    cache = PreprocessCache(tmp_path, 32)
    with pytest.raises(ImageDecodeError, match=r"^gs://bucket/a\.jpg: empty file$"):
        cache.get(sha256_hex(b""), CountingLoader(b""), "gs://bucket/a.jpg")
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


# ---------------------------------------------------------------- dataset


def test_dataset_items(tmp_path):
    paths = []
    for i, fmt in enumerate(["JPEG", "PNG"]):
        p = tmp_path / f"{i}.png"  # the JPEG is misnamed on purpose
        p.write_bytes(encode(two_colour(60, 30), fmt))
        paths.append(str(p))
    ds = ImageDataset(paths, [3, 1], 24)
    assert len(ds) == 2
    for i, label in enumerate([3, 1]):
        x, y = ds[i]
        assert x.dtype == torch.uint8 and x.shape == (3, 24, 24) and x.is_contiguous()
        assert y == label and type(y) is int
        assert x[0, 12, 2] > 200 and x[2, 12, 21] > 200  # red left, blue right
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch[0].shape == (2, 3, 24, 24) and batch[1].tolist() == [3, 1]


def test_dataset_cache_with_sha256s_skips_reads(tmp_path):
    data, sha = _jpeg()
    reads = []

    def read_bytes(uri):
        reads.append(uri)
        return data

    cache = PreprocessCache(tmp_path / "cache", 32)
    ds = ImageDataset(["mem://a"], [0], 32, cache=cache, sha256s=[sha], read_bytes=read_bytes)
    x1, _ = ds[0]
    x2, _ = ds[0]
    assert reads == ["mem://a"] and cache.hits == 1
    assert torch.equal(x1, x2)
    assert torch.equal(x1, torch.from_numpy(load_image_array(data, "a", 32)).permute(2, 0, 1))
    ds_no_sha = ImageDataset(["mem://a"], [0], 32, cache=cache, read_bytes=read_bytes)
    assert torch.equal(ds_no_sha[0][0], x1) and cache.hits == 2  # same key, hashed from bytes


def test_dataset_hflip(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(encode(two_colour(48, 48), "PNG"))
    plain = ImageDataset([str(path)], [0], 32)[0][0]
    ds = ImageDataset([str(path)], [0], 32, hflip=True)
    torch.manual_seed(0)
    draws = [ds[0][0] for _ in range(40)]
    flipped = [bool(torch.equal(x, plain.flip(-1))) for x in draws]
    assert all(f or torch.equal(x, plain) for f, x in zip(flipped, draws, strict=True))
    assert 5 < sum(flipped) < 35
    torch.manual_seed(0)
    assert [bool(torch.equal(ds[0][0], plain.flip(-1))) for _ in range(40)] == flipped


def test_dataset_propagates_named_errors(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="broken.jpg: empty file"):
        ImageDataset([str(bad)], [0], 32)[0]
    with pytest.raises(ValueError):
        ImageDataset([str(bad)], [0, 1], 32)
    with pytest.raises(ValueError):
        ImageDataset([str(bad)], [0], 32, cache=PreprocessCache(None, 64))


def test_dataset_refuses_bytes_that_changed_since_ingest(tmp_path):
    from PIL import Image as _Image

    path = tmp_path / "photo.png"
    _Image.new("RGB", (40, 40), (255, 0, 0)).save(path)
    red_sha = sha256_hex(path.read_bytes())
    _Image.new("RGB", (40, 40), (0, 0, 255)).save(path)  # replaced after ingest
    cache = PreprocessCache(tmp_path / "cache", 16)
    ds = ImageDataset([str(path)], [0], 16, cache=cache, sha256s=[red_sha])
    with pytest.raises(ImageDecodeError, match="content changed since ingest"):
        ds[0]
    assert not cache.path(red_sha).exists()  # nothing was cached under the old hash
