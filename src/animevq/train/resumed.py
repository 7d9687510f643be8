"""What a resumed run may change: its architecture must match the checkpoint's, and every
other setting that differs is applied from the first resumed batch and said so.

Lightning restores the optimisers' and schedulers' states after the model is built from the
new settings, and those states carry the old learning rates, betas and weight decay:
:func:`~animevq.train.optim.apply_adam_options` puts the new ones back at ``on_train_start``.
Everything else (loss weights, the discriminator's schedule, logging, the warm-up and cosine
schedule's shape) is read from the model's config at each step, so it applies by itself.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ..config import ModelConfig, architecture_differences, settings_changes
from ..runs.checkpoint_io import CheckpointError

__all__ = ["check_resumed_settings"]

log = logging.getLogger(__name__)


def check_resumed_settings(saved: Mapping[str, Any], current: ModelConfig, source: str) -> None:
    """Refuse a checkpoint whose hyperparameters ``saved`` describe another architecture than
    ``current``; warn, listing them, about the settings that changed.

    Raises:
        CheckpointError: the hyperparameters build no model, or the architectures differ.
    """
    try:
        saved_config = ModelConfig.from_hparams(saved, fill=current)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {source} holds hyperparameters that build no model: {error}; "
                              "pass another checkpoint with --ckpt_path") from None
    differences = architecture_differences(saved_config, current)
    if differences:
        raise CheckpointError(
            f"checkpoint {source} was written by a different model, so it cannot be loaded into this one: "
            f"{'; '.join(differences)}. Resume with the settings it was trained with (its hyper_parameters, or "
            "config.yaml in its run folder), or start a new run without --ckpt_path."
        )
    changes = settings_changes(saved_config, current)
    if changes:
        log.warning("resuming %s with changed settings, applied from the first resumed batch on: %s",
                    source, "; ".join(changes))
