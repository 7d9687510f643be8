"""What a resumed run may change: training settings are applied and said so, never recorded
and ignored; `--ckpt_path FILE` keeps what the user set and takes the rest from the file."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml
from clirun import fit_config, make_images

from animevq.cli import main as cli_main
from animevq.runs.checkpoint_io import CheckpointError
from animevq.train.optim import warmup_cosine

CHANGED = ["--model.learning_rate", "0.001", "--model.weight_decay", "0.01", "--model.betas", "[0.5, 0.9]"]


@pytest.fixture
def trained(tmp_path: Path) -> Path:
    """A run folder after one epoch (learning rate 2e-4, no weight decay), and its fit.yaml."""
    config = fit_config(tmp_path / "run", make_images(tmp_path / "images", n=12), logger=False)
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
    cli_main(["fit", "--config", str(tmp_path / "fit.yaml")])
    return tmp_path


def _assert_applied(checkpoint: dict, lr: float = 1e-3) -> None:
    """The optimizer and schedule of ``checkpoint`` ran with the changed settings."""
    group = checkpoint["optimizer_states"][0]["param_groups"][0]
    schedule = checkpoint["lr_schedulers"][0]
    assert schedule["base_lrs"] == [lr] and group["initial_lr"] == lr
    factor = warmup_cosine(schedule["last_epoch"], warmup_steps=2, total_steps=4, min_lr_ratio=0.1)
    assert group["lr"] == pytest.approx(lr * factor, rel=1e-12)
    assert group["weight_decay"] == 0.01 and tuple(group["betas"]) == (0.5, 0.9)
    assert checkpoint["hyper_parameters"]["learning_rate"] == lr  # recorded, and used


def test_changed_settings_on_resume_are_applied_and_said(trained: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Was: the new learning rate, betas and weight decay appeared in hparams while the optimizer
    # and schedule kept the checkpoint's (2e-4).
    with caplog.at_level(logging.WARNING, logger="animevq.train.resumed"):
        cli_main(["fit", "--config", str(trained / "fit.yaml"), "--trainer.max_epochs", "2", "--ckpt_path", "last",
                  *CHANGED])
    assert "changed settings, applied from the first resumed batch on" in caplog.text
    assert "learning_rate: checkpoint 0.0002, now 0.001" in caplog.text
    assert "weight_decay: checkpoint 0.0, now 0.01" in caplog.text and "betas: checkpoint (0.9, 0.99)" in caplog.text
    _assert_applied(torch.load(trained / "run" / "checkpoints" / "last.ckpt", weights_only=True))


def test_a_checkpoint_given_by_path_keeps_what_the_user_set(trained: Path) -> None:
    # Was: Lightning put the file's hyperparameters over the user's, so --model.learning_rate was
    # dropped without a word.
    ckpt = trained / "run" / "checkpoints" / "best.ckpt"
    (trained / "run" / "checkpoints" / "last.ckpt").rename(ckpt)
    cli_main(["fit", "--config", str(trained / "fit.yaml"), "--trainer.max_epochs", "2", "--ckpt_path", str(ckpt),
              *CHANGED])
    _assert_applied(torch.load(trained / "run" / "checkpoints" / "last.ckpt", weights_only=True))


def test_a_checkpoint_given_by_path_brings_its_architecture_unless_the_user_sets_another(trained: Path) -> None:
    config = yaml.safe_load((trained / "fit.yaml").read_text())
    del config["model"]  # the defaults: not the tiny model the file holds
    (trained / "bare.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(CheckpointError, match=r"checkpoint .*missing\.ckpt does not exist .*--ckpt_path last"):
        cli_main(["fit", "--config", str(trained / "bare.yaml"), "--ckpt_path", str(trained / "missing.ckpt")])
    ckpt = trained / "run" / "checkpoints" / "first.ckpt"
    (trained / "run" / "checkpoints" / "last.ckpt").rename(ckpt)
    cli_main(["fit", "--config", str(trained / "bare.yaml"), "--trainer.max_epochs", "2", "--ckpt_path", str(ckpt)])
    resumed = torch.load(trained / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["hyper_parameters"]["encoder_channels"] == [8, 16, 16, 16]  # the file's
    assert resumed["animevq"]["batches_seen"] == 4  # 2 + 2: it went on from the file
    with pytest.raises(CheckpointError, match=r"different model.*num_embeddings: checkpoint 16, now 32"):
        cli_main(["fit", "--config", str(trained / "bare.yaml"), "--trainer.max_epochs", "3", "--ckpt_path",
                  str(ckpt), "--model.num_embeddings", "32"])
