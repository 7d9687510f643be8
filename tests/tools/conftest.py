"""Fixtures of the tool tests: a trained tiny model, its checkpoint and a folder of drawings."""

from __future__ import annotations

from pathlib import Path

import pytest
from tooling import save_ckpt, trained, write_images

from animevq import VQVAEModel


@pytest.fixture
def model() -> VQVAEModel:
    return trained()


@pytest.fixture
def ckpt(model: VQVAEModel, tmp_path: Path) -> Path:
    return save_ckpt(model, tmp_path / "model.ckpt")


@pytest.fixture
def images(tmp_path: Path) -> Path:
    return write_images(tmp_path / "images")
