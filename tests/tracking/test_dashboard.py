"""End to end: a tiny Lightning fit logs SPEC §5's keys in local mode, then `swanlab watch`
serves them (JSON API) and headless Chromium renders the experiment page.

Slow (starts a server and a browser): ``pytest -m slow tests/test_dashboard.py``. Without
Chromium the browser test is skipped locally and fails under CI (``CI`` set), where
``.ci/run`` installs it.
"""

from __future__ import annotations

import base64
import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import swanlab
import torch
from conftest import tiny_trainer
from dashboard import (
    api_get,
    api_keys,
    chromium_dump_dom,
    experiment_ids,
    fetch_media,
    fetch_scalar,
    find_chromium,
    swanlab_dashboard,
)
from PIL import Image

from animevq.tracking import SwanLabLogger, log_image, make_reconstruction_grid

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

TRAIN_KEYS = (  # SPEC §5, exactly
    "train/recon_loss",
    "train/vq_loss",
    "train/commitment_loss",
    "train/perc_loss",
    "train/total_loss",
    "train/perplexity",
    "train/code_usage_rate",
)
IMAGE_KEY = "train/reconstruction"
EXPERIMENT = "dashboard-e2e"
STEPS, IMAGE_EVERY, K = 4, 2, 8


class SpecKeysModule(pl.LightningModule):
    """A conv autoencoder with an 8-code nearest-neighbour quantizer: tiny, but every SPEC
    train/ number it logs is computed from the batch, so values differ step to step."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = torch.nn.Conv2d(3, 4, 4, stride=4)  # (B,3,16,16) -> (B,4,4,4)
        self.dec = torch.nn.ConvTranspose2d(4, 3, 4, stride=4)
        self.codebook = torch.nn.Parameter(torch.randn(K, 4))
        self.logged: dict[str, list[float]] = {key: [] for key in TRAIN_KEYS}
        self.grids: dict[int, np.ndarray] = {}

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x = batch[0]
        z_e = self.enc(x).permute(0, 2, 3, 1).reshape(-1, 4)  # (B·h·w, D)
        idx = torch.cdist(z_e, self.codebook).argmin(dim=1)
        z_q = self.codebook[idx]
        vq, commit = (z_q - z_e.detach()).pow(2).mean(), (z_e - z_q.detach()).pow(2).mean()
        z_st = (z_e + (z_q - z_e).detach()).reshape(x.shape[0], 4, 4, 4).permute(0, 3, 1, 2)
        x_rec = torch.tanh(self.dec(z_st))
        recon = (x - x_rec).abs().mean()
        perc = (x - x_rec).pow(2).mean()  # stands in for LPIPS
        total = recon + vq + 0.25 * commit + perc
        p = torch.bincount(idx, minlength=K).float() / idx.numel()
        values = {
            "train/recon_loss": recon,
            "train/vq_loss": vq,
            "train/commitment_loss": commit,
            "train/perc_loss": perc,
            "train/total_loss": total,
            "train/perplexity": torch.exp(-(p[p > 0] * p[p > 0].log()).sum()),
            "train/code_usage_rate": (p > 0).float().mean(),
        }
        for key, value in values.items():
            self.log(key, value)
            self.logged[key].append(value.item())
        if self.global_step % IMAGE_EVERY == 0:
            grid = make_reconstruction_grid(x, x_rec.detach(), max_images=4)
            self.grids[self.global_step] = grid
            log_image(self.logger, IMAGE_KEY, grid, self.global_step, caption="top: input, bottom: reconstruction")
        return total

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        images = torch.rand(4 * STEPS, 3, 16, 16) * 2 - 1
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=4)


@dataclass
class Logged:
    log_dir: Path
    model: SpecKeysModule  # holds what it logged: .logged (scalars) and .grids (images)


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> Logged:
    root = tmp_path_factory.mktemp("dashboard")
    with pytest.MonkeyPatch.context() as mp:  # local mode exports SWANLAB_LOG_DIR; undo it after
        mp.chdir(root)
        mp.setenv("SWANLAB_LOG_DIR", str(root))
        torch.manual_seed(0)
        model = SpecKeysModule()
        logger = SwanLabLogger(project="animevq-e2e", experiment_name=EXPERIMENT, log_dir=root / "swanlog")
        trainer = tiny_trainer(max_epochs=None, max_steps=STEPS, logger=logger, log_every_n_steps=1)
        trainer.fit(model)
        assert logger.failure is None and not swanlab.has_run()
    return Logged(root / "swanlog", model)


@pytest.fixture(scope="module")
def base_url(logged: Logged) -> Iterator[str]:
    with swanlab_dashboard(logged.log_dir) as url:
        yield url


def test_api_lists_the_run_and_every_train_key_with_its_values(base_url: str, logged: Logged) -> None:
    assert list(experiment_ids(base_url)) == [EXPERIMENT]
    keys = api_keys(base_url)[EXPERIMENT]
    assert set(TRAIN_KEYS) | {IMAGE_KEY} <= keys
    for key in TRAIN_KEYS:
        assert fetch_scalar(base_url, EXPERIMENT, key) == pytest.approx(logged.model.logged[key], rel=1e-6), key
    info = api_get(base_url, f"experiment/{experiment_ids(base_url)[EXPERIMENT]}")
    assert info["status"] == 1  # finished cleanly (0 running, -1 crashed)


def test_api_serves_the_reconstruction_images_losslessly(base_url: str, logged: Logged) -> None:
    media = fetch_media(base_url, EXPERIMENT, IMAGE_KEY)
    assert [step for step, _ in media] == sorted(logged.model.grids) == list(range(0, STEPS, IMAGE_EVERY))
    for step, png in media:
        served = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        np.testing.assert_array_equal(served, logged.model.grids[step])


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        message = "headless Chromium is needed for the dashboard test: apt-get install -y chromium"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (CI is set, so this is not skipped)")
        pytest.skip(message)
    return path


def test_chromium_renders_the_experiment_page(chromium: str, base_url: str, logged: Logged) -> None:
    exp_id = experiment_ids(base_url)[EXPERIMENT]
    dom = chromium_dump_dom(f"{base_url}/experiment/{exp_id}")
    assert re.search(r"<title>\s*SwanLab", dom)
    assert re.search(rf"<h1[^>]*>.*?{re.escape(EXPERIMENT)}", dom, flags=re.S)  # the page heading
    for key in (*TRAIN_KEYS, IMAGE_KEY):
        assert f">{key}<" in dom, f"no chart titled {key} on the page"
    # The image panel shows the last logged grid, inlined as a PNG data URI.
    shown = [
        np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))
        for b64 in re.findall(r'<img[^>]*src="data:image/png;base64,([^"]+)"', dom)
    ]
    last = logged.model.grids[max(logged.model.grids)]
    assert any(img.shape == last.shape and (img == last).all() for img in shown), f"{len(shown)} images on page"
