"""Robust image decoding: every file becomes an RGB image or a named reason to skip it.

Real illustration folders hold truncated downloads, HTML pages saved as ``.png``, CMYK
scans, 16-bit PNGs, palette images with transparency, phone photos with EXIF rotation and
the occasional decompression bomb. :func:`load_image` turns each into an RGB
``PIL.Image`` or raises :class:`ImageSkipped` with a :class:`SkipReason`; nothing else
escapes it, so one bad file never stops training.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
# Only these decoders may run. A file named .png that is really EPS, PSD or ICO is refused
# instead of being handed to an exotic plugin (Pillow's EPS plugin starts Ghostscript).
# MPO (multi-picture JPEG) has its own opener in older Pillow, inside JPEG's in newer ones.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "DIB", "GIF")
# 16384×8192 = 134 MP: above the largest illustrations people post (8K×8K = 67 MP) and under
# twice Pillow's own limit (2×89 MP), where Pillow would refuse before our check runs. One
# such image costs ~0.5 GB as RGBA in each worker, the most we let one file take.
DEFAULT_MAX_PIXELS = 16384 * 8192
# A side under 8 px holds no usable content (icons, tracking pixels, 1×1 spacers).
DEFAULT_MIN_SIDE = 8
_WHITE = (255, 255, 255, 255)
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
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
    TOO_LARGE = 7  # header claims more than max_pixels: refused before decoding
    TOO_SMALL = 8  # a side shorter than min_side
    UNSUPPORTED_MODE = 9  # a pixel format we cannot turn into RGB
    OUTSIDE_DATA_DIR = 10  # a symlink that leaves data_dir
    BROKEN_LINK = 11  # a symlink to nothing, or a symlink loop

    @property
    def label(self) -> str:
        """The name users see in reports, e.g. ``'not_an_image'``."""
        return self.name.lower()


class ImageSkipped(Exception):
    """Raised by :func:`load_image` for a file that cannot be used, with the reason."""

    def __init__(self, path: str | os.PathLike[str], reason: SkipReason, detail: str) -> None:
        super().__init__(f"{os.fspath(path)}: {reason.label} ({detail})")
        self.path = os.fspath(path)
        self.reason = reason
        self.detail = detail


def load_image(
    path: str | os.PathLike[str],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
    target_size: int | None = None,
) -> Image.Image:
    """Decode ``path`` into an upright RGB image of shape (H,W), alpha composited on white.

    The pixel count is checked from the header before any pixel is decoded
    (``Image.open`` is lazy), so a forged 50000×50000 PNG costs microseconds. With
    ``target_size``, JPEGs are decoded at a reduced DCT scale that keeps the short side
    >= target_size, which is much faster for large photos and loses nothing we keep.

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
        if target_size is not None and image.format in ("JPEG", "MPO"):
            image.draft(None, (target_size, target_size))
        _decode(image, path)
        _apply_exif_orientation(image, path)
        return to_rgb(image, path)


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
        log.debug("ignoring unreadable EXIF in %s: %r", os.fspath(path), error)


def to_rgb(image: Image.Image, path: str | os.PathLike[str] = "<image>") -> Image.Image:
    """Any Pillow mode → 8-bit RGB. Transparency is composited on white (line art on a
    transparent background must not turn black); 16-bit data is rescaled, not clipped."""
    mode = image.mode
    try:
        if mode in _ALPHA_MODES or "transparency" in image.info:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, _WHITE)
            return Image.alpha_composite(background, rgba).convert("RGB")
        if mode == "RGB":
            return image
        if mode in _HIGH_DEPTH_MODES:
            return _high_depth_to_rgb(image)
        # CMYK, L, 1, P, YCbCr, LAB, HSV. CMYK uses Pillow's naive formula: embedded ICC
        # profiles are ignored, so print-oriented CMYK files may look slightly off.
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ImageSkipped(path, SkipReason.UNSUPPORTED_MODE, f"mode {mode}: {error}") from error


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16/32-bit grayscale → 8-bit RGB by rescaling; Pillow's own convert clips at 255,
    which turns a 16-bit PNG almost entirely white."""
    values = np.asarray(image).astype(np.float64)  # (H,W)
    if image.mode == "F":
        full_scale = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
    else:  # I;16* and "I" (older Pillow opens 16-bit PNGs as "I"): 16-bit range
        full_scale = max(65535.0, float(values.max(initial=0.0)))
    gray = np.clip(np.rint(values * (255.0 / full_scale)), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")
