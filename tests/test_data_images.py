"""open_image / load_resized on a bad-input corpus generated here (no binary fixtures).

The `make_*` builders are reused by the import and archive tests.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from tlcore.data import images
from tlcore.data.images import ImageRejected, load_resized, open_image

# ------------------------------------------------------------ corpus builders


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def make_photo(w: int = 64, h: int = 48, seed: int = 0, fmt: str = "JPEG") -> bytes:
    """A small noisy RGB photo; different seeds give different content."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return encode(Image.fromarray(a), fmt, **({"quality": 90} if fmt == "JPEG" else {}))


def make_truncated_jpeg() -> bytes:
    data = make_photo(256, 256, seed=7)
    return data[: len(data) // 2]


def make_rgba_png() -> bytes:
    a = np.zeros((32, 32, 4), np.uint8)
    a[:, :16] = (255, 0, 0, 255)  # opaque red left
    a[:, 16:] = (0, 0, 255, 0)  # fully transparent right
    return encode(Image.fromarray(a, "RGBA"), "PNG")


def make_la_png() -> bytes:
    a = np.zeros((32, 32, 2), np.uint8)
    a[:, :16] = (0, 255)  # opaque black
    a[:, 16:] = (0, 0)  # transparent
    return encode(Image.fromarray(a, "LA"), "PNG")


def make_16bit_png() -> bytes:
    a = np.zeros((32, 32), np.uint16)
    a[:, :16] = 65535
    a[:, 16:] = 32896  # 128 * 257
    return encode(Image.fromarray(a), "PNG")  # mode I;16


def make_cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95)  # red


def make_grey_jpeg() -> bytes:
    return encode(Image.new("L", (32, 32), 100), "JPEG", quality=95)


def make_palette_gif(transparent: bool = True) -> bytes:
    im = Image.new("P", (32, 32), 0)
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)  # 0 red, 1 green
    im.paste(1, (16, 0, 32, 32))
    return encode(im, "GIF", **({"transparency": 1} if transparent else {}))


def make_animated_gif() -> bytes:
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def make_webp() -> bytes:
    return encode(Image.new("RGB", (32, 32), (0, 200, 0)), "WEBP", lossless=True)


def make_tiff() -> bytes:
    return encode(Image.new("RGB", (32, 32), (0, 0, 200)), "TIFF")


def make_exif_rotated_jpeg() -> bytes:
    """Stored 64 wide x 32 high, left half red, right half blue, EXIF orientation 6.

    Orientation 6 means "rotate 90 degrees clockwise to display": upright it is 32 wide x
    64 high with red on top and blue below.
    """
    a = np.zeros((32, 64, 3), np.uint8)
    a[:, :32] = (255, 0, 0)
    a[:, 32:] = (0, 0, 255)
    im = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(im, "JPEG", quality=95, exif=exif.tobytes())


def make_tiny_png(w: int = 1, h: int = 1) -> bytes:
    return encode(Image.new("RGB", (w, h), (1, 2, 3)), "PNG")


def make_png_header_only(w: int, h: int, bit_depth: int = 1, color_type: int = 0,
                         idat: bytes = b"") -> bytes:
    """A PNG whose IHDR declares w x h; optional IDAT payload (already zlib-compressed)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def make_bomb_png(w: int = 30000, h: int = 30000) -> bytes:
    """A real 1-bit all-black w x h PNG: about 100 KB on disk, w*h pixels when decoded."""
    row = b"\x00" * (1 + (w + 7) // 8)
    z = zlib.compressobj(9)
    parts = [z.compress(row * 1000) for _ in range(h // 1000)]
    parts.append(z.compress(row * (h % 1000)))
    parts.append(z.flush())
    return make_png_header_only(w, h, idat=b"".join(parts))


TEXT = b"just some notes about cats\n"
HTML = b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body>nope</body></html>"


# ---------------------------------------------------------------- good inputs


def test_jpeg_opens_as_rgb(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(make_photo(64, 48))
    im = open_image(path)
    assert im.mode == "RGB" and im.size == (64, 48)
    assert im.info["source_format"] == "JPEG"
    assert images.blob_extension(im) == "jpg"


def test_bytes_and_file_objects_are_accepted():
    data = make_photo()
    assert open_image(data).size == open_image(io.BytesIO(data)).size == (64, 48)


def test_rgba_is_composited_over_white():
    a = np.asarray(open_image(make_rgba_png()))
    assert tuple(a[5, 5]) == (255, 0, 0)
    assert tuple(a[5, 25]) == (255, 255, 255)


def test_la_is_composited_over_white():
    a = np.asarray(open_image(make_la_png()))
    assert tuple(a[5, 5]) == (0, 0, 0) and tuple(a[5, 25]) == (255, 255, 255)


def test_16bit_png_is_scaled_not_clipped():
    raw = Image.open(io.BytesIO(make_16bit_png()))
    assert raw.mode.startswith("I")
    im = open_image(make_16bit_png())
    a = np.asarray(im)
    assert im.mode == "RGB" and im.info["source_mode"].startswith("I")
    assert tuple(a[5, 5]) == (255, 255, 255)
    assert tuple(a[5, 25]) == (128, 128, 128)


def test_cmyk_jpeg_becomes_red():
    r, g, b = np.asarray(open_image(make_cmyk_jpeg()))[16, 16].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_greyscale_becomes_three_equal_channels():
    a = np.asarray(open_image(make_grey_jpeg()))
    assert a.shape == (32, 32, 3) and abs(int(a[10, 10, 0]) - 100) <= 2
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()


def test_palette_gif_with_transparency_is_white_where_transparent():
    a = np.asarray(open_image(make_palette_gif(transparent=True)))
    assert tuple(a[5, 5]) == (255, 0, 0) and tuple(a[5, 25]) == (255, 255, 255)
    b = np.asarray(open_image(make_palette_gif(transparent=False)))
    assert tuple(b[5, 25]) == (0, 255, 0)


def test_animated_gif_gives_first_frame():
    im = open_image(make_animated_gif())
    assert tuple(np.asarray(im)[16, 16]) == (255, 0, 0)


def test_webp_and_tiff():
    assert tuple(np.asarray(open_image(make_webp()))[3, 3]) == (0, 200, 0)
    tif = open_image(make_tiff())
    assert tuple(np.asarray(tif)[3, 3]) == (0, 0, 200) and images.blob_extension(tif) == "tif"


def test_exif_orientation_is_applied():
    im = open_image(make_exif_rotated_jpeg())
    assert im.size == (32, 64)  # portrait once upright
    a = np.asarray(im).astype(int)
    top, bottom = a[8, 16], a[56, 16]
    assert top[0] > 200 and top[2] < 60, top  # red on top
    assert bottom[2] > 200 and bottom[0] < 60, bottom  # blue below


def test_a_big_jpeg_decodes_at_a_fraction_of_its_size_and_keeps_its_full_size_and_look():
    """A 2400x1600 photo (smooth, like a real one) at 64 px: `load_resized` drafts it, close to a full decode."""
    import time

    y, x = np.mgrid[0:1600, 0:2400]
    a = np.stack([x * 255 // 2400, y * 255 // 1600, (x + y) * 255 // 4000], axis=-1).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown portrait: 1600 wide, 2400 high
    data = encode(Image.fromarray(a), "JPEG", quality=90, exif=exif.tobytes())

    started = time.perf_counter()
    drafted = open_image(data, at_least=128)
    drafted_s = time.perf_counter() - started
    started = time.perf_counter()
    full = open_image(data)
    print(f"2400x1600 JPEG: drafted {drafted_s * 1000:.0f} ms, full {(time.perf_counter() - started) * 1000:.0f} ms")
    assert full.size == full.info["full_size"] == (1600, 2400)
    assert drafted.info["full_size"] == (1600, 2400) and drafted.size == (200, 300)  # 1/8, both sides >= 128
    small = load_resized(data, 64).astype(int)
    exact = np.asarray(full.resize((64, 64), Image.BILINEAR)).astype(int)
    assert np.abs(small - exact).mean() < 2.0
    assert open_image(make_photo(64, 48), at_least=128).size == (64, 48)  # small images decode as before


# ----------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "data, reason, words",
    [
        (b"", "empty", "empty file"),
        (TEXT, "not_image", "text file"),
        (HTML, "not_image", "HTML"),
        (b"\x00\x01\x02garbage" * 10, "not_image", "not an image"),
        (make_truncated_jpeg(), "corrupt", "truncated or corrupt"),
        (make_tiny_png(1, 1), "too_small", "1x1 px"),
        (make_tiny_png(200, 15), "too_small", "at least 16 px"),
        # a header that is a PNG but no valid pixel data
        (make_png_header_only(64, 64, bit_depth=8, color_type=2, idat=b"not zlib"), "corrupt", "decoded"),
    ],
    ids=["empty", "text", "html", "binary-garbage", "truncated-jpeg", "1x1", "15px-high", "bad-idat"],
)
def test_rejections(tmp_path, data, reason, words):
    path = tmp_path / "cat.jpg"
    path.write_bytes(data)
    with pytest.raises(ImageRejected) as info:
        open_image(path)
    assert info.value.reason == reason
    assert words in info.value.message and "cat.jpg" in info.value.message
    assert isinstance(info.value, ValueError)


def test_truncated_images_are_not_loaded_leniently():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(ImageRejected):
        open_image(make_truncated_jpeg())
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_decompression_bomb_is_refused_from_the_header():
    data = make_bomb_png(30000, 30000)
    assert len(data) < 300_000  # a small file...
    with pytest.raises(ImageRejected) as info:
        open_image(data, name="bomb.png")  # ...that would be 900 megapixels decoded
    assert info.value.reason == "too_large"
    assert "bomb.png" in info.value.message and "megapixels" in info.value.message


def test_image_above_our_limit_but_below_pillows_is_refused_with_its_size():
    # 10000 x 6000 = 60 MP: over MAX_PIXELS (50 MP), under Pillow's own warning threshold.
    with pytest.raises(ImageRejected) as info:
        open_image(make_bomb_png(10000, 6000), name="big.png")
    assert info.value.reason == "too_large" and "10000x6000" in info.value.message


def test_pillow_bomb_warning_is_an_error(monkeypatch):
    # Shrink Pillow's limit so a modest image triggers its warning; we must refuse, not warn.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageRejected) as info:
        open_image(make_photo(40, 40))  # 1600 px: between 1x and 2x the limit -> warning
    assert info.value.reason == "too_large"


def test_missing_file_is_unreadable(tmp_path):
    with pytest.raises(ImageRejected) as info:
        open_image(tmp_path / "nope.jpg")
    assert info.value.reason == "unreadable" and "nope.jpg" in info.value.message


# ---------------------------------------------------------------- load_resized


def test_load_resized_shape_dtype_and_squash(tmp_path):
    path = tmp_path / "wide.png"
    a = np.zeros((20, 80, 3), np.uint8)
    a[:, :40] = (255, 0, 0)
    a[:, 40:] = (0, 0, 255)
    Image.fromarray(a).save(path)
    out = load_resized(path, 32)
    assert out.dtype == np.uint8 and out.shape == (32, 32, 3) and out.flags.writeable
    assert tuple(out[16, 2]) == (255, 0, 0) and tuple(out[16, 29]) == (0, 0, 255)
    # exactly PIL bilinear of the upright RGB image
    expected = np.asarray(Image.fromarray(a).resize((32, 32), Image.BILINEAR))
    np.testing.assert_array_equal(out, expected)


def test_load_resized_is_upright(tmp_path):
    path = tmp_path / "rotated.jpg"
    path.write_bytes(make_exif_rotated_jpeg())
    out = load_resized(path, 16).astype(int)
    assert out[2, 8, 0] > 200 and out[13, 8, 2] > 200  # red top, blue bottom


@pytest.mark.parametrize("size", [0, -1, 5000, 2.5, "224", True])
def test_load_resized_rejects_bad_size(tmp_path, size):
    path = tmp_path / "a.jpg"
    path.write_bytes(make_photo())
    with pytest.raises(ValueError, match="`size` must be an integer"):
        load_resized(path, size)


def test_load_resized_raises_image_rejected(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_bytes(TEXT)
    with pytest.raises(ImageRejected):
        load_resized(path, 32)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pillow_limit_is_honoured_off_the_main_thread(monkeypatch):
    import concurrent.futures

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with pytest.raises(ImageRejected) as info:
            pool.submit(open_image, make_photo(40, 40)).result()
    assert info.value.reason == "too_large"
