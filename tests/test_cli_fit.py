"""`animevq fit` run as a user runs it, with SwanLab in local mode (slow: subprocesses)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import yaml_model
from dashboard import api_keys, experiment_ids, fetch_media, fetch_scalar, find_chromium, chromium_dump_dom, \
    read_swanlog, swanlab_dashboard

ROOT = Path(__file__).resolve().parents[1]
TRAIN_KEYS = {"train/recon_loss", "train/vq_loss", "train/commitment_loss", "train/perc_loss", "train/total_loss",
              "train/perplexity", "train/code_usage_rate"}
VAL_KEYS = {"val/recon_loss", "val/vq_loss", "val/perplexity", "val/code_usage_rate", "val/perc_loss",
            "val/total_loss"}
TINY_CONFIG = {
    "run_dir": None,
    "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 2, "enable_model_summary": False,
                "logger": {"class_path": "animevq.SwanLabLogger",
                           "init_args": {"project": "clitest", "experiment_name": "tiny", "mode": "local"}}},
    "model": yaml_model(lambda_perc=0.0, optimization={"warmup_steps": 2}, log_every_n_steps=1,
                        log_images_every_n_steps=2),
    "data": {"batch_size": 4, "image_size": 32, "val_split": 0.25, "num_workers": 0},
}


def make_images(folder: Path, n: int = 20) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        array = np.zeros((40, 40, 3), np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)
        array[8:24, 8:24] = rng.integers(0, 255, 3, dtype=np.uint8)
        Image.fromarray(array).save(folder / f"img{i:02d}.png")
    return folder


def animevq(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("SWANLAB_LOG_DIR", None)
    result = subprocess.run([sys.executable, "-m", "animevq.cli", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("cli")
    data = make_images(tmp / "images")
    run_dir = tmp / "run"
    config = dict(TINY_CONFIG, run_dir=str(run_dir))
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(config))
    first = animevq("fit", "--config", str(tmp / "tiny.yaml"), "--data.data_dir", str(data), cwd=tmp)
    first_ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = animevq("fit", "--config", str(tmp / "tiny.yaml"), "--data.data_dir", str(data),
                      "--trainer.max_epochs", "3", "--ckpt_path", "last", cwd=tmp)
    return {"tmp": tmp, "run_dir": run_dir, "first": first, "first_ckpt": first_ckpt, "resumed": resumed}


@pytest.mark.slow
def test_fit_prints_run_folder_and_writes_checkpoints(fitted) -> None:
    out = fitted["first"].stdout
    run_dir = fitted["run_dir"]
    assert f"run folder {run_dir}" in out and "last checkpoint:" in out and "swanlab watch" in out
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert any(p.name.startswith("best-") for p in (run_dir / "checkpoints").iterdir())
    assert (run_dir / "config.yaml").exists()


@pytest.mark.slow
def test_resume_from_last_continues_the_step_count(fitted) -> None:
    first = fitted["first_ckpt"]
    last = torch.load(fitted["run_dir"] / "checkpoints" / "last.ckpt", weights_only=True)
    per_epoch = first["animevq"]["batches_seen"] // 2
    assert per_epoch > 0 and first["epoch"] == 1
    assert last["animevq"]["batches_seen"] == 3 * per_epoch  # 2 epochs + 1 more, not 1 from scratch
    assert last["global_step"] == 3 * per_epoch
    assert "Restored all states" in fitted["resumed"].stdout + fitted["resumed"].stderr


@pytest.mark.slow
def test_swanlab_stored_keys_images_and_config(fitted) -> None:
    runs = read_swanlog(fitted["run_dir"] / "swanlog")
    assert len(runs) == 2  # the resumed fit is its own experiment
    series = runs["tiny"]
    assert TRAIN_KEYS <= set(series) and VAL_KEYS <= set(series)
    assert "train/images_per_sec" in series and "train/lr" in series
    steps = [step for step, _ in series["train/total_loss"]]
    assert steps == sorted(steps) and len(steps) == fitted["first_ckpt"]["animevq"]["batches_seen"]  # every batch
    assert all(np.isfinite(v) for _, v in series["train/total_loss"])
    images = series["train/reconstruction"]
    assert images and all(Path(f).exists() for _, files in images for f in files)
    grid = np.asarray(Image.open(images[0][1][0]))
    assert grid.shape[0] == 2 * 32 + 3 * 2  # inputs above reconstructions, 2 px padding
    assert "val/reconstruction" in series and "val/code_usage" in series
    config_files = list((fitted["run_dir"] / "swanlog").glob("run-*/files/config.yaml"))
    stored = yaml.safe_load(config_files[0].read_text())
    flat = yaml.safe_dump(stored)
    for key in ("num_embeddings", "lambda_commit", "learning_rate", "log_images_every_n_steps"):
        assert key in flat


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dashboard_shows_the_cli_run(fitted) -> None:
    with swanlab_dashboard(fitted["run_dir"] / "swanlog") as base:
        keys = api_keys(base)
        assert TRAIN_KEYS <= keys["tiny"]
        assert fetch_scalar(base, "tiny", "train/total_loss")
        media = fetch_media(base, "tiny", "train/reconstruction")
        assert media and media[0][1][:8] == b"\x89PNG\r\n\x1a\n"
        chromium = find_chromium()
        if chromium is None and not os.environ.get("CI"):
            pytest.skip("Chromium is not installed (scripts/setup.sh installs it)")
        dom = chromium_dump_dom(f"{base}/experiment/{experiment_ids(base)['tiny']}")
        assert "tiny" in dom and "train/total_loss" in dom


SEED_SNIPPET = """
import lightning.pytorch as pl
from swanlab.integration.pytorch_lightning import SwanLabLogger  # the seed's import path does not exist
from dataloader.dataModule import AnimeDataModule
from model.modelModule import VQVAEModel

datamodule = AnimeDataModule(data_dir={data!r}, batch_size=4, image_size=32, num_workers=0)
model = VQVAEModel(latent_channels=16, num_embeddings=16, embedding_dim=16, encoder_channels=(8, 16, 16, 16),
                   decoder_channels=(16, 16, 16, 8), num_res_blocks=1, lambda_rec=1.0, lambda_vq=1.0,
                   lambda_commit=0.25, lambda_perc=0.0, use_lpips=False)
swanlab_logger = SwanLabLogger(project="vq-vae-anime", experiment_name="vqvae-baseline", mode="local",
                               logdir={logdir!r})
trainer = pl.Trainer(max_steps=3, logger=swanlab_logger, accelerator="cpu", devices=1,
                     enable_checkpointing=False, limit_val_batches=1)
trainer.fit(model, datamodule=datamodule)
print("batches", model.batches_seen)
"""


@pytest.mark.slow
def test_seed_quick_start_snippet_runs(tmp_path) -> None:
    data = make_images(tmp_path / "images", n=12)
    script = tmp_path / "quickstart.py"
    script.write_text(SEED_SNIPPET.format(data=str(data), logdir=str(tmp_path / "swanlog")))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("SWANLAB_LOG_DIR", None)
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "batches 3" in result.stdout
    assert read_swanlog(tmp_path / "swanlog")["vqvae-baseline"]["train/total_loss"]


@pytest.mark.slow
def test_swanlab_log_dir_from_the_environment_is_honoured(tmp_path: Path) -> None:
    config = dict(TINY_CONFIG, run_dir=str(tmp_path / "run"))
    config["trainer"] = dict(config["trainer"], max_epochs=1)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    elsewhere = tmp_path / "elsewhere"
    env = dict(os.environ, PYTHONUNBUFFERED="1", SWANLAB_LOG_DIR=str(elsewhere))
    result = subprocess.run([sys.executable, "-m", "animevq.cli", "fit", "--config", str(tmp_path / "tiny.yaml"),
                             "--data.data_dir", str(make_images(tmp_path / "images", n=8))], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train/total_loss" in read_swanlog(elsewhere)["tiny"]  # was: <run_dir>/swanlog whatever the variable said
    assert not (tmp_path / "run" / "swanlog").exists()
    assert f"SwanLab logs:    {elsewhere}" in result.stdout


@pytest.mark.slow
def test_fit_prints_none_of_lightnings_known_noise(fitted) -> None:
    output = fitted["first"].stdout + fitted["first"].stderr
    for noise in ("litlogger", "LeafSpec", "You have overridden `on_after_batch_transfer`", "v_num"):
        assert noise not in output, noise
    assert " loss=" in output and "train/total_loss=" not in output  # the compact bar, not Lightning's default
