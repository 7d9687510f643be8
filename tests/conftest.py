"""Shared fixtures: tiny models and images that run on 2 CPU cores in seconds."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "src"):  # this checkout's package, and the seed's import paths at the root
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

os.environ.setdefault("SWANLAB_MODE", "local")
torch.set_num_threads(1)  # tiny models: two threads on a 2-core CI machine only contend

TINY = dict(  # a 4-stage model of 8–16 channels: 32×32 images → 2×2 grids
    latent_channels=16,
    encoder_channels=(8, 16, 16, 16),
    decoder_channels=(16, 16, 16, 8),
    num_res_blocks=1,
    num_embeddings=16,
    embedding_dim=16,
)


@pytest.fixture
def tiny_kwargs() -> dict:
    return dict(TINY, use_lpips=False, warmup_steps=0)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
