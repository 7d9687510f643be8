"""animevq: VQ-VAE / VQ-GAN image tokenizers for anime and illustration images.

Public API::

    from animevq import VQVAEModel, AnimeDataModule, SwanLabLogger   # training
    from animevq import Tokenizer                                    # images <-> codes, pure PyTorch

Names resolve on first use, so ``import animevq.nn`` (and ``animevq.Tokenizer``) stays free
of Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0.dev0"  # the one place of the version (pyproject.toml reads it)

_EXPORTS = {
    "AnimeDataModule": "animevq.data",
    "VQVAEModel": "animevq.train.module",
    "VQVAEOutput": "animevq.train.module",
    "ModelConfig": "animevq.config",
    "Tokenizer": "animevq.nn",
    "TokenizerConfig": "animevq.nn",
    "VQConfig": "animevq.nn",
    "ResBlock": "animevq.nn",
    "Encoder": "animevq.nn",
    "Decoder": "animevq.nn",
    "VectorQuantizerEMA": "animevq.nn",
    "QuantizerOutput": "animevq.nn",
    "LPIPS": "animevq.nn",
    "PatchDiscriminator": "animevq.nn",
    "SwanLabLogger": "animevq.tracking",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'animevq' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
