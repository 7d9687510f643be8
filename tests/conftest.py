"""Shared fixtures: one tiny configuration and one tiny trainer, for tests that run on 2 CPU
cores in seconds (the tester-config idea of diffusers' model tests)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
FIXTURES = TESTS / "fixtures"
# This checkout's package, the seed's import paths at the root, and the helper modules here
# (tests in subfolders import them by name).
for path in (TESTS, ROOT, ROOT / "src"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

os.environ.setdefault("SWANLAB_MODE", "local")
torch.set_num_threads(1)  # tiny models: two threads on a 2-core CI machine only contend

from animevq.nn import TokenizerConfig, VQConfig  # noqa: E402

TINY = dict(  # a 4-stage model of 8–16 channels: 32×32 images → 2×2 grids (the seed's parameter names)
    latent_channels=16,
    encoder_channels=(8, 16, 16, 16),
    decoder_channels=(16, 16, 16, 8),
    num_res_blocks=1,
    num_embeddings=16,
    embedding_dim=16,
)
TINY_TOKENIZER = TokenizerConfig(
    latent_channels=16, encoder_channels=(8, 16, 16, 16), decoder_channels=(16, 16, 16, 8), num_res_blocks=1,
    quantizer=VQConfig(num_embeddings=16, embedding_dim=16),
)


def merged(kwargs: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """VQVAEModel arguments with ``overrides``: seed parameters replace, groups (dicts) merge."""
    out = dict(kwargs)
    for key, value in overrides.items():
        out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def model_kwargs(**overrides: Any) -> dict[str, Any]:
    """VQVAEModel arguments of the tiny model without LPIPS or warm-up, with ``overrides``."""
    return merged(dict(TINY, use_lpips=False, optimization={"warmup_steps": 0}), overrides)


def yaml_model(**overrides: Any) -> dict[str, Any]:
    """:func:`model_kwargs` as the ``model:`` section of a YAML config (lists, not tuples)."""
    from animevq.nn.config import plain

    return plain(model_kwargs(**overrides))


def tiny_model(**overrides: Any):
    """The tiny VQVAEModel (see :func:`model_kwargs`)."""
    from animevq import VQVAEModel

    return VQVAEModel(**model_kwargs(**overrides))


def tiny_trainer(**overrides: Any):
    """A CPU Trainer that writes nothing unless asked: no logger, checkpoints, bars or summary."""
    import lightning.pytorch as pl

    settings: dict[str, Any] = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                                    enable_progress_bar=False, enable_model_summary=False)
    return pl.Trainer(**{**settings, **overrides})


def random_batches(n: int, batch_size: int = 2, size: int = 32, seed: int = 0) -> list[torch.Tensor]:
    """``n`` batches of random images (B,3,S,S) in [-1,1]."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(batch_size, 3, size, size, generator=g) * 2 - 1 for _ in range(n)]


def loader(batches: list[torch.Tensor]) -> torch.utils.data.DataLoader:
    """A DataLoader yielding ``batches`` as they are."""
    return torch.utils.data.DataLoader(batches, batch_size=None)


@pytest.fixture
def tiny_kwargs() -> dict:
    return model_kwargs()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
