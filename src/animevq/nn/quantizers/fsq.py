"""FSQ: finite scalar quantisation, a codebook without parameters (SPEC §3).

Reference: Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple", §3
(eq. 1, f(z) = round(⌊L/2⌋·tanh(z)), with the straight-through gradient of round) and
appendix A.1 (the bound that also serves even L, and the index of a code).

Channel i of a latent is bounded to (−L_i/2, L_i/2), rounded to one of L_i integers and scaled
by 1/⌊L_i/2⌋, so every code lies in [−1, 1]^D. The codebook is implicit: the product of the
per-channel values, K = Π L_i codes; the index of a code is its digits in the mixed radix of
the levels, channel 0 the least significant. There is no auxiliary loss, nothing to restart
and nothing to initialise.

Shapes: B batch, D = len(levels) channels, h×w latent grid, K = Π levels.
"""

from __future__ import annotations

import math

import torch

from ..quantizer_config import FSQConfig
from .base import Quantizer, QuantizerOutput, QuantizerStats, code_counts, code_stats

__all__ = ["FiniteScalarQuantizer"]

BOUND_EPS = 1e-3  # appendix A.1: keeps tanh's range just inside the outermost rounding boundaries


class FiniteScalarQuantizer(Quantizer):
    """Finite scalar quantisation with ``levels[i]`` values on channel i (:class:`FSQConfig`)."""

    def __init__(self, levels: tuple[int, ...] = FSQConfig.levels) -> None:
        super().__init__()
        self.config = FSQConfig(levels=tuple(levels))  # validates the levels
        self.levels = self.config.levels
        self._radix = [math.prod(self.levels[:i]) for i in range(len(self.levels))]  # mixed-radix place values
        # Constants, not state (they follow from the levels): made once per device, outside the
        # state dict, so a tokenizer built on the meta device and loaded from a file has them too.
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_config(cls, config: FSQConfig) -> FiniteScalarQuantizer:
        return cls(config.levels)

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def embedding_dim(self) -> int:
        return len(self.levels)

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(1,D,1,1) levels L (float32), radix Π_{j<i} L_j (int64) and ⌊L/2⌋ (float32) on ``device``."""
        if device not in self._constants:
            levels = torch.tensor(self.levels, dtype=torch.float32, device=device).view(1, -1, 1, 1)
            radix = torch.tensor(self._radix, dtype=torch.int64, device=device).view(1, -1, 1, 1)
            self._constants[device] = (levels, radix, torch.floor(levels / 2))
        return self._constants[device]

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Appendix A.1: tanh(z + s)·h − o with h = (L−1)(1−ε)/2, o = ½ for even L (0 for odd)
        and s = atanh(o/h), so that bound(0) = 0 and round() takes exactly L values. (The
        paper's code shifts by tan(o/h), which is within 1e-2 of atanh here and moves 0.)"""
        levels, _, _ = self._on(z.device)
        half = (levels - 1) * (1 - BOUND_EPS) / 2
        offset = (1 - torch.remainder(levels, 2)) / 2
        return torch.tanh(z + torch.atanh(offset / half)) * half - offset

    def _digits(self, z: torch.Tensor) -> torch.Tensor:
        """(B,D,h,w) float32 latents → their rounded digits in [0, L_i), still float."""
        return torch.round(self.bound(z)) + self._on(z.device)[2]

    def _index(self, digits: torch.Tensor) -> torch.Tensor:
        """Digits (B,D,h,w) → indices (B,h,w) int64: Σ_i digit_i · Π_{j<i} L_j."""
        return (digits.long() * self._on(digits.device)[1]).sum(1)

    @torch.no_grad()
    def encode(self, z_e: torch.Tensor) -> torch.Tensor:
        """(B,D,h,w) latents → (B,h,w) int64 indices."""
        self.check_latents(z_e)
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            return self._index(self._digits(z_e.float()))

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(B,h,w) indices in [0, K) → (B,D,h,w) codes in [−1, 1]."""
        self.check_indices(indices)
        levels, radix, half_width = self._on(indices.device)
        digits = torch.remainder(torch.div(indices.long().unsqueeze(1), radix, rounding_mode="floor"),
                                 levels.long())  # (B,D,h,w)
        return (digits.float() - half_width) / half_width

    def forward(self, z_e: torch.Tensor) -> QuantizerOutput:
        """Quantise (B,D,h,w) latents; round's gradient is the identity (straight-through)."""
        self.check_latents(z_e)
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            bounded = self.bound(z_e.float())  # (B,D,h,w) float32
            rounded = bounded + (torch.round(bounded) - bounded).detach()
            half_width = self._on(z_e.device)[2]
            z_q = rounded / half_width
            indices = self._index(rounded.detach() + half_width)  # (B,h,w)
            counts = code_counts(indices, self.codebook_size)
            perplexity, usage = code_stats(counts)
        zero = torch.zeros((), device=z_e.device)
        return QuantizerOutput(
            z_q=z_q, indices=indices, losses={}, loss=zero,
            stats=QuantizerStats(counts=counts, perplexity=perplexity, code_usage_rate=usage,
                                 restarted=torch.zeros((), dtype=torch.long, device=z_e.device)),
        )
