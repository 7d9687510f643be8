"""Adam and the learning-rate schedule: warm-up, then cosine (SPEC §1)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..config import OptimizerConfig

__all__ = ["adam_options", "apply_adam_options", "make_scheduler", "warmup_cosine"]


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


def adam_options(params: Sequence[nn.Parameter], config: OptimizerConfig, *, lr: float,
                 clipping: bool) -> dict[str, Any]:
    """Adam's settings for ``params``. Fused Adam updates all tensors in one kernel and lets the
    non-finite guard skip a step without a host synchronisation, but Lightning cannot clip its
    gradients under mixed precision (it unscales internally): runs that clip use the foreach kernel."""
    fused = {p.device.type for p in params} in ({"cuda"}, {"cpu"}) and not clipping
    return {"lr": lr, "betas": tuple(config.betas), "weight_decay": config.weight_decay, "fused": fused}


def apply_adam_options(optimizer: torch.optim.Optimizer, scheduler: Any, options: dict[str, Any]) -> None:
    """Put ``options`` back into an optimizer (and its LambdaLR) whose states a resume loaded.

    ``load_state_dict`` restores the checkpoint's learning rate, betas and weight decay along with
    Adam's moments, and the scheduler's ``base_lrs``: settings changed for the resumed run would be
    recorded in its hyperparameters and not used. The current learning rate becomes the new base
    times the schedule's factor at the restored step. Values that did not change are left as loaded,
    so a resume with the same settings is exact.
    """
    lr = options["lr"]
    base_changed = scheduler is not None and any(base != lr for base in scheduler.base_lrs)
    for group in optimizer.param_groups:
        for key in ("betas", "weight_decay", "fused"):
            if group.get(key) != options[key]:
                group[key] = options[key]
        if scheduler is None and group["lr"] != lr:
            group["lr"] = lr
    if base_changed:
        scheduler.base_lrs = [lr] * len(optimizer.param_groups)
        factors = [factor(scheduler.last_epoch) for factor in scheduler.lr_lambdas]
        for group, factor in zip(optimizer.param_groups, factors, strict=True):
            group["initial_lr"], group["lr"] = lr, lr * factor
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def make_scheduler(optimizer: torch.optim.Optimizer, config: OptimizerConfig,
                   total_steps: int | None) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up then cosine to ``min_lr_ratio`` over ``total_steps`` (or constant, per ``lr_schedule``)."""
    total = total_steps if config.lr_schedule == "cosine" else None
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(step, warmup_steps=config.warmup_steps, total_steps=total,
                                   min_lr_ratio=config.min_lr_ratio),
    )
