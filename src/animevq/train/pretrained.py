"""The settings and weights a :class:`~animevq.train.module.VQVAEModel` takes from an export
(``VQVAEModel.from_pretrained``): a local folder or a Hub repo id, read through the one loader
of exports (:func:`animevq.nn.tokenizer.read_pretrained`) with the Tokenizer's checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from ..config import ModelConfig
from ..nn.tokenizer import Tokenizer, read_pretrained, resolve_pretrained
from ..runs.checkpoint_io import CheckpointError

__all__ = ["PretrainedModel", "read_pretrained_model"]


class PretrainedModel(NamedTuple):
    """What a VQVAEModel is built from."""

    hparams: dict[str, Any]  # VQVAEModel's constructor arguments
    tokenizer: Tokenizer  # the export's weights, checked, in eval mode on the CPU


def read_pretrained_model(name_or_path: str | Path, overrides: dict[str, Any], *, revision: str | None,
                          cache_dir: str | Path | None, force_download: bool, local_files_only: bool,
                          token: str | bool | None) -> PretrainedModel:
    """The constructor arguments (an animevq 0.1 export's training settings, then ``overrides``;
    LPIPS off unless asked for) and the tokenizer of an export.

    Raises:
        CheckpointError: the export is missing, unsafe, or does not build a VQVAEModel.
    """
    folder = resolve_pretrained(name_or_path, revision=revision, cache_dir=cache_dir, force_download=force_download,
                                local_files_only=local_files_only, token=token)
    pretrained = read_pretrained(folder)
    saved = pretrained.metadata if pretrained.version == 1 else {}
    config = ModelConfig.from_hparams({**saved, "use_lpips": False})
    hparams = config.replace_tokenizer(pretrained.config).to_hparams()
    for key, value in overrides.items():
        hparams[key] = {**hparams[key], **value} if isinstance(hparams.get(key), dict) else value
    try:
        config = ModelConfig.from_hparams(hparams)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"the config in {folder} does not build a VQVAEModel: {error}") from error
    # The Tokenizer's checks (shapes on the meta device first, then finite values) before the
    # model, with its LPIPS and discriminator, is allocated.
    tokenizer = Tokenizer.from_state(config.tokenizer, pretrained.state, source=str(pretrained.weights_path))
    return PretrainedModel(hparams, tokenizer)
