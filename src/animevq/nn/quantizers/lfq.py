"""LFQ: lookup-free quantisation, the code of a latent is the signs of its channels (SPEC §3).

Reference: Yu et al. 2023, "Language Model Beats Diffusion: Tokenizer is Key to Visual
Generation" (MAGVIT-v2), §3.1: q(z)_i = sign(z_i) ∈ {−1, +1} with the straight-through
gradient, index Σ_i 1[z_i > 0]·2^i (channel 0 the least significant bit), K = 2^D, and the
entropy penalty E[H(q(c|z))] − H(E[q(c|z)]) over the soft assignment
q(c|z) ∝ exp(−‖z − c‖²/τ) = exp(2⟨z, c⟩/τ)·const. Open-MAGVIT2 (Luo et al. 2024) weighs it
0.1 with τ = 0.01 and adds the commitment term ‖z − sg[q(z)]‖².

The soft assignment factorises over the bits: bit i is +1 with probability σ(a_i), a_i = 4z_i/τ.
So the per-sample entropy is exactly Σ_i H(σ(a_i)). The codebook entropy H(E[q]) of the batch
mean does not factorise: it is computed exactly over groups of at most ``entropy_group_bits``
bits (2^g probabilities per vector and group) and summed over the groups, an upper bound of the
joint entropy that equals it when the groups are independent (Open-MAGVIT2 splits 18 bits into
two groups of 9 the same way). Under DDP the batch mean is taken over every rank's vectors.

Shapes: B batch, D bits, h×w latent grid, N = B·h·w vectors, K = 2^D.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quantizer_config import LFQConfig
from .base import Quantizer, QuantizerOutput, QuantizerStats, code_counts, code_stats
from .entropy import entropy, global_mean

__all__ = ["LookupFreeQuantizer", "bit_groups"]

_D = LFQConfig  # the one place of the defaults below


def bit_groups(bits: int, most: int) -> list[int]:
    """Sizes of the fewest groups of at most ``most`` bits that split ``bits`` as evenly as possible."""
    count = -(-bits // most)
    return [bits // count + (1 if i < bits % count else 0) for i in range(count)]


class LookupFreeQuantizer(Quantizer):
    """Lookup-free quantisation of D-channel latents into 2^D sign codes (:class:`LFQConfig`)."""

    def __init__(
        self,
        embedding_dim: int = _D.embedding_dim,
        *,
        commitment_cost: float = _D.commitment_cost,
        entropy_weight: float = _D.entropy_weight,
        sample_entropy_weight: float = _D.sample_entropy_weight,
        codebook_entropy_weight: float = _D.codebook_entropy_weight,
        entropy_temperature: float = _D.entropy_temperature,
        entropy_group_bits: int = _D.entropy_group_bits,
    ) -> None:
        super().__init__()
        self.config = LFQConfig(  # validates every setting
            embedding_dim=embedding_dim, commitment_cost=commitment_cost, entropy_weight=entropy_weight,
            sample_entropy_weight=sample_entropy_weight, codebook_entropy_weight=codebook_entropy_weight,
            entropy_temperature=entropy_temperature, entropy_group_bits=entropy_group_bits)
        self.groups = bit_groups(embedding_dim, entropy_group_bits)
        # Constants, not state: made once per device, outside the state dict (as FSQ's).
        self._constants: dict[torch.device, tuple[torch.Tensor, list[torch.Tensor]]] = {}

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def embedding_dim(self) -> int:
        return self.config.embedding_dim

    @property
    def loss_weights(self) -> dict[str, float]:
        return {"entropy_loss": self.config.entropy_weight}

    def _on(self, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(1,D,1,1) int64 place values 2^i, and per group the (2^g, g) float32 bits of its codes."""
        if device not in self._constants:
            place = (2 ** torch.arange(self.embedding_dim, device=device)).view(1, -1, 1, 1)
            tables = []
            for g in self.groups:
                codes = torch.arange(2**g, device=device).unsqueeze(1)
                tables.append(((codes >> torch.arange(g, device=device)) & 1).float())  # (2^g, g)
            self._constants[device] = (place, tables)
        return self._constants[device]

    def _index(self, z: torch.Tensor) -> torch.Tensor:
        """(B,D,h,w) latents → (B,h,w) int64: Σ_i 1[z_i > 0]·2^i."""
        return ((z > 0).long() * self._on(z.device)[0]).sum(1)

    @torch.no_grad()
    def encode(self, z_e: torch.Tensor) -> torch.Tensor:
        """(B,D,h,w) latents → (B,h,w) int64 indices."""
        self.check_latents(z_e)
        return self._index(z_e)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(B,h,w) indices in [0, 2^D) → (B,D,h,w) codes in {−1, +1}."""
        self.check_indices(indices)
        place = self._on(indices.device)[0]
        bits = torch.remainder(torch.div(indices.long().unsqueeze(1), place, rounding_mode="floor"), 2)  # (B,D,h,w)
        return bits.float() * 2 - 1

    def entropy_loss(self, z: torch.Tensor) -> torch.Tensor:
        """sample_w·E[H(q(c|z))] − codebook_w·H(E[q(c|z)]) of (N,D) float32 latents."""
        cfg = self.config
        logits = 4 * z / cfg.entropy_temperature  # (N,D): log-odds of bit i being +1
        log_plus, log_minus = -F.softplus(-logits), -F.softplus(logits)  # log σ(a), log(1 − σ(a))
        sample = (log_plus.exp() * -log_plus + log_minus.exp() * -log_minus).sum(1).mean()
        sums, start = [], 0
        for g, table in zip(self.groups, self._on(z.device)[1]):
            lp, lm = log_plus[:, start:start + g], log_minus[:, start:start + g]
            log_q = lp @ table.T + lm @ (1 - table).T  # (N, 2^g) log-probabilities of the group's codes
            sums.append(log_q.exp().sum(0))
            start += g
        mean_probs = global_mean(sums, z.shape[0])
        codebook = sum(entropy(p) for p in mean_probs)
        return cfg.sample_entropy_weight * sample - cfg.codebook_entropy_weight * codebook

    def forward(self, z_e: torch.Tensor) -> QuantizerOutput:
        """Quantise (B,D,h,w) latents to signs, straight-through; the losses are float32."""
        self.check_latents(z_e)
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            z = z_e.float()
            codes = torch.where(z > 0, 1.0, -1.0)  # (B,D,h,w)
            commitment_loss = F.mse_loss(z, codes)  # ‖z − sg[q(z)]‖² (codes carry no gradient)
            entropy_term = self.entropy_loss(z.permute(0, 2, 3, 1).reshape(-1, self.embedding_dim))
            z_q = codes + (z - z.detach())  # value exactly the code, gradient the identity
            indices = self._index(z)
            counts = code_counts(indices, self.codebook_size)
            perplexity, usage = code_stats(counts)
        return QuantizerOutput(
            z_q=z_q, indices=indices, losses={"commitment_loss": commitment_loss, "entropy_loss": entropy_term},
            loss=self.config.commitment_cost * commitment_loss + self.config.entropy_weight * entropy_term,
            stats=QuantizerStats(counts=counts, perplexity=perplexity, code_usage_rate=usage,
                                 restarted=torch.zeros((), dtype=torch.long, device=z_e.device)),
        )
