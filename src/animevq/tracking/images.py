"""Pictures for the dashboard: reconstruction grids and codebook-usage plots.

Everything returns ``uint8`` arrays of shape (H, W, 3), the format every tracker accepts
losslessly (SwanLab stores them as PNG). Plots use Pillow only, so logging never imports
matplotlib.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "AXIS_COLOR",
    "BACKGROUND_COLOR",
    "BAR_COLOR",
    "check_uint8_image",
    "code_usage_plot",
    "make_reconstruction_grid",
    "to_uint8_hwc",
]

BAR_COLOR = (66, 133, 244)
AXIS_COLOR = (96, 96, 96)
TEXT_COLOR = (0, 0, 0)
BACKGROUND_COLOR = (255, 255, 255)
GRID_PADDING = 2  # px of white between tiles: enough to separate them, cheap to store
# Plot margins (px): room for the title above the bars and the axis label below them.
_MARGIN_LEFT, _MARGIN_RIGHT, _MARGIN_TOP, _MARGIN_BOTTOM = 8, 8, 22, 20


def check_uint8_image(image: np.ndarray) -> None:
    """Raise a ValueError unless ``image`` is a uint8 (H,W,3) array (the format trackers take)."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{type(image).__name__} {getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}"
        raise ValueError(f"expected a uint8 (H,W,3) image array, got {got}; see make_reconstruction_grid")


def to_uint8_hwc(x: torch.Tensor) -> np.ndarray:
    """Map images in [-1, 1] to uint8: (B,3,H,W) -> (B,H,W,3); values outside are clipped.

    ``round((x + 1) * 127.5)`` sends -1 -> 0, 1 -> 255 and is exact for x = k/127.5 - 1.
    """
    if x.ndim != 4:
        raise ValueError(f"expected images of shape (B,C,H,W), got {tuple(x.shape)}")
    x = x.detach().to(device="cpu", dtype=torch.float32).clamp(-1.0, 1.0)
    x = ((x + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()  # (B,H,W,C)


def make_reconstruction_grid(
    x: torch.Tensor, x_rec: torch.Tensor, max_images: int = 8, *, padding: int = GRID_PADDING
) -> np.ndarray:
    """Tile inputs above their reconstructions, the picture SPEC §5 logs as ``*/reconstruction``.

    Args:
        x: inputs (B,3,H,W) in [-1, 1].
        x_rec: reconstructions (B,3,H,W) in [-1, 1], same shape as ``x``.
        max_images: at most this many columns (the first ``min(B, max_images)`` images).
        padding: white border in pixels around and between the tiles.

    Returns:
        uint8 array (2H + 3p, N·W + (N+1)p, 3): row 0 holds ``x[:N]``, row 1 ``x_rec[:N]``;
        tile (r, i) starts at pixel (p + r·(H + p), p + i·(W + p)).
    """
    if x.shape != x_rec.shape:
        raise ValueError(f"inputs {tuple(x.shape)} and reconstructions {tuple(x_rec.shape)} differ in shape")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected RGB images of shape (B,3,H,W), got {tuple(x.shape)}")
    if max_images < 1 or padding < 0:
        raise ValueError(f"need max_images >= 1 and padding >= 0, got {max_images} and {padding}")
    n = min(x.shape[0], max_images)
    if n == 0:
        raise ValueError("cannot make a reconstruction grid from an empty batch")
    _, _, h, w = x.shape
    rows = (to_uint8_hwc(x[:n]), to_uint8_hwc(x_rec[:n]))  # each (N,H,W,3)
    grid = np.full((2 * h + 3 * padding, n * w + (n + 1) * padding, 3), 255, dtype=np.uint8)
    for r, tiles in enumerate(rows):
        top = padding + r * (h + padding)
        for i in range(n):
            left = padding + i * (w + padding)
            grid[top : top + h, left : left + w] = tiles[i]
    return grid


def _perplexity(counts: np.ndarray) -> float:
    """exp(H(p)) of the code histogram, p = counts / Σcounts (the VQ-VAE usage measure)."""
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(math.exp(-(p * np.log(p)).sum()))


def code_usage_plot(counts: torch.Tensor, *, width: int = 512, height: int = 256) -> np.ndarray:
    """Draw a codebook's usage histogram as bars, most used code first, on a log-y axis.

    Sorting makes dead codes a flat tail on the right and shows at a glance how much of the
    codebook carries the data; log-y keeps rarely used codes visible next to hot ones.

    Args:
        counts: (K,) non-negative usage counts (any numeric dtype), e.g. how often each code
            was chosen over a validation pass.
        width, height: image size in pixels.

    Returns:
        uint8 array (height, width, 3). Bars are drawn in :data:`BAR_COLOR`; pixel column j of
        the plot area shows the sorted count ``c[floor(j·K / plot_width)]`` with a height
        proportional to ``log10(1 + c) / log10(1 + max c)``.
    """
    if counts.ndim != 1 or counts.numel() == 0:
        raise ValueError(f"counts must be a non-empty (K,) tensor, got shape {tuple(counts.shape)}")
    c = counts.detach().to(device="cpu", dtype=torch.float64).numpy()
    if not np.isfinite(c).all() or (c < 0).any():
        raise ValueError("counts must be finite and non-negative")
    plot_w = width - _MARGIN_LEFT - _MARGIN_RIGHT
    plot_h = height - _MARGIN_TOP - _MARGIN_BOTTOM
    if plot_w < 8 or plot_h < 8:
        raise ValueError(f"plot size {width}x{height} is too small; use at least 64x64")

    k = c.size
    c_sorted = np.sort(c)[::-1]
    # Sorted descending, so a column's first code is also its largest: taking it keeps the
    # outline exact whether K is larger or smaller than the plot width.
    column_values = c_sorted[(np.arange(plot_w) * k) // plot_w]  # (plot_w,)
    log_max = math.log10(1.0 + c_sorted[0])
    frac = np.log10(1.0 + column_values) / log_max if log_max > 0 else np.zeros(plot_w)
    bar_h = np.round(frac * plot_h).astype(np.int64)  # (plot_w,)

    canvas = np.full((height, width, 3), BACKGROUND_COLOR, dtype=np.uint8)
    rows = np.arange(plot_h)[:, None]  # (plot_h, 1); row 0 is the top of the plot area
    bars = rows >= (plot_h - bar_h)[None, :]  # (plot_h, plot_w)
    area = canvas[_MARGIN_TOP : _MARGIN_TOP + plot_h, _MARGIN_LEFT : _MARGIN_LEFT + plot_w]
    area[bars] = BAR_COLOR

    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    x0, y0, y1 = _MARGIN_LEFT - 1, _MARGIN_TOP, _MARGIN_TOP + plot_h  # axes sit outside the bars
    draw.line([(x0, y0), (x0, y1), (width - _MARGIN_RIGHT, y1)], fill=AXIS_COLOR)
    used = int((c > 0).sum())
    title = f"used {used}/{k} ({used / k:.1%})  perplexity {_perplexity(c):.1f}  max {c_sorted[0]:.4g}"
    draw.text((_MARGIN_LEFT, 4), title, fill=TEXT_COLOR, font=font)
    draw.text((_MARGIN_LEFT, y1 + 4), "codes sorted by count (log y)", fill=TEXT_COLOR, font=font)
    return np.asarray(image, dtype=np.uint8).copy()
