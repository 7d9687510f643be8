"""Learning-rate schedules (pure functions of the step)."""

from __future__ import annotations

import math

__all__ = ["warmup_cosine"]


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
