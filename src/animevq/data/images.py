"""Robust image decoding: every file becomes an RGB image or a named reason to skip it.

Real illustration folders hold truncated downloads, HTML pages saved as ``.png``, CMYK
scans, 16-bit PNGs, palette images with transparency, phone photos with EXIF rotation and
the occasional decompression bomb. :func:`load_image` turns each into an RGB
``PIL.Image`` or raises :class:`ImageSkipped` with a :class:`SkipReason`; nothing else
escapes it, so one bad file never stops training.

Memory is bounded per file, not only per pixel: before any pixel is decoded, the header's
size and mode give the bytes that decoding and turning the image into RGB keep alive at
once (see :func:`decode_bytes`), and a file that would need more than ``max_bytes`` is
refused as ``too_large``. The conversions keep that number small: transparency and 16-bit
data are converted a strip of rows at a time into one preallocated RGB image, so a file
costs its decoded pixels plus the RGB result, and a few MiB of scratch.
"""

from __future__ import annotations

import enum
import functools
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from animevq.data.names import shown

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
# Only these decoders may run. A file named .png that is really EPS, PSD or ICO is refused
# instead of being handed to an exotic plugin (Pillow's EPS plugin starts Ghostscript).
# MPO (multi-picture JPEG) has its own opener in older Pillow, inside JPEG's in newer ones.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "DIB", "GIF")
# 16384×8192 = 134 MP: above the largest illustrations people post (8K×8K = 67 MP) and under
# twice Pillow's own limit (2×89 MP), where Pillow would refuse before our check runs.
DEFAULT_MAX_PIXELS = 16384 * 8192
# Pillow keeps RGB (padded), RGBA, LA, PA, CMYK and 32-bit pixels in 4 bytes in memory, L, P
# and 1 in one, 16-bit grayscale in two.
_RGB_BYTES = 4
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
# The most one file may take while it is decoded and made RGB, in each worker: 512 MiB, what
# one RGB image of DEFAULT_MAX_PIXELS takes. An 8K×8K RGBA illustration (decoded image plus
# RGB result) fits exactly; a 16384×8192 one, or a 16-bit one of that size, does not.
DEFAULT_MAX_DECODED_BYTES = _RGB_BYTES * DEFAULT_MAX_PIXELS
# Pixels converted at a time: ~1 MiB of RGB per strip, so the strip's scratch copies (its
# crop, RGBA and composite, or float64 values) stay a few MiB beside the full-size images.
STRIP_PIXELS = 1 << 18
# A side under 8 px holds no usable content (icons, tracking pixels, 1×1 spacers).
DEFAULT_MIN_SIDE = 8
_WHITE = (255, 255, 255, 255)
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ROTATING_ORIENTATIONS = range(2, 9)  # EXIF Orientation values that exif_transpose acts on
# libjpeg keeps all DCT coefficients of a progressive JPEG while decoding it: 2 bytes for
# each sample at full size, also when draft() decodes at a reduced scale.
_COEFFICIENT_BYTES = 2
# Pillow's WebP decoder holds three buffers of 4 bytes a pixel besides the decoded image
# (libwebp's animation canvases and the frame's bytes; measured with Pillow 13).
_WEBP_DECODER_BYTES = 3 * 4
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


@functools.cache
def _registered_formats() -> tuple[str, ...]:
    """ALLOWED_FORMATS that this Pillow build can open (Image.open rejects unknown ids)."""
    Image.init()
    return tuple(name for name in ALLOWED_FORMATS if name in Image.OPEN)


class SkipReason(enum.IntEnum):
    """Why a file was left out. Stored as int8 codes in a shared ledger: 0 = not tried
    yet, 1 = loaded fine, so reasons start at 2."""

    EMPTY = 2  # 0-byte file
    UNREADABLE = 3  # the OS would not let us read it (permissions, I/O error)
    NOT_AN_IMAGE = 4  # no allowed decoder recognises the bytes
    TRUNCATED = 5  # header fine, data ends early (interrupted download)
    CORRUPT = 6  # the decoder failed for another reason
    TOO_LARGE = 7  # header claims more than max_pixels or max_bytes: refused before decoding
    TOO_SMALL = 8  # a side shorter than min_side
    UNSUPPORTED_MODE = 9  # a pixel format we cannot turn into RGB
    OUTSIDE_DATA_DIR = 10  # a symlink that leaves data_dir
    BROKEN_LINK = 11  # a symlink to nothing, or a symlink loop
    BAD_INDEX_ROW = 12  # a prepared folder's index row points outside its shard or is malformed

    @property
    def label(self) -> str:
        """The name users see in reports, e.g. ``'not_an_image'``."""
        return self.name.lower()


class ImageSkipped(Exception):
    """Raised by :func:`load_image` for a file that cannot be used, with the reason."""

    def __init__(self, path: str | os.PathLike[str], reason: SkipReason, detail: str) -> None:
        super().__init__(f"{shown(path)}: {reason.label} ({detail})")
        self.path = os.fspath(path)
        self.reason = reason
        self.detail = detail


def load_image(
    path: str | os.PathLike[str],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    min_side: int = DEFAULT_MIN_SIDE,
    target_size: int | None = None,
) -> Image.Image:
    """Decode ``path`` into an upright RGB image of shape (H,W), alpha composited on white.

    The pixel count, and the bytes that decoding and the conversion to RGB need at once
    (:func:`decode_bytes`), are checked from the header before any pixel is decoded
    (``Image.open`` is lazy), so a forged 50000×50000 PNG costs microseconds. An EXIF
    rotation found only after decoding (PNG's eXIf chunk may follow the pixels) is checked
    then, before its copy is made. With ``target_size``, JPEGs are decoded at a reduced DCT
    scale that keeps the short side >= target_size, which is much faster for large photos
    and loses nothing we keep.

    Raises:
        ImageSkipped: with the reason; no other exception leaves for a bad file.
    """
    try:
        if os.stat(path).st_size == 0:
            raise ImageSkipped(path, SkipReason.EMPTY, "0 bytes")
    except OSError as error:
        raise ImageSkipped(path, SkipReason.UNREADABLE, str(error)) from error
    with warnings.catch_warnings():
        # Between Pillow's limit and twice it, Pillow only warns; our own check decides.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(path, formats=_registered_formats())
        except UnidentifiedImageError as error:
            raise ImageSkipped(path, SkipReason.NOT_AN_IMAGE, str(error)) from error
        except Image.DecompressionBombError as error:
            raise ImageSkipped(path, SkipReason.TOO_LARGE, str(error)) from error
        except Exception as error:  # noqa: BLE001 - a malformed header may raise anything
            raise ImageSkipped(path, _failure_reason(error), str(error) or repr(error)) from error
    with image:  # closes the file; the decoded pixels stay usable
        width, height = image.size
        if width * height > max_pixels:
            detail = f"{width}x{height} exceeds max_image_pixels={max_pixels}"
            raise ImageSkipped(path, SkipReason.TOO_LARGE, detail)
        if min(width, height) < min_side:
            detail = f"{width}x{height} has a side under min_image_size={min_side}"
            raise ImageSkipped(path, SkipReason.TOO_SMALL, detail)
        full_size = image.size
        if target_size is not None and image.format in ("JPEG", "MPO"):
            image.draft(None, (target_size, target_size))
        # Reading the EXIF of a PNG without one in its header would decode it: leave that
        # to the check after decoding.
        rotated = "exif" in image.info and _is_rotated(image)
        _check_bytes(image, path, max_bytes, decode_bytes(image, full_size, rotated=rotated))
        _decode(image, path)
        if not rotated and _is_rotated(image):
            after = _mode_bytes(image) + _converted_bytes(image, rotated=True)
            _check_bytes(image, path, max_bytes, after)
        _apply_exif_orientation(image, path)
        return to_rgb(image, path)


def decode_bytes(image: Image.Image, full_size: tuple[int, int], *, rotated: bool) -> int:
    """The most bytes of pixel buffers alive at once while :func:`load_image` decodes the
    opened (not yet loaded) ``image`` and makes it upright RGB; ``full_size`` is its size
    before ``draft``.

    Counted: the decoded image, the decoder's own buffers while it runs (progressive JPEG
    coefficients, WebP's canvases), then the rotated copy or the RGB result (:func:`to_rgb`
    converts in strips, so nothing else of full size). Not counted: a few MiB of strips
    (:data:`STRIP_PIXELS`) and decoder state, and the file's compressed bytes.
    """
    return _mode_bytes(image) + max(_decoder_bytes(image, full_size),
                                    _converted_bytes(image, rotated=rotated))


def _mode_bytes(image: Image.Image) -> int:
    """Bytes of ``image``'s pixels in Pillow's memory layout."""
    return image.width * image.height * _BYTES_PER_PIXEL.get(image.mode, _RGB_BYTES)


def _converted_bytes(image: Image.Image, *, rotated: bool) -> int:
    """Bytes of the full-size image made after decoding: the RGB result, or for an RGB
    image that needs none, the rotated copy (rotating first costs no more: the RGB result
    is at least as large as the decoded image it replaces)."""
    if image.mode != "RGB" or "transparency" in image.info:
        return image.width * image.height * _RGB_BYTES
    return _mode_bytes(image) if rotated else 0


def _decoder_bytes(image: Image.Image, full_size: tuple[int, int]) -> int:
    """Bytes the decoder itself holds while it runs, beyond the decoded image."""
    if image.format == "WEBP":
        return image.width * image.height * _WEBP_DECODER_BYTES
    layers = getattr(image, "layer", None)  # JPEG components: (id, h, v, table)
    if image.format in ("JPEG", "MPO") and image.info.get("progressive") and layers:
        h_max = max(layer[1] for layer in layers)
        v_max = max(layer[2] for layer in layers)
        blocks = math.ceil(full_size[0] / 8 / h_max) * math.ceil(full_size[1] / 8 / v_max)
        samples = 64 * blocks * sum(layer[1] * layer[2] for layer in layers)  # whole MCUs
        return samples * _COEFFICIENT_BYTES
    return 0


def _check_bytes(image: Image.Image, path: str | os.PathLike[str], limit: int, need: int) -> None:
    if need > limit:
        detail = (
            f"{image.width}x{image.height} {image.mode} needs {_mib(need)} to decode and "
            f"convert to RGB, over max_image_bytes={limit} ({_mib(limit)})"
        )
        raise ImageSkipped(path, SkipReason.TOO_LARGE, detail)


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.0f} MiB"


def _is_rotated(image: Image.Image) -> bool:
    """Whether ``image``'s EXIF Orientation makes exif_transpose rotate or flip it."""
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # noqa: BLE001 - broken EXIF is ignored, as in _apply_exif_orientation
        return False
    return orientation in _ROTATING_ORIENTATIONS


def _decode(image: Image.Image, path: str | os.PathLike[str]) -> None:
    """Force decoding, mapping decoder failures to skip reasons."""
    try:
        image.load()
    except MemoryError as error:
        raise ImageSkipped(path, SkipReason.TOO_LARGE, "out of memory while decoding") from error
    except Exception as error:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ...
        raise ImageSkipped(path, _failure_reason(error), str(error) or repr(error)) from error


def _failure_reason(error: Exception) -> SkipReason:
    """OS errors carry an errno (permissions, I/O); Pillow's format errors are OSErrors
    without one, saying "image file is truncated" or "Truncated File Read" when data ends."""
    if isinstance(error, OSError) and error.errno is not None:
        return SkipReason.UNREADABLE
    return SkipReason.TRUNCATED if "truncat" in str(error).lower() else SkipReason.CORRUPT


def _apply_exif_orientation(image: Image.Image, path: str | os.PathLike[str]) -> None:
    """Rotate/flip as the EXIF Orientation tag says (phones store pixels sideways)."""
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as error:  # noqa: BLE001 - broken EXIF must not cost us a good image
        log.debug("ignoring unreadable EXIF in %s: %r", shown(path), error)


def to_rgb(
    image: Image.Image,
    path: str | os.PathLike[str] = "<image>",
    *,
    strip_pixels: int = STRIP_PIXELS,
) -> Image.Image:
    """Any Pillow mode → 8-bit RGB. Transparency is composited on white (line art on a
    transparent background must not turn black); 16-bit data is rescaled, not clipped.

    Both run ``strip_pixels`` pixels (whole rows, at least one) at a time into one RGB
    image, so they cost the RGB result plus a few strips, never whole-image temporaries;
    every pixel is computed as the whole-image formula computes it."""
    mode = image.mode
    try:
        if mode in _ALPHA_MODES or "transparency" in image.info:
            return _in_strips(image, _composite_on_white, strip_pixels)
        if mode == "RGB":
            return image
        if mode in _HIGH_DEPTH_MODES:
            full_scale = _full_scale(image, strip_pixels)
            scale = functools.partial(_rescale_gray, full_scale=full_scale)
            return _in_strips(image, scale, strip_pixels)
        # CMYK, L, 1, P, YCbCr, LAB, HSV. CMYK uses Pillow's naive formula: embedded ICC
        # profiles are ignored, so print-oriented CMYK files may look slightly off.
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ImageSkipped(path, SkipReason.UNSUPPORTED_MODE, f"mode {mode}: {error}") from error


def _strips(image: Image.Image, strip_pixels: int) -> Iterator[tuple[int, Image.Image]]:
    """(top row, copy of the rows from there) for horizontal strips of ~``strip_pixels``."""
    width, height = image.size
    rows = max(1, strip_pixels // max(1, width))
    for top in range(0, height, rows):
        yield top, image.crop((0, top, width, min(height, top + rows)))  # keeps palette, info


def _in_strips(
    image: Image.Image, convert: Callable[[Image.Image], Image.Image], strip_pixels: int
) -> Image.Image:
    """``convert`` (a per-pixel map to RGB) applied to horizontal strips of ``image``,
    pasted into one RGB image of its size."""
    out = Image.new("RGB", image.size)
    for top, strip in _strips(image, strip_pixels):
        out.paste(convert(strip), (0, top))
    return out


def _composite_on_white(strip: Image.Image) -> Image.Image:
    rgba = strip.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")


def _full_scale(image: Image.Image, strip_pixels: int) -> float:
    """The value that maps to 255 for 16/32-bit grayscale, from the global maximum (read
    a strip at a time: Pillow's getextrema refuses I;16B)."""
    high = max(float(np.asarray(strip).max(initial=0)) for _, strip in _strips(image, strip_pixels))
    if image.mode == "F":
        return 1.0 if high <= 1.0 else 255.0
    return max(65535.0, high)  # I;16* and "I" (older Pillow's 16-bit PNGs): 16-bit range


def _rescale_gray(strip: Image.Image, full_scale: float) -> Image.Image:
    """16/32-bit grayscale → 8-bit RGB by rescaling; Pillow's own convert clips at 255,
    which turns a 16-bit PNG almost entirely white. float64 keeps every value of a 32-bit
    ``I`` image exact; on a strip it costs 8 bytes × ``strip_pixels``."""
    values = np.asarray(strip).astype(np.float64)  # (h,W)
    values *= 255.0 / full_scale
    np.clip(np.rint(values, out=values), 0, 255, out=values)
    return Image.fromarray(values.astype(np.uint8)).convert("RGB")
