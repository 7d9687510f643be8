"""Weight EMA: a smoothed copy of the tokenizer's weights (Polyak & Juditsky 1992), the weights
Open-MAGVIT2, MaskBit and UniTok validate and release.

After every optimiser step of the tokenizer, each floating parameter of the copy moves towards
the live one, ``θ_ema ← d·θ_ema + (1−d)·θ`` (a fixed decay ``d``, no warm-up: the copy starts as
the live weights themselves), and every buffer is copied as it is (VQ-EMA's codebook
``embedding``, ``cluster_size``, ``updates``: the codebook is already an average of its own).
The copy is a submodule of the LightningModule, so it is saved, restored and moved to the device
with the live weights, and it never needs gradients.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["ema_copy", "ema_update"]


def ema_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` (taken before any ``torch.compile``) whose parameters need no gradient:
    no optimiser, DDP reducer or gradient clipping ever sees them."""
    average = copy.deepcopy(module)
    average.requires_grad_(False)
    return average


@torch.no_grad()
def ema_update(average: nn.Module, live: nn.Module, *, decay: float, skip: torch.Tensor | None = None) -> None:
    """One EMA step of ``average`` (from :func:`ema_copy`) towards ``live``: ``θ_ema ← d·θ_ema + (1−d)·θ``.

    ``skip``, a 0-d bool tensor on the weights' device, is the non-finite guard's verdict on
    the batch just stepped, decided on the device: where it is true the weight of the step is
    zero and its buffers stay (``torch.where``, no host synchronisation), so the average keeps
    its values (the live weights, left as they were by that skipped step, are finite). Float32 weights take one
    ``_foreach_lerp_``; others (a ``*-true`` precision) are averaged in float32 and rounded back.
    """
    weight: float | torch.Tensor = 1.0 - decay
    if skip is not None:
        weight = torch.where(skip, 0.0, weight).to(torch.float32)
    pairs = [(a, p) for a, p in zip(average.parameters(), live.parameters(), strict=True) if a.is_floating_point()]
    single = [(a, p) for a, p in pairs if a.dtype == torch.float32]
    if single:
        torch._foreach_lerp_([a for a, _ in single], [p for _, p in single], weight)
    for a, p in pairs:
        if a.dtype != torch.float32:  # rounding 1−d away in bfloat16 would freeze the average
            a.copy_(a.float().lerp_(p.float(), weight))
    for a, b in zip(average.buffers(), live.buffers(), strict=True):
        # VQ-GAN steps before the guard puts the skipped batch's codebook statistics back.
        a.copy_(b if skip is None else torch.where(skip, a, b))
