"""Reconstruction metrics: per-image PSNR and SSIM, PSNR on foreground pixels, rFID.

All functions take images (B,3,H,W) in [0,1] (``data_range = 1``) and return one value
per image (B,); a data set's score is the mean over its images. Averaging per image
matters: PSNR of the whole batch as one signal is dominated by its worst image, since
10·log10(1/mean MSE) ≠ mean of 10·log10(1/MSE_i).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics.functional.image import structural_similarity_index_measure

from ..runs.checkpoint_io import safe_torch_load

__all__ = [
    "FID_WEIGHTS_FILE",
    "FIDWeightsMissing",
    "ReconstructionFID",
    "background_cells",
    "foreground_mask",
    "masked_psnr",
    "psnr",
    "ssim",
]

# An MSE floor: identical images get a finite PSNR (100 dB) rather than inf, which JSON
# and means cannot hold.
MSE_FLOOR = 1e-10
# A pixel is foreground when a channel differs from the background colour by more than
# this (in [0,1] units): 8/255 lets JPEG ringing on flat backgrounds count as background.
DEFAULT_TOLERANCE = 8 / 255
# The border's most common colour must cover this share of the border for the image to
# count as "flat background"; photos and full-bleed art have no such colour.
DEFAULT_MIN_BORDER_SHARE = 0.5
# torch-fidelity's Inception weights (TF FID Inception converted), and where torch.hub
# caches them when torch-fidelity downloads them itself.
FID_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
FID_FEATURES = 2048  # Inception pool3: the layer every published FID uses (64/192/768 exist)
FID_WEIGHTS_HASH_PREFIX = FID_WEIGHTS_FILE.rsplit("-", 1)[1].split(".")[0]  # "6726825d": torch.hub's check
FID_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{FID_WEIGHTS_FILE}"


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"expected two (B,C,H,W) batches of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def psnr(x: Tensor, y: Tensor, *, data_range: float = 1.0) -> Tensor:
    """Per-image PSNR = 10·log10(range² / MSE_i) in dB: (B,C,H,W) × 2 → (B,) float64."""
    _check_pair(x, y)
    mse = (x.double() - y.double()).square().flatten(1).mean(dim=1)  # (B,)
    return 10.0 * torch.log10(data_range**2 / mse.clamp_min(MSE_FLOOR))


def ssim(x: Tensor, y: Tensor, *, data_range: float = 1.0) -> Tensor:
    """Per-image SSIM (Wang et al. 2004; 11×11 Gaussian window, σ=1.5): (B,C,H,W) × 2 → (B,)."""
    _check_pair(x, y)
    return structural_similarity_index_measure(
        y.float(), x.float(), data_range=data_range, reduction="none"
    )  # (B,)


def foreground_mask(x: Tensor, *, tolerance: float = DEFAULT_TOLERANCE,
                    min_border_share: float = DEFAULT_MIN_BORDER_SHARE) -> tuple[Tensor, Tensor]:
    """Pixels that differ from the background colour, for images with a flat background.

    The background colour is the mode of the border pixels (1-pixel frame), compared at
    8-bit precision. Returns ``(mask (B,H,W) bool, flat (B,) bool)``: ``flat`` is False
    when fewer than ``min_border_share`` of the border pixels lie within ``tolerance`` of
    that colour (no flat background: masked PSNR is undefined for that image).
    """
    if x.ndim != 4:
        raise ValueError(f"expected (B,C,H,W) images, got {tuple(x.shape)}")
    b, c, h, w = x.shape
    levels = (x.clamp(0, 1) * 255).round().long()  # (B,C,H,W) 8-bit values
    border = torch.cat(
        [levels[..., 0, :], levels[..., -1, :], levels[..., 1:-1, 0], levels[..., 1:-1, -1]], dim=-1
    )  # (B,C,P) with P = 2W + 2(H-2) border pixels
    weights = 256 ** torch.arange(c - 1, -1, -1, device=x.device)  # pack a colour into one integer
    packed = (border * weights.view(1, c, 1)).sum(dim=1)  # (B,P)
    mode = packed.mode(dim=1).values  # (B,)
    colour = torch.stack([(mode // weights[i]) % 256 for i in range(c)], dim=1).to(x.dtype) / 255  # (B,C)
    # Share of the border within tolerance of that colour: JPEG ripple on a white page
    # scatters exact values but stays close to the page colour.
    near = ((border.to(x.dtype) / 255 - colour.unsqueeze(2)).abs().amax(dim=1) <= tolerance)  # (B,P)
    share = near.float().mean(dim=1)  # (B,)
    mask = (x - colour.view(b, c, 1, 1)).abs().amax(dim=1) > tolerance  # (B,H,W)
    return mask, share >= min_border_share


def background_cells(x: Tensor, grid: tuple[int, int], *, tolerance: float = DEFAULT_TOLERANCE,
                     min_border_share: float = DEFAULT_MIN_BORDER_SHARE,
                     foreground: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Latent cells whose pixels are all flat background: (B,C,H,W) in [0,1] → (B,h,w) bool.

    A cell is the (H/h)×(W/w) patch one code stands for on an h×w code grid. Images
    without a flat background (see ``foreground_mask``) have no background cells.
    ``foreground``: ``foreground_mask(x)`` when the caller has it already.
    """
    b, _, height, width = x.shape
    h, w = grid
    if h < 1 or w < 1 or height % h or width % w:
        raise ValueError(f"a {h}×{w} code grid does not tile {height}×{width} images")
    mask, flat = foreground or foreground_mask(x, tolerance=tolerance, min_border_share=min_border_share)
    drawn = mask.view(b, h, height // h, w, width // w).any(dim=4).any(dim=2)  # (B,h,w)
    return ~drawn & flat.view(b, 1, 1)


def masked_psnr(x: Tensor, y: Tensor, *, tolerance: float = DEFAULT_TOLERANCE,
                min_border_share: float = DEFAULT_MIN_BORDER_SHARE, data_range: float = 1.0,
                foreground: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """PSNR over the foreground pixels of the ORIGINAL ``x`` only: (B,C,H,W) × 2 → (B,).

    Illustrations on a white page score high PSNR by reproducing the page; this measures
    the drawing. NaN for images without a flat background or without foreground pixels.
    ``foreground``: ``foreground_mask(x)`` when the caller has it already.
    """
    _check_pair(x, y)
    mask, flat = foreground or foreground_mask(x, tolerance=tolerance, min_border_share=min_border_share)
    err = (x.double() - y.double()).square().sum(dim=1)  # (B,H,W), summed over channels
    n = mask.flatten(1).sum(dim=1)  # (B,) foreground pixels
    mse = (err * mask).flatten(1).sum(dim=1) / (n * x.shape[1]).clamp_min(1)
    value = 10.0 * torch.log10(data_range**2 / mse.clamp_min(MSE_FLOOR))
    return torch.where(flat & (n > 0), value, torch.full_like(value, float("nan")))


class FIDWeightsMissing(RuntimeError):
    """rFID was asked for but the Inception weights are not on this machine."""


def default_fid_weights() -> Path:
    """Where torch-fidelity's own download would be cached (torch.hub's checkpoint folder)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE


def _missing_weights(reason: str) -> FIDWeightsMissing:
    return FIDWeightsMissing(
        f"rFID needs the FID Inception-v3 weights but {reason}. "
        f"On a machine with internet, download {FID_WEIGHTS_URL} and pass it with --fid_weights PATH "
        f"(or place it at {default_fid_weights()}); or pass --no_fid to skip rFID."
    )


def fetch_fid_weights() -> Path:
    """torch-fidelity's Inception weights in its own cache (torch.hub's checkpoint folder),
    downloaded there once when they are missing and the machine is online; the file's SHA-256
    must start with the prefix its name carries. It is then loaded like any other: weights only.

    Raises:
        FIDWeightsMissing: not cached, and the download failed (offline, no room, a bad hash).
    """
    path = default_fid_weights()
    if path.is_file():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(path), hash_prefix=FID_WEIGHTS_HASH_PREFIX,
                                       progress=False)
    except (OSError, RuntimeError, ValueError) as error:  # URLError is an OSError; a bad hash a RuntimeError
        with contextlib.suppress(OSError):  # a partial download (torch.hub writes a temporary file first)
            path.unlink(missing_ok=True)
        raise _missing_weights(f"{path} does not exist and downloading it failed ({type(error).__name__}: "
                               f"{str(error)[:200]})") from error
    return path


class ReconstructionFID:
    """rFID between originals and reconstructions (Heusel et al. 2017), via torchmetrics.

    Weights load from a local file only, through ``torch.load(weights_only=True)`` first:
    torch-fidelity itself unpickles the file with ``weights_only=False``, so it only ever
    sees a copy we re-saved from plain tensors. ``feature`` picks the Inception layer
    (2048 = pool3 for comparable numbers) or swaps in another extractor (an ``nn.Module``
    mapping uint8 (B,3,H,W) to (B,F) features).
    """

    def __init__(self, weights: str | Path | None = None, *, feature: int | nn.Module = FID_FEATURES,
                 device: str | torch.device = "cpu") -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        if isinstance(feature, nn.Module):
            self.metric = FrechetInceptionDistance(feature=feature)
        else:
            path = Path(weights) if weights is not None else fetch_fid_weights()
            if not path.is_file():
                where = f"--fid_weights {path} does not exist" if weights is not None else f"{path} does not exist"
                raise _missing_weights(where)
            self.metric = self._from_file(path, feature, FrechetInceptionDistance)
        self.metric = self.metric.to(device)
        self.count = 0

    @staticmethod
    def _from_file(path: Path, feature: int, fid_class: type) -> nn.Module:
        state = safe_torch_load(path, what="--fid_weights file")  # raises CheckpointError for pickled payloads
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise ValueError(f"--fid_weights {path} is not a state dict of tensors (torch-fidelity's Inception-v3)")
        with tempfile.TemporaryDirectory() as folder:
            clean = os.path.join(folder, "inception.pth")
            torch.save(state, clean)
            try:
                return fid_class(feature=feature, feature_extractor_weights_path=clean)
            except RuntimeError as error:  # load_state_dict: wrong keys or shapes
                raise ValueError(
                    f"--fid_weights {path} does not fit torch-fidelity's FID Inception-v3 ({FID_WEIGHTS_FILE}): "
                    f"{str(error)[:300]}"
                ) from error

    @staticmethod
    def _uint8(x: Tensor) -> Tensor:
        return (x.clamp(0, 1) * 255).round().to(torch.uint8)  # Inception's input format

    def update(self, x: Tensor, x_rec: Tensor) -> None:
        """Add originals ``x`` and reconstructions ``x_rec``, both (B,3,H,W) in [0,1]."""
        _check_pair(x, x_rec)
        self.metric.update(self._uint8(x), real=True)
        self.metric.update(self._uint8(x_rec), real=False)
        self.count += x.shape[0]

    def compute(self) -> float:
        """The Fréchet distance between the two feature Gaussians; needs ≥ 2 images."""
        if self.count < 2:
            raise ValueError(f"rFID needs at least 2 images, got {self.count}")
        # FID ≥ 0; eigenvalue round-off leaves about -1e-6 for identical sets.
        return max(0.0, float(self.metric.compute()))
