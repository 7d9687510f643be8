"""LPIPS perceptual distance (Zhang et al., 2018, "The Unreasonable Effectiveness of Deep
Features as a Perceptual Metric", arXiv:1801.03924), VGG16 variant, linear heads v0.1.

d(x, y) = Σ_l  mean_{h,w}  Σ_c  w_{l,c} (f̂_l(x) − f̂_l(y))²_{c,h,w}       (paper eq. 1)

where f̂_l are the VGG16 activations relu1_2 … relu5_3, unit-normalised along channels, and
w_l ≥ 0 the learned 1×1 "linear" heads. Numbers match the `lpips` package and torchmetrics
for the same backbone weights and heads.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn

logger = logging.getLogger(__name__)

# Indices in torchvision's `vgg16().features` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_TAPS = (3, 8, 15, 22, 29)
_CHANNELS = (64, 128, 256, 512, 512)
# The reference's ScalingLayer: maps [-1,1] inputs onto ImageNet-normalised statistics.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
# Reference eps inside sqrt(eps + Σc f²); it underflows in float16, hence the float32 math.
_EPS = 1e-8
# Where installed packages ship the v0.1 VGG heads (torchmetrics vendors the lpips file).
_SHIPPED_HEADS = (
    ("torchmetrics", ("functional", "image", "lpips_models", "vgg.pth")),
    ("lpips", ("weights", "v0.1", "vgg.pth")),
)


def _vgg_cache_path() -> Path:
    """Where torchvision's weights API caches VGG16_Weights.IMAGENET1K_V1."""
    url = torchvision.models.VGG16_Weights.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


class VGGWeightsMissing(RuntimeError):
    """LPIPS could not load torchvision's VGG16 weights: ``reason`` says why, ``cache`` and
    ``url`` where they are looked for and where they come from; ``advice`` replaces the
    default one (for Python users) with another (the CLI's options)."""

    def __init__(self, reason: str, *, advice: str | None = None) -> None:
        self.reason, self.cache = reason, _vgg_cache_path()
        self.url = torchvision.models.VGG16_Weights.IMAGENET1K_V1.url
        advice = advice or (
            f"Provide them in one of these ways: (1) on a machine with internet, download {self.url} and place "
            f"it at {self.cache} (the cache under torch.hub.get_dir(); set TORCH_HOME to move it); "
            "(2) pass LPIPS(vgg_weights='/path/to/vgg16.pth') with a torchvision VGG16 state dict "
            "(keys 'features.N.weight'/'features.N.bias'); "
            "(3) for tests only, LPIPS(random_init=True) builds a randomly initialised VGG16.")
        super().__init__(f"LPIPS needs torchvision's ImageNet VGG16 weights (VGG16_Weights.IMAGENET1K_V1) but "
                         f"{reason}. {advice}")


def _features_state(state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """Picks the conv weights of `vgg16().features` out of a torchvision state dict."""
    if any(k.startswith("features.") for k in state):
        # A full vgg16 state dict: the classifier is not used by LPIPS.
        return {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
    if all(re.fullmatch(r"\d+\.(weight|bias)", k) for k in state):
        return dict(state)  # already a `features`-only state dict
    raise ValueError(
        f"{source} is not a torchvision VGG16 state dict (expected keys like 'features.0.weight'; "
        f"got {sorted(state)[:5]} ...). Save one with "
        "torch.save(torchvision.models.vgg16(...).state_dict(), path)."
    )


def _default_vgg_state(allow_download: bool) -> dict[str, Tensor]:
    cache = _vgg_cache_path()
    if not cache.is_file() and not allow_download:
        raise VGGWeightsMissing(f"{cache} does not exist and allow_download=False")
    try:
        state = torchvision.models.VGG16_Weights.IMAGENET1K_V1.get_state_dict(
            progress=True, check_hash=True, map_location="cpu", weights_only=True
        )
    except (OSError, RuntimeError, ValueError) as err:  # URLError is an OSError: offline
        reason = f"they could not be loaded or downloaded ({type(err).__name__}: {err})"
        raise VGGWeightsMissing(reason) from err
    return _features_state(state, str(cache))


def _shipped_heads_path() -> Path | None:
    """The v0.1 VGG head file of an installed torchmetrics or lpips, found without importing them."""
    for package, parts in _SHIPPED_HEADS:
        spec = importlib.util.find_spec(package)
        for root in (spec.submodule_search_locations or []) if spec is not None else []:
            path = Path(root).joinpath(*parts)
            if path.is_file():
                return path
    return None


def _heads_state(state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """Maps the reference key names (`lin{k}.model.{i}.weight`, i=1 after a Dropout) to ours."""
    out: dict[str, Tensor] = {}
    for k in range(len(_CHANNELS)):
        pattern = rf"(lin{k}\.(model\.\d+\.)?|lins\.{k}\.)weight"
        keys = [name for name in state if re.fullmatch(pattern, name)]
        if len(keys) != 1:
            raise ValueError(
                f"{source} does not hold LPIPS linear head {k} "
                f"(expected one key like 'lin{k}.model.1.weight'; "
                f"got {sorted(state)}). Use the v0.1 vgg.pth shipped with torchmetrics or lpips."
            )
        out[f"{k}.weight"] = state[keys[0]]
    return out


class LPIPS(nn.Module):
    """Frozen LPIPS(VGG16, v0.1) distance between two batches of images in [-1, 1].

    Weights come from arguments only (never silently random):

    - backbone: `random_init=True` (tests), else the local torchvision state dict `vgg_weights`,
      else torchvision's `VGG16_Weights.IMAGENET1K_V1` through its weights API (cached under
      `torch.hub.get_dir()`; downloaded only when `allow_download`); a RuntimeError says how to
      provide them when they cannot be had.
    - heads: `lin_weights`, else the v0.1 `vgg.pth` shipped by torchmetrics or lpips.

    The module stays in eval mode and its parameters never need gradients; gradients flow to
    the inputs, so it serves as a training loss.
    """

    shift: Tensor
    scale: Tensor

    def __init__(
        self,
        vgg_weights: str | Path | None = None,
        *,
        lin_weights: str | Path | None = None,
        random_init: bool = False,
        allow_download: bool = True,
    ) -> None:
        super().__init__()
        if random_init and vgg_weights is not None:
            raise ValueError(f"pass either vgg_weights ({vgg_weights}) or random_init=True, not both")
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)

        # torchvision's architecture, built on the meta device so that no time goes into
        # initialising weights (or the 100M-parameter classifier) that are then overwritten.
        with torch.device("meta"):
            features = torchvision.models.vgg16(weights=None).features
        self.vgg = features[: _TAPS[-1] + 1].to_empty(device="cpu")  # up to relu5_3
        if random_init:
            logger.warning("LPIPS uses a randomly initialised VGG16: distances are not perceptual (tests only)")
            for m in self.vgg.modules():
                if isinstance(m, nn.Conv2d):  # torchvision's VGG initialisation
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    nn.init.zeros_(m.bias)
        elif vgg_weights is not None:
            path = Path(vgg_weights)
            if not path.is_file():
                raise FileNotFoundError(
                    f"vgg_weights file {path} does not exist; pass a torchvision VGG16 state dict"
                )
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.vgg.load_state_dict(_features_state(state, str(path)))
        else:
            self.vgg.load_state_dict(_default_vgg_state(allow_download))

        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in _CHANNELS)
        heads = Path(lin_weights) if lin_weights is not None else _shipped_heads_path()
        if heads is not None:
            if not heads.is_file():
                raise FileNotFoundError(f"lin_weights file {heads} does not exist; pass LPIPS v0.1 vgg.pth")
            state = torch.load(heads, map_location="cpu", weights_only=True)
            self.lins.load_state_dict(_heads_state(state, str(heads)))
        elif random_init:
            logger.warning("LPIPS linear heads not found (torchmetrics/lpips not installed): random heads")
            for lin in self.lins:
                nn.init.uniform_(lin.weight, 0.0, 1.0 / lin.in_channels)  # heads are non-negative
        else:
            raise RuntimeError(
                "LPIPS v0.1 linear heads (vgg.pth) not found: install torchmetrics or lpips, which ship "
                "them, or pass LPIPS(lin_weights='/path/to/vgg.pth')"
            )

        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        """Always eval: a parent's `.train()` must not switch this frozen metric."""
        return super().train(False)

    def forward(self, x: Tensor, y: Tensor, *, reduction: Literal["none", "mean"] = "none") -> Tensor:
        """LPIPS distance between x and y, both (B,3,H,W) in [-1,1].

        Returns (B,) per-image distances for reduction="none", a scalar for "mean".
        """
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"LPIPS expects two (B,3,H,W) images of one shape, got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if reduction not in ("none", "mean"):
            raise ValueError(f"reduction must be 'none' or 'mean', got {reduction!r}")
        batch = x.shape[0]
        dist = x.new_zeros(batch, dtype=torch.promote_types(x.dtype, torch.float32))
        lins = iter(self.lins)
        if torch.is_grad_enabled() and x.requires_grad != y.requires_grad:
            # Training: one side (the real image) is a constant. Its features need no backward,
            # so it runs without autograd, layer by layer beside the other side, and the
            # backward covers that side alone: one VGG pass of backward per image, not two
            # (with one pass over both, the constant half's input gradients are computed and
            # dropped), and the constant side saves no activations.
            fixed, moving = (x, y) if y.requires_grad else (y, x)
            with torch.no_grad():
                h_fixed = (fixed - self.shift) / self.scale
            h = (moving - self.shift) / self.scale
            for i, layer in enumerate(self.vgg):
                with torch.no_grad():
                    h_fixed = layer(h_fixed)
                h = layer(h)
                if i in _TAPS:
                    dist = dist + self._layer_distance(h_fixed, h, next(lins).weight)
        else:
            h = (torch.cat([x, y]) - self.shift) / self.scale  # (2B,3,H,W): one VGG pass for both
            for i, layer in enumerate(self.vgg):
                h = layer(h)
                if i in _TAPS:
                    dist = dist + self._layer_distance(*h.chunk(2), next(lins).weight)
        return dist.mean() if reduction == "mean" else dist

    @staticmethod
    def _layer_distance(feats_x: Tensor, feats_y: Tensor, weight: Tensor) -> Tensor:
        """Σ_c w_c mean_{h,w} (f̂(x) − f̂(y))² for feats (B,C,H,W) f(x) and f(y) → (B,)."""
        # Upcast and leave autocast: sqrt(1e-8 + Σf²) and the weighted sum must not run in 16 bit.
        dtype = torch.promote_types(feats_x.dtype, torch.float32)
        with torch.autocast(device_type=feats_x.device.type, enabled=False):
            f_x, f_y = (f.to(dtype) for f in (feats_x, feats_y))
            f_x = f_x / torch.sqrt(_EPS + f_x.square().sum(dim=1, keepdim=True))
            f_y = f_y / torch.sqrt(_EPS + f_y.square().sum(dim=1, keepdim=True))
            diff = (f_x - f_y).square().mean(dim=(2, 3))  # (B,C)
            # mean then 1×1 conv == 1×1 conv then mean (both linear), without a (B,1,H,W) map.
            return diff @ weight.to(dtype).flatten()  # (B,)
