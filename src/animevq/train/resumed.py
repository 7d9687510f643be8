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

from ..config import ARCHITECTURE_KEYS, ModelConfig
from ..runs.checkpoint_io import CheckpointError

__all__ = ["architecture_differences", "check_resumed_settings", "settings_changes"]

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


def _normalise(value: Any) -> Any:
    return tuple(_normalise(v) for v in value) if isinstance(value, (list, tuple)) else value


def architecture_differences(saved: ModelConfig, current: ModelConfig) -> list[str]:
    """``"name: checkpoint A, now B"`` for each setting that makes a checkpoint of ``saved``
    unusable for resuming a model of ``current``: tensor shapes, and switches that change what
    the tensors are (VQ-GAN or not, an EMA codebook or one trained by gradient, ...)."""
    a, b = saved.seed_values(), current.seed_values()
    differences = [f"{k}: checkpoint {_normalise(a[k])}, now {_normalise(b[k])}"
                   for k in ARCHITECTURE_KEYS if _normalise(a[k]) != _normalise(b[k])]
    for label, derive in _DERIVED:
        before, now = derive(saved), derive(current)
        if before != now:
            differences.append(f"{label}: checkpoint {before}, now {now}")
    return differences


_DERIVED = (
    ("lambda_gan > 0 (VQ-GAN)", lambda c: c.adversarial_on),
    ("quantizer family", lambda c: c.tokenizer.quantizer.family),
    ("quantizer levels", lambda c: list(getattr(c.tokenizer.quantizer, "levels", ())) or None),
    ("decay > 0 (EMA codebook)", lambda c: getattr(c.tokenizer.quantizer, "decay", 0.0) > 0),
    ("l2_normalize_codes", lambda c: getattr(c.tokenizer.quantizer, "l2_normalize_codes", False)),
    ("disc_norm", lambda c: c.adversarial.disc_norm if c.adversarial_on else None),
    ("disc_channels", lambda c: c.adversarial.disc_channels if c.adversarial_on else None),
    ("lecam_weight > 0", lambda c: c.adversarial.lecam_weight > 0 and c.adversarial_on),
    ("ema_decay > 0 (weight EMA)", lambda c: c.optimization.ema_decay > 0),
)


def settings_changes(saved: ModelConfig, current: ModelConfig) -> list[str]:
    """``"name: checkpoint A, now B"`` for each setting (seed parameter or ``group.field``)
    that differs between a checkpoint of ``saved`` and a resumed model of ``current``."""
    def flat(hparams: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in hparams.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, Mapping) else {prefix + key: value})
        return out

    a, b = flat(saved.to_hparams()), flat(current.to_hparams())
    return [f"{k}: checkpoint {_normalise(a.get(k))}, now {_normalise(b[k])}"
            for k in b if _normalise(a.get(k)) != _normalise(b[k])]
