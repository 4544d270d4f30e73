"""Decoding and validating one image: the one way pixels are made.

`open_image` turns a file (or its bytes) into a fully decoded, upright RGB `PIL.Image`, or
raises `ImageRejected` with a short reason code and a plain sentence. `load_resized` is what
the training cache and `predict` both call, so a raw file at demo time becomes exactly the
pixels evaluation saw.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tlcore.errors import ImageRejected, InvalidInput

# Either side below this is not a photo worth training on (a tracking pixel, an icon).
MIN_SIDE = 16
# Width x height read from the header, checked before any pixel is decoded.
MAX_PIXELS = 50_000_000
# Bytes read from disk for one image; a bigger file is refused before it is read.
MAX_FILE_BYTES = 256 * 1024 * 1024

# Pillow's format name -> the extension a blob of that content gets.
FORMAT_EXTENSIONS = {
    "JPEG": "jpg",
    "MPO": "jpg",
    "PNG": "png",
    "GIF": "gif",
    "WEBP": "webp",
    "TIFF": "tif",
    "BMP": "bmp",
    "ICO": "ico",
    "PPM": "ppm",
    "TGA": "tga",
}

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]


def read_bytes(path: str | os.PathLike, name: str | None = None) -> bytes:
    """The bytes of an image file, refusing an unreadable or oversized one with `ImageRejected`."""
    name = name or Path(path).name
    try:
        size = os.stat(path).st_size
        if size > MAX_FILE_BYTES:
            raise ImageRejected(
                "too_large",
                f"{name} is {size / 2**20:.0f} MB; image files up to "
                f"{MAX_FILE_BYTES // 2**20} MB are accepted. Shrink or recompress it.",
            )
        with open(path, "rb") as f:
            return f.read(MAX_FILE_BYTES + 1)
    except ImageRejected:
        raise
    except OSError as e:
        raise ImageRejected(
            "unreadable", f"{name} could not be read ({e.strerror or e}). Check that it exists "
            "and that its permissions allow reading."
        ) from e


def open_image(source: ImageSource, name: str | None = None, *, at_least: int | None = None) -> Image.Image:
    """Open, fully decode and normalise one image.

    Args:
        source: a path, the file's bytes, or a binary file object.
        name: how to call the file in messages. Defaults to the file name, or "the image".
        at_least: a JPEG is decoded at the smallest of 1/2, 1/4 or 1/8 of its size that keeps both
            sides at least this many pixels (`Image.draft`: every byte is still decoded, so damage
            still shows, but a 12-megapixel photo takes a third of the time and a sixteenth of the
            memory). None decodes at full size.

    Returns:
        An RGB `PIL.Image`, EXIF-transposed upright, independent of any open file. Its
        `info` holds `source_format` (e.g. "JPEG"), `source_mode` (e.g. "CMYK") and
        `full_size` (upright width and height before any draft scaling).

    Raises:
        ImageRejected: empty, not an image, truncated or corrupt, smaller than
            `MIN_SIDE` px on a side, or larger than `MAX_PIXELS` (decompression bombs).
    """
    if isinstance(source, (str, os.PathLike)):
        name = name or Path(source).name
        data = read_bytes(source, name)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        data = source.read()
    name = name or "the image"
    if not data:
        raise ImageRejected("empty", f"{name} is an empty file (0 bytes). Remove it or export it again.")
    if len(data) > MAX_FILE_BYTES:
        raise ImageRejected(
            "too_large",
            f"{name} is over {MAX_FILE_BYTES // 2**20} MB; shrink or recompress it.",
        )

    with _bomb_warnings_as_errors():
        try:
            im = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as e:
            raise ImageRejected("not_image", _not_image_message(name, data)) from e
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageRejected("too_large", _too_large_message(name, None)) from e
        except Exception as e:  # a recognised format whose header is broken
            raise ImageRejected(
                "corrupt", f"{name} looks like an image but its header is damaged ({e}). "
                "Export or download it again."
            ) from e
        fmt = im.format or "unknown"
        width, height = im.size
        if width * height > _pixel_limit():
            raise ImageRejected("too_large", _too_large_message(name, (width, height)))
        if min(width, height) < MIN_SIDE:
            raise ImageRejected(
                "too_small",
                f"{name} is {width}x{height} px; images need at least {MIN_SIDE} px on each "
                "side. Remove it or use a larger version.",
            )
        try:
            im.seek(0)  # the first frame of an animation
            if at_least and fmt in ("JPEG", "MPO"):
                im.draft(None, (at_least, at_least))
            im.load()  # decode every pixel now: truncation and corruption surface here
            mode = im.mode
            turned = im.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF orientations that swap the sides
            full_size = (height, width) if turned else (width, height)
            im = ImageOps.exif_transpose(im)
            rgb = _to_rgb(im)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageRejected("too_large", _too_large_message(name, (width, height))) from e
        except MemoryError as e:
            raise ImageRejected("too_large", _too_large_message(name, (width, height))) from e
        except Exception as e:
            raise ImageRejected(
                "corrupt", f"{name} is truncated or corrupt ({_short(e)}); it could not be fully "
                "decoded. Export or download it again."
            ) from e
    rgb.info["source_format"] = fmt
    rgb.info["source_mode"] = mode
    rgb.info["full_size"] = full_size
    return rgb


def load_resized(path: ImageSource, size: int, name: str | None = None) -> np.ndarray:
    """The pixels of one image for training and prediction.

    `open_image` (upright RGB), then PIL bilinear resize to exactly `size` x `size` (aspect
    squashed, as Keras' `image_dataset_from_directory` does). `name` is how messages call the
    image (defaults as in `open_image`).

    Returns:
        `np.ndarray` of dtype uint8 and shape `(size, size, 3)`.

    Raises:
        ValueError: `size` is not an integer between 1 and 4096.
        ImageRejected: the file is not a usable image.
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 1 <= size <= 4096:
        raise InvalidInput(f"`size` must be an integer between 1 and 4096. Received: size={size!r}")
    size = int(size)
    # Decoding at twice the target size or more keeps the bilinear resize's quality; images under
    # twice the size (most datasets at 224 px) decode exactly as before.
    image = open_image(path, name, at_least=2 * size)
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8).copy()


def blob_extension(image: Image.Image, fallback: str = "img") -> str:
    """The file extension for an image's original bytes, from the format it was decoded as."""
    fmt = image.info.get("source_format", "")
    return FORMAT_EXTENSIONS.get(fmt, fmt.lower() or fallback)


# ---------------------------------------------------------------- helpers


@contextmanager
def _bomb_warnings_as_errors():
    # Pillow warns (instead of raising) on images between MAX_IMAGE_PIXELS and twice that;
    # we treat the warning as an error. `warnings.catch_warnings` swaps process-wide state and
    # is not thread-safe on Python 3.11, so it is used on the main thread only; elsewhere the
    # header check (MAX_PIXELS is below Pillow's limit) already refuses those images.
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _pixel_limit() -> int:
    # Never above Pillow's own bomb threshold, should someone lower it process-wide.
    return min(MAX_PIXELS, Image.MAX_IMAGE_PIXELS or MAX_PIXELS)


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im.copy() if im.readonly else im
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _high_bit_depth_to_rgb(im)
    if mode == "P" and "transparency" not in im.info:
        return im.convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    # L, 1, CMYK, YCbCr, LAB, HSV: Pillow's conversions are the standard ones.
    return im.convert("RGB")


def _high_bit_depth_to_rgb(im: Image.Image) -> Image.Image:
    """16-bit (or 32-bit int / float) greyscale scaled, not clipped, to 8 bits."""
    a = np.asarray(im)
    if im.mode == "F":
        a = np.nan_to_num(a.astype(np.float64))
        top = 1.0 if a.max(initial=0) <= 1.0 else 255.0 if a.max(initial=0) <= 255.0 else 65535.0
        a8 = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    else:
        a = a.astype(np.int64)
        if im.mode == "I" and a.max(initial=0) <= 255 and a.min(initial=0) >= 0:
            a8 = a.astype(np.uint8)  # 8-bit data stored in a 32-bit container
        else:
            a8 = ((np.clip(a, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(a8, mode="L").convert("RGB")


def _not_image_message(name: str, data: bytes) -> str:
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml")) or b"<html" in head:
        what = "an HTML or XML page (perhaps a web page saved with an image name)"
    elif _looks_like_text(data[:1024]):
        what = "a text file"
    else:
        what = "not in an image format Pillow can read"
    return (f"{name} is not an image: it is {what}. Only JPEG, PNG, GIF, WebP, BMP and TIFF "
            "files are imported; remove it or replace it with the real image.")


def _looks_like_text(chunk: bytes) -> bool:
    if b"\x00" in chunk:
        return False
    try:
        chunk.decode("utf-8")
        return True
    except UnicodeDecodeError as e:
        return e.start > len(chunk) - 4  # a multi-byte character cut at the end


def _too_large_message(name: str, size: tuple[int, int] | None) -> str:
    dims = f" is {size[0]}x{size[1]} px ({size[0] * size[1] / 1e6:.0f} megapixels);" if size else \
        " declares far too many pixels (a possible decompression bomb);"
    return (f"{name}{dims} images up to {_pixel_limit() / 1e6:g} megapixels are accepted. "
            "Downscale it before importing.")


def _short(e: Exception) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) < 120 else text[:117] + "..."

