"""The entropy penalty of MAGVIT-v2 (Yu et al. 2023, §3.1), shared by LFQ and IBQ.

    loss = w_sample·E_n[H(q(·|z_n))] − w_codebook·H(E_n[q(·|z_n)])

The first term makes each vector confident of one code, the second spreads the batch over the
whole codebook. Under DDP the batch mean E_n is over every rank's vectors (:func:`sum_over_ranks`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["entropy", "global_mean", "softmax_entropy_loss", "sum_over_ranks"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(sum) whose gradient is all_reduce(sum) too: every rank's loss depends on every
    rank's inputs, so, after DDP averages the ranks' gradients, each input gets the gradient of
    one process on the global batch."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over the ranks (itself outside DDP), differentiable."""
    return _SumOverRanks.apply(tensor) if _distributed() else tensor


def global_mean(sums: list[torch.Tensor], count: int) -> list[torch.Tensor]:
    """Per-rank sums over ``count`` vectors each → their means over every rank's vectors, in one
    collective."""
    count_tensor = sums[0].new_full((1,), float(count))  # a fill, not a host-to-device copy: no sync
    total = sum_over_ranks(torch.cat([*(s.reshape(-1) for s in sums), count_tensor]))
    means, offset = [], 0
    for s in sums:
        means.append(total[offset:offset + s.numel()].view_as(s) / total[-1])
        offset += s.numel()
    return means


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of distributions along the last dimension."""
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1)


def softmax_entropy_loss(logits: torch.Tensor, temperature: float, sample_weight: float,
                         codebook_weight: float) -> torch.Tensor:
    """The penalty above for q = softmax(logits/τ) over (N,K) float32 logits."""
    log_q = (logits / temperature).log_softmax(dim=1)  # (N,K)
    q = log_q.exp()
    sample = -(q * log_q).sum(1).mean()
    (mean,) = global_mean([q.sum(0)], logits.shape[0])  # (K,)
    return sample_weight * sample - codebook_weight * entropy(mean)
