"""What a :class:`~animevq.train.module.VQVAEModel` adds to a Lightning checkpoint and checks
in one it resumes from (its ``on_save_checkpoint`` and ``on_load_checkpoint``).

Beside the state dict (the tokenizer, its weight EMA when ``ema_decay > 0``, the objective's
discriminator and LeCam averages; never the frozen LPIPS network, rebuilt from its weights
file), a checkpoint holds ``checkpoint["animevq"]``: the batch counter, the guard's count of
skipped batches and the window behind the logged code usage.
"""

from __future__ import annotations

from typing import Any

import torch

from ..nn.weights import check_state_dict
from ..runs.checkpoint_io import CheckpointError, ema_tokenizer_state, migrate_state_dict, tokenizer_state
from .resumed import check_resumed_settings

__all__ = ["LPIPS_PREFIX", "load_training_state", "save_training_state"]

LPIPS_PREFIX = "objective.lpips."  # the frozen LPIPS network: rebuilt from its weights file, never saved


def save_training_state(model: Any, checkpoint: dict[str, Any]) -> None:
    """Drop LPIPS from ``checkpoint``'s state dict and add the model's own counters."""
    model.guard.settle()  # the guard's total as of now
    state = checkpoint["state_dict"]
    for key in [k for k in state if k.startswith(LPIPS_PREFIX)]:
        del state[key]
    checkpoint["animevq"] = {
        "batches_seen": model.batches_seen,
        "nonfinite_total": model.guard.total,
        # Not in the state dict (exports stay lean), but the logged usage window continues.
        "usage_history": model.usage.history.detach().clone(),
    }


def load_training_state(model: Any, checkpoint: dict[str, Any]) -> None:
    """Check that ``checkpoint`` fits ``model`` (settings, tokenizer shapes, a weight EMA if and
    only if the model keeps one), put LPIPS back into its state dict and restore the counters.

    Raises:
        CheckpointError: another architecture, or ema_decay switched on or off.
    """
    source = getattr(model._trainer, "ckpt_path", None) if model._trainer is not None else None
    source = str(source or "the checkpoint")
    if isinstance(checkpoint.get("hyper_parameters"), dict):
        check_resumed_settings(checkpoint["hyper_parameters"], model.config, source)
    checkpoint["state_dict"] = state = migrate_state_dict(checkpoint["state_dict"])
    check_state_dict(model.tokenizer, tokenizer_state(state), source=source)
    averaged = ema_tokenizer_state(state)
    if bool(averaged) != (model.ema_tokenizer is not None):  # hparams that do not record ema_decay
        held, now = ("holds", "0") if averaged else ("holds no", str(model.config.optimization.ema_decay))
        raise CheckpointError(f"checkpoint {source} {held} weight EMA, but ema_decay is {now} now: resume with "
                              "the ema_decay it was trained with (on or off), or start a new run")
    if model.ema_tokenizer is not None:
        check_state_dict(model.ema_tokenizer, averaged, source=source)
    if model.objective.lpips is not None:
        for key, value in model.objective.lpips.state_dict().items():
            state.setdefault(f"{LPIPS_PREFIX}{key}", value)
    ours = checkpoint.get("animevq", {})
    model.batches_seen = int(ours.get("batches_seen", 0))
    model.guard.total = int(ours.get("nonfinite_total", 0))
    history = ours.get("usage_history")
    if isinstance(history, torch.Tensor) and history.shape == model.usage.history.shape:
        model.usage.history.copy_(history)
