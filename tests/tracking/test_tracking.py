"""Tracking: mode resolution, image grids/plots, and the SwanLab logger on real tiny fits."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import swanlab
import torch
from conftest import tiny_trainer
from dashboard import read_swanlog
from poison import NOT_UTF8, write_badly_named
from PIL import Image

from animevq.tracking import (
    BAR_COLOR,
    SwanLabLogger,
    code_usage_plot,
    has_cloud_credentials,
    log_image,
    make_reconstruction_grid,
    resolve_mode,
    to_swanlab_mode,
)

STEPS = 3


@pytest.fixture(autouse=True)
def _isolated_swanlab(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No run leaks between tests; SwanLab's env side effects are undone; no real login."""
    monkeypatch.delenv("SWANLAB_MODE", raising=False)
    monkeypatch.delenv("SWANLAB_API_KEY", raising=False)
    monkeypatch.setenv("SWANLAB_LOG_DIR", str(tmp_path / "unused"))  # local mode overwrites it
    monkeypatch.setenv("SWANLAB_ROOT", str(tmp_path / "swanlab_root"))  # no saved login
    monkeypatch.chdir(tmp_path)
    yield
    if swanlab.has_run():
        swanlab.finish()


class TinyModule(pl.LightningModule):
    """One conv 'autoencoder' that logs a scalar each step and a reconstruction grid at step 1."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.logged: dict[int, float] = {}
        self.grid: np.ndarray | None = None

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x = batch[0]
        x_rec = torch.tanh(self.net(x))
        loss = (x - x_rec).abs().mean()
        self.log("train/recon_loss", loss)
        self.logged[self.global_step] = loss.item()
        if self.global_step == 1:
            self.grid = make_reconstruction_grid(x, x_rec.detach(), max_images=2)
            log_image(self.logger, "train/reconstruction", self.grid, self.global_step, caption="top: input")
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        images = torch.rand(4 * STEPS, 3, 16, 16) * 2 - 1
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=4)


def _fit(logger: SwanLabLogger) -> tuple[pl.Trainer, TinyModule]:
    model = TinyModule()
    trainer = tiny_trainer(max_epochs=None, max_steps=STEPS, logger=logger, log_every_n_steps=1)
    trainer.fit(model)
    return trainer, model


# --- mode ---------------------------------------------------------------------------------


def test_mode_defaults_to_local_then_env_then_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_mode(None) == "local"
    monkeypatch.setenv("SWANLAB_MODE", "Offline ")
    assert resolve_mode(None) == "offline"
    assert resolve_mode("disabled") == "disabled"  # the argument beats the environment
    assert resolve_mode("online") == "cloud"  # SwanLab's own name for cloud
    assert to_swanlab_mode("cloud") == "online"
    monkeypatch.setenv("SWANLAB_MODE", "")
    assert resolve_mode(None) == "local"


def test_mode_errors_name_the_value_and_its_source(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"'clowd'.*mode argument.*local, offline, cloud, disabled"):
        resolve_mode("clowd")
    monkeypatch.setenv("SWANLAB_MODE", "remote")
    with pytest.raises(ValueError, match=r"'remote'.*SWANLAB_MODE"):
        resolve_mode(None)
    with pytest.raises(ValueError, match="mode"):
        SwanLabLogger(log_dir="x")  # the logger resolves (and rejects) at construction


def test_cloud_without_credentials_fails_fast_instead_of_prompting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert not has_cloud_credentials()
    with pytest.raises(ValueError, match="swanlab login"):
        SwanLabLogger(mode="cloud")
    assert not swanlab.has_run()
    # A saved `swanlab login` (a .netrc under SWANLAB_ROOT) or an API key both count.
    root = tmp_path / "swanlab_root"
    root.mkdir()
    (root / ".netrc").write_text("machine api.swanlab.cn\n  login https://swanlab.cn\n  password k3y\n")
    assert has_cloud_credentials()
    (root / ".netrc").unlink()
    monkeypatch.setenv("SWANLAB_API_KEY", "k3y")
    assert has_cloud_credentials()


# --- images -------------------------------------------------------------------------------


def test_reconstruction_grid_puts_inputs_above_reconstructions() -> None:
    b, h, w, pad = 3, 8, 6, 2
    gen = torch.Generator().manual_seed(1)
    v = torch.randint(0, 256, (b, 3, h, w), generator=gen)
    v_rec = torch.randint(0, 256, (b, 3, h, w), generator=gen)
    grid = make_reconstruction_grid(v / 127.5 - 1, v_rec / 127.5 - 1, max_images=8)

    assert grid.dtype == np.uint8 and grid.shape == (2 * h + 3 * pad, b * w + (b + 1) * pad, 3)
    tile_mask = np.zeros(grid.shape[:2], dtype=bool)
    for i in range(b):
        left = pad + i * (w + pad)
        top_tile = grid[pad : pad + h, left : left + w]
        bottom_tile = grid[2 * pad + h : 2 * pad + 2 * h, left : left + w]
        np.testing.assert_array_equal(top_tile, v[i].permute(1, 2, 0).numpy())
        np.testing.assert_array_equal(bottom_tile, v_rec[i].permute(1, 2, 0).numpy())
        tile_mask[pad : pad + h, left : left + w] = True
        tile_mask[2 * pad + h : 2 * pad + 2 * h, left : left + w] = True
    assert (grid[~tile_mask] == 255).all()  # the padding is white


def test_reconstruction_grid_limits_columns_clips_and_checks_shapes() -> None:
    x = torch.full((5, 3, 4, 4), 3.0)  # out of range: clipped to white
    x_rec = torch.full((5, 3, 4, 4), -3.0)  # clipped to black
    grid = make_reconstruction_grid(x, x_rec, max_images=2)
    assert grid.shape[1] == 2 * 4 + 3 * 2
    assert (grid[2:6, 2:6] == 255).all() and (grid[8:12, 2:6] == 0).all()
    with pytest.raises(ValueError, match="differ in shape"):
        make_reconstruction_grid(x, x_rec[:, :, :2])


def _bar_heights(plot: np.ndarray) -> np.ndarray:
    """Bar pixels per image column."""
    return (plot == np.array(BAR_COLOR, dtype=np.uint8)).all(axis=2).sum(axis=0)


def test_code_usage_plot_sorts_counts_on_a_log_axis() -> None:
    k = 64
    counts = torch.zeros(k)
    counts[torch.randperm(k)[: k // 2]] = torch.arange(1, k // 2 + 1, dtype=torch.float32)
    plot = code_usage_plot(counts, width=300, height=120)
    assert plot.dtype == np.uint8 and plot.shape == (120, 300, 3)

    full = _bar_heights(code_usage_plot(torch.ones(k), width=300, height=120))
    drawn = _bar_heights(plot)
    columns = np.flatnonzero(full)  # the plot area: every column has a bar when all are used
    assert len(set(full[columns].tolist())) == 1  # uniform usage: one height everywhere
    bars = drawn[columns]
    assert (np.diff(bars) <= 0).all()  # most used first
    assert abs((bars > 0).sum() - len(columns) / 2) <= 1  # the dead half is empty

    # log-y: a code used 10x shows log(11)/log(101) of the height of one used 100x.
    h = _bar_heights(code_usage_plot(torch.tensor([100.0, 10.0]), width=300, height=120))[columns]
    assert h[-1] == pytest.approx(h[0] * math.log10(11) / math.log10(101), abs=1)


# --- the logger on real fits --------------------------------------------------------------


def test_logger_writes_to_log_dir_and_each_fit_is_its_own_experiment(tmp_path: Path) -> None:
    log_dir = tmp_path / "swanlog"
    first = SwanLabLogger(experiment_name="tiny", log_dir=log_dir, notes="seed spelling", config={"data": "x"})
    _, model_a = _fit(first)
    assert not swanlab.has_run()  # finished when the fit ended
    _, model_b = _fit(SwanLabLogger(experiment_name="tiny", log_dir=log_dir))

    assert len(list(log_dir.glob("run-*"))) == 2 and (log_dir / "runs.swanlab").is_file()
    runs = read_swanlog(log_dir)
    assert len(runs) == 2  # the second fit did not merge into the first
    (name_a, run_a), (name_b, run_b) = sorted(runs.items())
    assert name_a == "tiny" and name_b.startswith("tiny-")
    for run, model in ((run_a, model_a), (run_b, model_b)):
        steps, values = zip(*run["train/recon_loss"])
        assert list(steps) == list(range(STEPS))
        assert values == pytest.approx([model.logged[s] for s in steps], rel=1e-6)
        [(step, [png])] = run["train/reconstruction"]
        assert step == 1
        np.testing.assert_array_equal(np.asarray(Image.open(png)), model.grid)  # lossless

    (run_dir,) = [d for d in log_dir.glob(f"run-*-{first.version}")]
    config = (run_dir / "files" / "config.yaml").read_text()
    assert "lr" in config and "data" in config  # hyperparameters and the extra config


def test_unwritable_log_dir_warns_once_and_falls_back_to_csv(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the log dir should go")  # unwritable even for root
    fallback = tmp_path / "fallback"
    logger = SwanLabLogger(log_dir=blocker / "swanlog", fallback_dir=fallback)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, model = _fit(logger)

    ours = [w for w in caught if "SwanLab tracking disabled" in str(w.message)]
    assert len(ours) == 1 and "not_a_dir" in str(ours[0].message)
    assert trainer.global_step == STEPS  # training was not interrupted
    with open(fallback / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["key"] == "train/recon_loss"]
    assert [int(r["step"]) for r in rows] == list(range(STEPS))
    assert [float(r["value"]) for r in rows] == pytest.approx([model.logged[s] for s in range(STEPS)], rel=1e-6)
    assert '"lr": 0.05' in (fallback / "hparams.json").read_text()
    png = fallback / "images" / "train__reconstruction_000001.png"
    np.testing.assert_array_equal(np.asarray(Image.open(png)), model.grid)
    assert not swanlab.has_run()


class _BreakSwanLab(pl.Callback):
    """Makes SwanLab's ``Run.log`` raise from the second batch on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == 1:

            def broken(*a: object, **k: object) -> None:
                raise OSError("disk full")

            self.monkeypatch.setattr(type(trainer.logger.experiment), "log", broken)


def test_swanlab_failing_mid_run_keeps_training_and_fills_csv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    logger = SwanLabLogger(log_dir=tmp_path / "swanlog", fallback_dir=tmp_path / "fallback")
    model = TinyModule()
    trainer = tiny_trainer(max_epochs=None, max_steps=STEPS, logger=logger, log_every_n_steps=1,
                           callbacks=[_BreakSwanLab(monkeypatch)])
    with pytest.warns(RuntimeWarning, match="disk full"):
        trainer.fit(model)
    assert trainer.global_step == STEPS
    assert "disk full" in logger.failure and not swanlab.has_run()  # the broken run was closed
    with open(tmp_path / "fallback" / "metrics.csv", newline="") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r["key"] == "train/recon_loss"]
    assert steps == list(range(1, STEPS))  # step 0 went to SwanLab, the rest to the CSV
    logged = read_swanlog(tmp_path / "swanlog")
    assert [s for s, _ in next(iter(logged.values()))["train/recon_loss"]] == [0]


# A fit as `animevq fit` runs one: logging to stderr, which SwanLab records as the console.
_FIT_WITH_A_BAD_NAME = """
import logging, sys
from animevq.data import AnimeDataModule, DataReport
from animevq.tracking import SwanLabLogger
from conftest import tiny_trainer
from probe import Probe
logging.basicConfig(level=logging.INFO)
logger = SwanLabLogger(experiment_name="names", log_dir=sys.argv[2], mode="local")
dm = AnimeDataModule(sys.argv[1], batch_size=1, val_split=0.0, image_size=16, num_workers=0)
trainer = tiny_trainer(max_epochs=2, logger=logger, callbacks=[DataReport()], limit_val_batches=0,
                       log_every_n_steps=1)
trainer.fit(Probe(), datamodule=dm)
assert logger.failure is None, logger.failure
"""


@pytest.mark.slow
def test_a_skipped_file_whose_name_is_not_utf8_logs_without_errors(tmp_path: Path) -> None:
    """was: "SwanLab background logger thread error ... UnicodeEncodeError" every epoch."""
    data = write_badly_named(tmp_path / "data", (NOT_UTF8,), good=3)
    tests = Path(__file__).resolve().parents[1]
    path = [str(tests.parent / "src"), str(tests), os.environ.get("PYTHONPATH", "")]  # as conftest
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    env.pop("SWANLAB_LOG_DIR", None)
    done = subprocess.run([sys.executable, "-c", _FIT_WITH_A_BAD_NAME, str(data), str(tmp_path / "swanlog")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "UnicodeEncodeError" not in output and "logger thread error" not in output, output[-4000:]
    [(_, series)] = read_swanlog(tmp_path / "swanlog").items()
    assert [value for _, value in series["data/skipped_files"]] == [1.0, 1.0]  # one per epoch
    console = "".join(f.read_text(encoding="utf-8") for f in (tmp_path / "swanlog").glob("run-*/console/*.log"))
    assert console.count("1 not_an_image (bad\\xff.png)") == 2


def test_log_image_dispatches_and_rejects_non_uint8() -> None:
    image = np.zeros((4, 6, 3), dtype=np.uint8)

    class Recorder(pl.loggers.CSVLogger):
        def __init__(self) -> None:
            super().__init__(save_dir=".")
            self.calls: list[tuple[str, int]] = []

        def log_image(self, key: str, images: list[np.ndarray], step: int) -> None:
            self.calls.append((key, step))

    rec = Recorder()
    assert log_image([rec, pl.loggers.CSVLogger(".")], "val/reconstruction", image, 7) == 1  # CSV cannot
    assert rec.calls == [("val/reconstruction", 7)]
    assert log_image(None, "k", image, 0) == 0
    with pytest.raises(ValueError, match="uint8"):
        log_image(rec, "k", image.astype(np.float32), 0)
