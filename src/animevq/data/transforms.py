"""From a decoded RGB image to a training tensor: the square crop, the bicubic resize that
keeps every crop of one image on one sampling grid, the conversion to [-1,1], and the
stored form of ``animevq prepare`` (an image resized once, cropped at each read)."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

# Pillow's resize first shrinks by an integer factor while the result stays reducing_gap
# times larger than the target; 3.0 is indistinguishable from a full-kernel resize (Pillow
# docs) and makes downscaling a 4K image to 256 px several times faster.
_REDUCING_GAP = 3.0


def crop_resize(image: Image.Image, size: int, offset: float = 0.5) -> Image.Image:
    """Square crop of side min(W,H) at ``offset`` ∈ [0,1] along the long axis, resized
    to (size,size) with bicubic filtering.

    Equal to "resize the short side to ``size``, then crop size×size" without ever
    building the resized long side: a 20000×8 strip would otherwise become 640000×256.
    Small images are upscaled.
    """
    width, height = image.size
    side = min(width, height)
    left = (width - side) * offset
    top = (height - side) * offset
    return resize_box(image, (size, size), (left, top, left + side, top + side))


def resize_box(
    image: Image.Image, size: tuple[int, int], box: tuple[float, float, float, float]
) -> Image.Image:
    """Bicubic resize of the region ``box`` = (left, top, right, bottom) of ``image``
    (fractional pixels) to ``size`` = (W,H).

    Like ``image.resize(size, BICUBIC, box=box, reducing_gap=3)``, but any two boxes of
    one image at the same scale give the same pixels wherever their samples coincide
    (up to rare last-bit rounding): the centre crop of a prepared image then equals the
    raw folder's validation crop. Pillow breaks that in two ways, fixed here: its integer
    pre-reduction grid starts at the box (ours starts at the image origin), and Pillow 13
    chooses the order of its two 1-D passes from the shapes (vertical first for some),
    which changes the uint8 rounding between them (ours: always horizontal, then vertical).
    Speed is Pillow's: the same reduction, and only the rows the kernel reaches.
    """
    width, height = image.size
    # Pillow's own rule for reducing_gap: shrink by an integer factor first while the
    # result stays >= _REDUCING_GAP times the target.
    factor_x = int((box[2] - box[0]) / size[0] / _REDUCING_GAP) or 1
    factor_y = int((box[3] - box[1]) / size[1] / _REDUCING_GAP) or 1
    left, right = _support(box[0], box[2], size[0], width, factor_x)
    top, bottom = _support(box[1], box[3], size[1], height, factor_y)
    region = (left, top, right, bottom)
    if factor_x > 1 or factor_y > 1:
        image = image.reduce((factor_x, factor_y), box=region)
    else:
        image = image.crop(region)  # rows outside the kernel's reach cost a pass for nothing
    x0, x1 = (box[0] - left) / factor_x, (box[2] - left) / factor_x
    y0, y1 = (box[1] - top) / factor_y, (box[3] - top) / factor_y
    bicubic = Image.Resampling.BICUBIC
    image = image.resize((size[0], image.height), bicubic, box=(x0, 0, x1, image.height))
    return image.resize(size, bicubic, box=(0, y0, size[0], y1))


def _support(low: float, high: float, out: int, extent: int, factor: int) -> tuple[int, int]:
    """The source pixels [a, b) within [0, extent) that a bicubic resize of [low, high)
    to ``out`` pixels can touch, widened to multiples of ``factor`` (or the image edge).

    The bicubic kernel reaches 2 pixels (2·scale when downscaling) from each sample
    centre, in reduced pixels; one more reduced pixel absorbs Pillow's rounding.
    """
    scale = (high - low) / out / factor  # source pixels per output pixel, after reducing
    margin = (2.0 * max(scale, 1.0) + 1.0) * factor
    start = max(0, math.floor(low - margin)) // factor * factor
    end = min(extent, math.ceil(math.ceil(high + margin) / factor) * factor)
    return start, end


def to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """RGB image (H,W), or a uint8 array (H,W,3), → float32 tensor (3,H,W) in [-1,1].

    The arithmetic runs in NumPy: small torch ops in a busy main process pay for
    intra-op thread hand-offs (~100× slower with num_workers=0 on a loaded 2-core box).
    """
    pixels = np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))
    scaled = pixels.astype(np.float32)  # (3,H,W)
    scaled /= 127.5  # division, not a reciprocal multiply: 255 maps to exactly 1.0
    scaled -= 1.0
    return torch.from_numpy(scaled)


def stored_image(image: Image.Image, size: int, max_aspect: float) -> np.ndarray:
    """RGB image (W,H) → uint8 (H',W',3) with short side ``size`` and long side
    L ≤ size·max_aspect, L − size even, the long axis centre-cropped beyond L.

    Why this shape: a variable long side keeps the training crop's random position along
    the long axis meaningful (a stored centre square would drop a third of a 2:3
    illustration); the cap (2·size keeps 2:3 and 9:16 whole) stops a 20000×8 strip from
    becoming 640000×256. The resize box is centred and scaled like the raw folder's crop
    (short side → size), so the centre size×size crop of the result equals
    ``crop_resize(image, size)`` (up to rare one-level roundings: see :func:`resize_box`).
    """
    width, height = image.size
    short, long = min(width, height), max(width, height)
    target = min(math.floor(long * size / short), math.floor(size * max_aspect))
    target = max(size, target - (target - size) % 2)
    span = target * short / size  # source pixels along the long axis that L covers
    start = (long - span) / 2
    if width >= height:
        return np.asarray(resize_box(image, (target, size), (start, 0, start + span, height)))
    return np.asarray(resize_box(image, (size, target), (0, start, width, start + span)))


def stored_crop(pixels: np.ndarray, image_size: int, offset: float, flip: bool) -> torch.Tensor:
    """A stored image (H,W,3) uint8 (:func:`stored_image`) → the training tensor (3,S,S).

    The square of side min(H,W) at ``offset`` ∈ [0,1] along the long axis (rounded to whole
    stored pixels; 0.5, the centre, for validation), flipped left-right if ``flip``. At
    S = the stored short side the crop is an array slice; a smaller S resizes it as the raw
    folder's :func:`crop_resize` does.
    """
    height, width = pixels.shape[:2]
    side = min(height, width)
    if image_size != side:
        crop = np.asarray(crop_resize(Image.fromarray(np.asarray(pixels)), image_size, offset))
    else:
        start = round(offset * (max(height, width) - side))  # (long - side) / 2 at the centre
        crop = pixels[:, start : start + side] if width > height else pixels[start : start + side]
    if flip:
        crop = crop[:, ::-1]
    return to_tensor(crop)  # (3,S,S)
