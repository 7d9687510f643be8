"""IBQ: index backpropagation quantisation, where every code of the codebook gets gradient.

Shi et al. 2024, "Taming Scalable Visual Tokenizer for Autoregressive Image Generation"
(arXiv 2412.02692); reference code TencentARC/SEED-Voken
``src/IBQ/modules/vqvae/quantize.py``, class ``IndexPropagationQuantize``. The code logits are
inner products l_k = ⟨z, c_k⟩; the chosen code is argmax_k l_k, and the one-hot of that
choice is made differentiable by the straight-through one-hot

    one_hot = hard − sg[softmax(l)] + softmax(l),   z_q = one_hot · C,

whose value is the hard one-hot and whose gradient reaches every code through the softmax.
The decoder gets this z_q; the encoder's gradient flows through the logits (there is no
VQ-VAE straight-through copy of dL/dz_q).

The reference's "double quantisation" loss is

    ‖z_q − z‖² + ‖sg[z_q_hard] − z‖² + β‖z_q_hard − sg[z]‖²,

with z_q_hard = hard · C and each ‖·‖² a mean over all values. Its terms are named here
``double_quant_loss`` (the first, with gradient to the encoder and, through the one-hot, to
every code), ``commitment_loss`` and ``vq_loss``. As in VQ-VAE (eq. 3) β weighs the
commitment term; the reference puts it on the codebook term (taming's legacy order). The
reference's training recipe adds MAGVIT-v2's entropy loss over softmax(l/τ) with weight 0.05
(``configs/IBQ/gpu/imagenet_ibqgan_*.yaml``), here ``entropy_loss`` (``entropy_weight``; 0 turns
it off): without it the argmax of inner products collapses onto a few codes.

Shapes: B batch, D code dimension, h×w latent grid, N = B·h·w vectors, K codes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quantizer_config import IBQConfig
from .base import CodebookQuantizer, QuantizerOutput, QuantizerStats, code_counts, code_stats
from .entropy import softmax_entropy_loss
from .kmeans import DISTANCE_CHUNK_ELEMENTS, _full_float32

__all__ = ["IndexBackpropagationQuantizer", "best_code"]

DOUBLE_QUANT_WEIGHT = 1.0  # the reference adds the term to its quantisation loss unweighted
_D = IBQConfig  # the one place of the defaults below


def best_code(z: torch.Tensor, codebook: torch.Tensor, chunk_elements: int = DISTANCE_CHUNK_ELEMENTS) -> torch.Tensor:
    """Index of the code of largest inner product, in float32, in row chunks.

    z: (N,D), codebook: (K,D) → (N,) int64; at most ``chunk_elements`` logits are alive at once.
    """
    with torch.autocast(device_type=z.device.type, enabled=False), _full_float32():
        z, e = z.float(), codebook.float()
        if torch.compiler.is_exporting():  # one graph for any batch size (ONNX): no chunks
            return (z @ e.t()).argmax(dim=1)  # (N,K) → (N,)
        rows = max(1, chunk_elements // max(1, e.shape[0]))
        out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
        for start in range(0, z.shape[0], rows):
            out[start : start + rows] = (z[start : start + rows] @ e.t()).argmax(dim=1)  # (n,K) → (n,)
        return out


class IndexBackpropagationQuantizer(CodebookQuantizer):
    """Quantiser whose straight-through one-hot passes gradient to the whole codebook.

    The arguments are :class:`~animevq.nn.quantizer_config.IBQConfig`'s fields.
    """

    def __init__(
        self,
        num_embeddings: int = _D.num_embeddings,
        embedding_dim: int = _D.embedding_dim,
        commitment_cost: float = _D.commitment_cost,
        *,
        entropy_weight: float = _D.entropy_weight,
        sample_entropy_weight: float = _D.sample_entropy_weight,
        codebook_entropy_weight: float = _D.codebook_entropy_weight,
        entropy_temperature: float = _D.entropy_temperature,
    ) -> None:
        super().__init__()
        self.config = IBQConfig(  # validates every setting
            num_embeddings=num_embeddings, embedding_dim=embedding_dim, commitment_cost=commitment_cost,
            entropy_weight=entropy_weight, sample_entropy_weight=sample_entropy_weight,
            codebook_entropy_weight=codebook_entropy_weight, entropy_temperature=entropy_temperature)
        self.num_embeddings, self._embedding_dim = num_embeddings, embedding_dim
        self.commitment_cost = commitment_cost
        # N(0,1): the reference's nn.Embedding default (its VectorQuantizer's uniform ±1/K
        # init is not used for IBQ).
        self.embedding = nn.Parameter(torch.randn(num_embeddings, embedding_dim))  # (K,D)

    @property
    def codebook(self) -> torch.Tensor:
        """The (K,D) codebook C."""
        return self.embedding

    @property
    def loss_weights(self) -> dict[str, float]:
        return {"double_quant_loss": DOUBLE_QUANT_WEIGHT, "entropy_loss": self.config.entropy_weight}

    @torch.no_grad()
    def encode(self, z_e: torch.Tensor) -> torch.Tensor:
        """Codes of largest logit of (B,D,h,w) latents → (B,h,w) int64."""
        self.check_latents(z_e)
        z = z_e.float().permute(0, 2, 3, 1)  # (B,h,w,D)
        return best_code(z.reshape(-1, self.embedding_dim), self.embedding).view(z.shape[:-1])

    def forward(self, z_e: torch.Tensor) -> QuantizerOutput:
        """Quantise (B,D,h,w) encoder output. Training and eval modes behave alike (no state)."""
        self.check_latents(z_e)
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            z = z_e.float().permute(0, 2, 3, 1)  # (B,h,w,D) float32
            flat = z.reshape(-1, self.embedding_dim)  # (N,D)
            codebook = self.embedding.float()  # (K,D)
            with _full_float32():
                logits = flat @ codebook.t()  # (N,K) l_k = ⟨z, c_k⟩
            indices = logits.argmax(dim=1)  # (N,)
            soft = logits.softmax(dim=1)  # (N,K)
            cfg = self.config
            entropy = (softmax_entropy_loss(logits, cfg.entropy_temperature, cfg.sample_entropy_weight,
                                            cfg.codebook_entropy_weight) if cfg.entropy_weight > 0 else None)
            del logits
            # one_hot·C without the (N,K) one-hots: hard·C is a gather, and the soft part
            # soft·sg[C] − sg[soft·C] is zero in value, so z_q is exactly the hard code, with
            # the reference's gradients: hard·g to the chosen codes directly (the value of the
            # straight-through one-hot), and g·Cᵀ through the softmax to z and to every code.
            hard = F.embedding(indices, codebook)  # (N,D) z_q_hard = hard·C
            soft_codes = soft @ codebook.detach()  # (N,D)
            z_q = hard + (soft_codes - soft_codes.detach())  # (N,D) one_hot·C
            vq_loss = F.mse_loss(hard, flat.detach())  # ‖z_q_hard − sg[z]‖²: trains the chosen codes
            commitment_loss = F.mse_loss(flat, hard.detach())  # ‖sg[z_q_hard] − z‖²: trains the encoder
            double_quant_loss = F.mse_loss(z_q, flat)  # ‖z_q − z‖²: both, and every code via the softmax
            counts = code_counts(indices, self.num_embeddings)  # (K,)
            perplexity, usage = code_stats(counts)
        losses = {"vq_loss": vq_loss, "commitment_loss": commitment_loss, "double_quant_loss": double_quant_loss}
        loss = vq_loss + self.commitment_cost * commitment_loss + DOUBLE_QUANT_WEIGHT * double_quant_loss
        if entropy is not None:
            losses["entropy_loss"] = entropy
            loss = loss + cfg.entropy_weight * entropy
        return QuantizerOutput(
            z_q=z_q.view_as(z).permute(0, 3, 1, 2),  # (N,D) → (B,h,w,D) → (B,D,h,w)
            indices=indices.view(z.shape[:-1]),  # (N,) → (B,h,w)
            losses=losses,
            loss=loss,
            stats=QuantizerStats(counts=counts, perplexity=perplexity, code_usage_rate=usage,
                                 restarted=torch.zeros((), dtype=torch.long, device=z.device)),
        )
