"""Encoder and decoder of the seed's architecture (SPEC §2), with the decoder fixed to
upsample in all four stages so 256×256 → 16×16 → 256×256."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .blocks import Downsample, ResBlock, Upsample
from .config import TokenizerConfig as _D  # the one place of the defaults below

__all__ = ["Encoder", "Decoder", "Chain"]

HEAD_CHANNELS = 64  # seed: "Conv 3×3 → 64 → ReLU → Conv 3×3 → 3 → Tanh"


class Chain(nn.Sequential):
    """``nn.Sequential`` (same state-dict keys) whose ``forward`` is our own code.

    Compiled on its own — VQ-GAN compiles the decoder's stages without its head — a plain
    ``nn.Sequential`` is, on torch 2.11 (not 2.14), a frame Dynamo does not trace: each block is
    compiled as a separate graph instead (re-compiled with dynamic shapes per resolution),
    with no fusion across blocks and NCHW copies at every boundary. This forward is one graph.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self:
            x = module(x)
        return x


class Encoder(nn.Module):
    """(B,C_in,H,W) → (B,latent_channels,H/2^S,W/2^S) with S = len(channels) stages.

    Stage i: Conv4×4 stride 2 → ``channels[i]``, then ``num_res_blocks`` ResBlocks.
    """

    def __init__(
        self,
        in_channels: int = _D.in_channels,
        channels: Sequence[int] = _D.encoder_channels,
        num_res_blocks: int = _D.num_res_blocks,
        latent_channels: int = _D.latent_channels,
        *,
        stem_channels: int | None = None,
    ) -> None:
        super().__init__()
        # The seed's stem is 128 wide, its first stage's width: tiny models get a tiny stem.
        stem_channels = channels[0] if stem_channels is None else stem_channels
        self.downsample_factor = 2 ** len(channels)
        self.stem = nn.Conv2d(in_channels, stem_channels, 3, padding=1)
        stages: list[nn.Module] = []
        width = stem_channels
        for out in channels:
            blocks = [Downsample(width, out)] + [ResBlock(out) for _ in range(num_res_blocks)]
            stages.append(nn.Sequential(*blocks))
            width = out
        self.stages = Chain(*stages)
        self.head = nn.Conv2d(width, latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        f = self.downsample_factor
        if H % f or W % f:
            raise ValueError(f"image sides must be multiples of {f}, got {H}×{W}")
        return self.head(self.stages(self.stem(x)))


class Decoder(nn.Module):
    """(B,latent_channels,h,w) → (B,C_out,h·2^S,w·2^S) in [-1,1].

    Stage i: ``num_res_blocks`` ResBlocks, nearest ×2, Conv3×3 → ``channels[i]``.
    The seed's diagram skips the upsampling in stage 4 but promises 256×256 output;
    we upsample in every stage (SPEC §2 fix).
    """

    def __init__(
        self,
        out_channels: int = _D.in_channels,
        channels: Sequence[int] = _D.decoder_channels,
        num_res_blocks: int = _D.num_res_blocks,
        latent_channels: int = _D.latent_channels,
        *,
        head_channels: int = HEAD_CHANNELS,
    ) -> None:
        super().__init__()
        width = channels[0]
        self.stem = nn.Conv2d(latent_channels, width, 3, padding=1)
        stages: list[nn.Module] = []
        for i, out in enumerate(channels):
            blocks: list[nn.Module] = [ResBlock(width) for _ in range(num_res_blocks)]
            # The next stage's ResBlocks follow every upsampling but the last (the head's conv).
            blocks.append(Upsample(width, out, realign_grad=i + 1 < len(channels)))
            stages.append(nn.Sequential(*blocks))
            width = out
        self.stages = Chain(*stages)
        self.head = nn.Sequential(
            nn.Conv2d(width, head_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(head_channels, out_channels, 3, padding=1),
            nn.Tanh(),
        )

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the final convolution: where VQ-GAN's adaptive weight is measured."""
        return self.head[2].weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(z)))
