"""PatchGAN discriminator for VQ-GAN training.

The layout is pix2pix's ``NLayerDiscriminator`` (Isola et al. 2017, "Image-to-Image
Translation with Conditional Adversarial Networks", §3.2.2), as used by taming-transformers
(Esser et al. 2021): every output logit judges one overlapping patch of the input (a 70×70
receptive field with 3 layers), which pushes the decoder towards sharp local texture.

Shapes: images (B,C,H,W) -> logits (B,1,h',w'), one logit per patch.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from .blocks import group_norm

__all__ = ["BASE_CHANNELS", "NUM_LAYERS", "PatchDiscriminator", "DiscriminatorNorm", "patch_grid_size", "min_input_size"]

DiscriminatorNorm = Literal["batch", "group", "none", "spectral"]
NORM_CHOICES: tuple[str, ...] = get_args(DiscriminatorNorm)

KERNEL_SIZE = 4  # pix2pix: 4×4 kernels, padding 1, so stride-2 layers halve H and W exactly
PADDING = 1
LEAKY_SLOPE = 0.2  # DCGAN (Radford et al. 2016) / pix2pix
MAX_WIDTH_MULT = 8  # pix2pix caps the width at 8× base channels (512 for base 64)
INIT_STD = 0.02  # DCGAN initialisation, kept by pix2pix and taming
BASE_CHANNELS = 64  # pix2pix and taming
NUM_LAYERS = 3  # taming: a 70×70 receptive field


def _conv_out(size: int, stride: int) -> int:
    return (size + 2 * PADDING - KERNEL_SIZE) // stride + 1


def patch_grid_size(size: int, num_layers: int = NUM_LAYERS) -> int:
    """Side of the logits map for an input side ``size`` (256 -> 30 with 3 layers).

    ``num_layers`` stride-2 convolutions, then two stride-1 ones, each 4×4 with padding 1.
    Returns a value < 1 when the input is too small for the network.
    """
    for _ in range(num_layers):
        size = _conv_out(size, 2)
    for _ in range(2):
        size = _conv_out(size, 1)
    return size


def min_input_size(num_layers: int = NUM_LAYERS) -> int:
    """Smallest input side that yields a logits map (24 px for 3 layers).

    Each stride-2 conv floors the side to half and the two stride-1 convs take 1 px each,
    so the side must still be 3 after ``num_layers`` halvings.
    """
    return 3 * 2**num_layers


def _make_norm(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return group_norm(channels)
    return nn.Identity()  # "none" and "spectral": no activation normalisation


class PatchDiscriminator(nn.Module):
    """pix2pix / taming ``NLayerDiscriminator``: a fully convolutional patch classifier.

    Layers (``b = base_channels``, ``L = num_layers``, every conv 4×4 with padding 1)::

        Conv s2 in->b, LeakyReLU(0.2)
        (L-1)×  Conv s2 -> min(2^n, 8)·b, norm, LeakyReLU(0.2)      n = 1 … L-1
        Conv s1 -> min(2^L, 8)·b, norm, LeakyReLU(0.2)
        Conv s1 -> 1                                                 (raw logits)

    Shapes: x (B,in_channels,H,W) -> logits (B,1,h',w'); with the defaults a 256×256 image
    gives a 30×30 map, a 32×32 image a 2×2 map (see :func:`patch_grid_size`).

    Args:
        in_channels: image channels.
        base_channels: width of the first layer (64 in pix2pix and taming).
        num_layers: number of stride-2 convolutions (3 in taming: 70×70 receptive field).
        norm: activation normalisation after every conv but the first and the last.
            ``"batch"`` is taming's default. Under DDP, plain BatchNorm computes statistics
            per GPU, and real and fake batches go through the discriminator separately, so
            the two are normalised with different statistics; convert it with
            ``nn.SyncBatchNorm.convert_sync_batchnorm`` or choose ``"group"`` (GroupNorm,
            independent of batch size and rank). ``"none"`` uses no normalisation;
            ``"spectral"`` wraps every conv in spectral normalisation (Miyato et al. 2018)
            instead of normalising activations.

    Weights start from the DCGAN initialisation: conv weights N(0, 0.02), norm scales
    N(1, 0.02), all biases 0.
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = BASE_CHANNELS,
        num_layers: int = NUM_LAYERS,
        *,
        norm: DiscriminatorNorm = "batch",
    ) -> None:
        super().__init__()
        if norm not in NORM_CHOICES:
            raise ValueError(f"norm={norm!r} is not supported; choose one of {NORM_CHOICES}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if in_channels < 1 or base_channels < 1:
            raise ValueError(
                "in_channels and base_channels must be positive, "
                f"got {in_channels} and {base_channels}"
            )
        self.num_layers = num_layers
        self.norm = norm
        # A conv followed by BatchNorm/GroupNorm needs no bias: the norm's shift replaces it.
        hidden_bias = norm in ("none", "spectral")

        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, KERNEL_SIZE, 2, PADDING),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
        ]
        width = base_channels
        for n in range(1, num_layers + 1):
            # The last of these keeps the resolution (stride 1), as in pix2pix.
            stride = 2 if n < num_layers else 1
            next_width = base_channels * min(2**n, MAX_WIDTH_MULT)
            layers += [
                nn.Conv2d(width, next_width, KERNEL_SIZE, stride, PADDING, bias=hidden_bias),
                _make_norm(norm, next_width),
                nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            ]
            width = next_width
        layers.append(nn.Conv2d(width, 1, KERNEL_SIZE, 1, PADDING))
        self.main = nn.Sequential(*layers)

        self.reset_parameters()
        if norm == "spectral":
            # After initialisation: the parametrisation captures the initial weight.
            for module in self.main:
                if isinstance(module, nn.Conv2d):
                    parametrizations.spectral_norm(module)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """DCGAN initialisation (Radford et al. 2016, §4): N(0, 0.02) convs, N(1, 0.02) norms."""
        for module in self.main:
            if isinstance(module, nn.Conv2d):
                weight = (
                    module.parametrizations.weight.original
                    if parametrize.is_parametrized(module, "weight")
                    else module.weight
                )
                nn.init.normal_(weight, 0.0, INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(module.weight, 1.0, INIT_STD)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B,C,H,W) images -> (B,1,h',w') patch logits (unbounded, no sigmoid)."""
        height, width = x.shape[-2:]
        if min(height, width) < min_input_size(self.num_layers):
            raise ValueError(
                f"input of {height}×{width} px is too small for a {self.num_layers}-layer "
                f"PatchDiscriminator; use at least {min_input_size(self.num_layers)} px per side "
                "or fewer layers"
            )
        return self.main(x)
