"""SimVQ: a frozen random codebook re-parameterised by one learned linear layer.

Zhu et al. 2024, "Addressing Representation Collapse in Vector Quantized Models with One
Linear Layer" (arXiv 2411.02038), §3: the paper's codes C·W, here E = C·Wᵀ + b for a frozen
random C (K×D) and a learned ``nn.Linear(D, D)`` (with bias, as in the reference code,
youngsheen/SimVQ ``taming/modules/vqvae/quantize.py``, class ``SimVQ``). The codebook loss
trains W and b only, so every code moves with every update, which is what keeps the whole
codebook in use. Nearest neighbour, losses and straight-through are VQ-VAE's
(van den Oord et al. 2017, eq. 3), β on the commitment term (the reference's default
``legacy=True`` puts it on the codebook term, a taming bug it keeps for compatibility).

Shapes: B batch, D code dimension, h×w latent grid, N = B·h·w vectors, K codes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quantizer_config import SimVQConfig
from .base import CodebookQuantizer, QuantizerOutput, QuantizerStats, TrainingSnapshot, code_counts, code_stats
from .kmeans import nearest_code

__all__ = ["SimVQ"]

_D = SimVQConfig  # the one place of the defaults below


def frozen_codebook(num_embeddings: int, embedding_dim: int, seed: int) -> torch.Tensor:
    """The frozen (K,D) codebook C ~ N(0, 1/D) (the reference's ``std=e_dim**-0.5``), drawn
    from its own generator: the same ``seed`` gives the same C on every rank and in every run."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_embeddings, embedding_dim, generator=generator) * embedding_dim**-0.5


class SimVQ(CodebookQuantizer):
    """Nearest-neighbour quantiser over the codes E = C·Wᵀ + b (C frozen, W and b learned).

    The arguments are :class:`~animevq.nn.quantizer_config.SimVQConfig`'s fields; C is a
    buffer (saved with the weights, never trained), W and b are ``projection``'s parameters.
    """

    def __init__(
        self,
        num_embeddings: int = _D.num_embeddings,
        embedding_dim: int = _D.embedding_dim,
        commitment_cost: float = _D.commitment_cost,
        *,
        seed: int = _D.seed,
    ) -> None:
        super().__init__()
        self.config = SimVQConfig(num_embeddings=num_embeddings, embedding_dim=embedding_dim,
                                  commitment_cost=commitment_cost, seed=seed)  # validates every setting
        self.num_embeddings, self._embedding_dim = num_embeddings, embedding_dim
        self.commitment_cost, self.seed = commitment_cost, seed
        self.register_buffer("base_codebook", frozen_codebook(num_embeddings, embedding_dim, seed))  # C, (K,D)
        # W and b: nn.Linear's own initialisation, as in the reference.
        self.projection = nn.Linear(embedding_dim, embedding_dim)

    @property
    def codebook(self) -> torch.Tensor:
        """The effective (K,D) codes E = C·Wᵀ + b, in float32 (differentiable in W and b)."""
        with torch.autocast(device_type=self.base_codebook.device.type, enabled=False):
            weight, bias = self.projection.weight, self.projection.bias
            return F.linear(self.base_codebook.float(), weight.float(), bias.float())  # (K,D)·(D,D)ᵀ + (D,)

    # A training forward changes no state (C is frozen, W is a parameter): nothing for a skipped
    # batch to put back. Copying C back in place would also bump the version of a tensor that
    # the backward of C·Wᵀ still needs.
    def training_snapshot(self) -> TrainingSnapshot:
        return TrainingSnapshot([], {})

    def restore_training_snapshot(self, snapshot: TrainingSnapshot, skip: torch.Tensor | None = None) -> None:
        pass

    @torch.no_grad()
    def encode(self, z_e: torch.Tensor) -> torch.Tensor:
        """Nearest codes of (B,D,h,w) latents → (B,h,w) int64."""
        self.check_latents(z_e)
        z = z_e.float().permute(0, 2, 3, 1)  # (B,h,w,D)
        return nearest_code(z.reshape(-1, self.embedding_dim), self.codebook).view(z.shape[:-1])

    def forward(self, z_e: torch.Tensor) -> QuantizerOutput:
        """Quantise (B,D,h,w) encoder output. Training and eval modes behave alike (no state)."""
        self.check_latents(z_e)
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            z = z_e.float().permute(0, 2, 3, 1)  # (B,h,w,D) float32
            flat = z.reshape(-1, self.embedding_dim)  # (N,D)
            codes = self.codebook  # (K,D), carries the gradient to W and b
            indices = nearest_code(flat.detach(), codes.detach())  # (N,)
            counts = code_counts(indices, self.num_embeddings)  # (K,)
            z_q = F.embedding(indices, codes).view_as(z)  # (B,h,w,D)
            vq_loss = F.mse_loss(z_q, z.detach())  # ‖sg[z] − E_k‖²: trains W and b (eq. 3's codebook term)
            commitment_loss = F.mse_loss(z, z_q.detach())  # ‖z − sg[E_k]‖²: trains the encoder
            # Straight-through (VQ-VAE §3.2), written so the value is exactly the code: the
            # decoder then sees what indices_to_codes(encode(z_e)) gives, bit for bit.
            z_q = z_q.detach() + (z - z.detach())
            perplexity, usage = code_stats(counts)
        return QuantizerOutput(
            z_q=z_q.permute(0, 3, 1, 2),  # (B,h,w,D) → (B,D,h,w)
            indices=indices.view(z.shape[:-1]),  # (N,) → (B,h,w)
            losses={"vq_loss": vq_loss, "commitment_loss": commitment_loss},
            loss=vq_loss + self.commitment_cost * commitment_loss,
            stats=QuantizerStats(counts=counts, perplexity=perplexity, code_usage_rate=usage,
                                 restarted=torch.zeros((), dtype=torch.long, device=z.device)),
        )
