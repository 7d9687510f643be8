"""Adam and the learning-rate schedule: warm-up, then cosine (SPEC §1)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..config import OptimizerConfig

__all__ = ["make_adam", "make_scheduler", "warmup_cosine"]


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int | None, min_lr_ratio: float) -> float:
    """Multiplier of the base learning rate: linear warm-up from 0 over ``warmup_steps``,
    then a half cosine down to ``min_lr_ratio`` at ``total_steps`` (Loshchilov & Hutter
    2017, SGDR without restarts); constant after warm-up when the length is unknown."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps is None or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_adam(params: Sequence[nn.Parameter], config: OptimizerConfig, *, lr: float, clipping: bool) -> torch.optim.Adam:
    """Adam over ``params``. Fused Adam updates all tensors in one kernel and lets the
    non-finite guard skip a step without a host synchronisation, but Lightning cannot clip its
    gradients under mixed precision (it unscales internally): runs that clip use the foreach kernel."""
    fused = {p.device.type for p in params} in ({"cuda"}, {"cpu"}) and not clipping
    return torch.optim.Adam(params, lr=lr, betas=tuple(config.betas), weight_decay=config.weight_decay, fused=fused)


def make_scheduler(optimizer: torch.optim.Optimizer, config: OptimizerConfig,
                   total_steps: int | None) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up then cosine to ``min_lr_ratio`` over ``total_steps`` (or constant, per ``lr_schedule``)."""
    total = total_steps if config.lr_schedule == "cosine" else None
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(step, warmup_steps=config.warmup_steps, total_steps=total,
                                   min_lr_ratio=config.min_lr_ratio),
    )
