"""Checkpoint promises (docs/reliability.md): writes that never leave a half file, checks
before a resume, architecture changes, unwritable or full folders, safe loading, contents."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import tiny_model, tiny_trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException
from plain import assert_plain
from recording import IMAGES, equal_tree, fit, images_loader, logging_model
from tooling import flip_a_tensor_byte

from animevq import Tokenizer
from animevq.cli import main as cli_main
from animevq.runs.checkpoint_io import CheckpointError, verify_checkpoint
from animevq.runs.last import PREVIOUS_NAME, LastCheckpoint, check_free_space, estimate_checkpoint_bytes
from animevq.runs.resume import ExactResume, capture_rng_state, restore_rng_state


# ---------------------------------------------------------------------------- 2. checkpoint writes
class _CrashWhileWriting(pl.Callback):
    """From batch ``at`` on, the checkpoint writer writes half a file, then fails."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.batches_seen == self.at:
            io = trainer.strategy.checkpoint_io
            real = io.save_checkpoint

            def half_then_crash(checkpoint, path, *args, **kwargs) -> None:
                real(checkpoint, path, *args, **kwargs)
                data = Path(path).read_bytes()
                Path(path).write_bytes(data[: len(data) // 2])
                raise OSError(28, "No space left on device")

            io.save_checkpoint = half_then_crash


def test_a_crash_while_writing_leaves_the_last_good_checkpoint(tmp_path: Path) -> None:
    model = logging_model()
    last = LastCheckpoint(tmp_path, every_n_steps=1)
    with pytest.raises(OSError, match=r"could not write checkpoint \S+/last\.ckpt: No space left"):
        fit(model, [last, _CrashWhileWriting(at=3)], max_steps=6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "previous.ckpt"]  # no temp file left
    verify_checkpoint(tmp_path / "last.ckpt", previous_name=PREVIOUS_NAME)  # whole
    good = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert good["animevq"]["batches_seen"] == 3 and last.last_saved_batch == 3
    assert torch.load(tmp_path / "previous.ckpt", weights_only=True)["animevq"]["batches_seen"] == 2


def test_damaged_last_checkpoint_is_refused_naming_the_previous_one(tmp_path: Path) -> None:
    model = logging_model()
    ckpt_dir = tmp_path / "run" / "checkpoints"
    fit(model, [LastCheckpoint(ckpt_dir, every_n_steps=1)], max_steps=3)
    last, previous = ckpt_dir / "last.ckpt", ckpt_dir / "previous.ckpt"
    good = last.read_bytes()

    last.write_bytes(good[: len(good) // 2])  # truncated: the writer died (or a copy did)
    with pytest.raises(CheckpointError, match=r"last\.ckpt is truncated or corrupt .*previous checkpoint "
                                              r".*previous\.ckpt is intact: resume from it"):
        verify_checkpoint(last, previous_name=PREVIOUS_NAME)
    # The CLI checks before it builds anything.
    with pytest.raises(CheckpointError, match=r"previous\.ckpt is intact"):
        cli_main(["fit", "--run_dir", str(tmp_path / "run"), "--ckpt_path", "last", "--trainer.logger", "false"])
    with pytest.raises(CheckpointError, match=r"previous\.ckpt is intact"):  # given by path: checked as first read
        cli_main(["fit", "--run_dir", str(tmp_path / "run"), "--ckpt_path", str(last), "--trainer.logger", "false"])

    last.write_bytes(good)
    flip_a_tensor_byte(last)  # same length, one bit pattern changed: only the CRC sees it
    with pytest.raises(CheckpointError, match=r"fails its CRC check"):
        verify_checkpoint(last, previous_name=PREVIOUS_NAME)
    previous.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"previous\.ckpt is damaged too"):
        verify_checkpoint(last, previous_name=PREVIOUS_NAME)
    last.write_bytes(good)
    verify_checkpoint(last, previous_name=PREVIOUS_NAME)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # unpickling this creates the marker file
        return (open, (str(self.marker), "w"))


def test_resume_refuses_a_checkpoint_with_a_pickle_payload(tmp_path: Path) -> None:
    # Lightning itself would unpickle it (weights_only defaults to False there).
    evil, marker = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "pwned"
    evil.parent.mkdir()
    torch.save({"state_dict": {}, "x": _Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match="holds pickled Python objects"):
        cli_main(["fit", "--run_dir", str(tmp_path), "--ckpt_path", "last", "--trainer.logger", "false"])
    assert not marker.exists()


def test_exported_weights_with_a_pickle_payload_are_refused(tmp_path: Path) -> None:
    # Checkpoints: tests/tools/test_codes.py::test_pickled_payload_is_refused_not_run.
    logging_model().tokenizer.save_pretrained(tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"encoder.stem.weight": _Payload(marker)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        Tokenizer.from_pretrained(tmp_path)
    assert not marker.exists()


# ---------------------------------------------------------------------------- 1. SIGTERM (more in test_resume_exact.py)
class _SigtermInValidation(pl.Callback):
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.current_epoch == 0 and batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)


def fit_epochs(model: pl.LightningModule, callbacks: list, epochs: int, ckpt_path: str | None = None) -> None:
    trainer = tiny_trainer(max_epochs=epochs, num_sanity_val_steps=0, callbacks=callbacks)
    trainer.fit(model, train_dataloaders=images_loader(), val_dataloaders=images_loader(), ckpt_path=ckpt_path)


def test_sigterm_during_validation_still_writes_a_checkpoint(tmp_path: Path) -> None:
    straight = tiny_model()
    fit_epochs(straight, [], epochs=2)
    torch.manual_seed(0)
    stopped = tiny_model()
    with pytest.raises(SIGTERMException):
        fit_epochs(stopped, [LastCheckpoint(tmp_path, every_n_steps=1000), _SigtermInValidation()], epochs=2)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["animevq"]["batches_seen"] == IMAGES // 2
    resumed = tiny_model()
    fit_epochs(resumed, [], epochs=2, ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.batches_seen == IMAGES and equal_tree(resumed.state_dict(), straight.state_dict())


# ---------------------------------------------------------------------------- 4. architecture
def test_resuming_a_different_architecture_is_refused(tmp_path: Path) -> None:
    fit(logging_model(), [LastCheckpoint(tmp_path, every_n_steps=1)], max_steps=2)
    changed = tiny_model(num_embeddings=32, encoder_channels=(8, 16, 16, 32), lambda_gan=0.1)
    with pytest.raises(CheckpointError) as error:
        fit(changed, [], max_steps=4, ckpt_path=str(tmp_path / "last.ckpt"))
    message = str(error.value)
    assert "num_embeddings: checkpoint 16, now 32" in message
    assert "encoder_channels: checkpoint (8, 16, 16, 16), now (8, 16, 16, 32)" in message
    assert "lambda_gan > 0 (VQ-GAN): checkpoint False, now True" in message
    assert "last.ckpt" in message and "decoder_channels" not in message
    # Training settings may change on resume.
    fit(tiny_model(learning_rate=1e-5), [], max_steps=4, ckpt_path=str(tmp_path / "last.ckpt"))


# ---------------------------------------------------------------------------- 5. the checkpoint folder
def test_unwritable_checkpoint_folder_fails_before_training(tmp_path: Path) -> None:
    model = logging_model()
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # unwritable even for root, unlike chmod

    class _Count(pl.Callback):
        batches = 0

        def on_train_batch_start(self, *args) -> None:
            _Count.batches += 1

    with pytest.raises(PermissionError, match=r"checkpoint folder .*a_file/run/checkpoints is not writable"):
        fit(model, [LastCheckpoint(blocker / "run" / "checkpoints"), _Count()], max_steps=2)
    assert _Count.batches == 0


def test_free_space_is_checked_against_the_checkpoint_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    net = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.BatchNorm1d(10))
    net[0].bias.requires_grad_(False)
    # weight 100 floats ×3 (Adam), frozen bias 10, BN weight+bias 20 ×3, BN buffers 10+10 floats + int64
    assert estimate_checkpoint_bytes(net) == 4 * (100 * 3 + 10 + 20 * 3 + 20) + 8
    import animevq.runs.last as last

    usage = last.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(last.shutil, "disk_usage", lambda path: usage._replace(free=1500))
    with pytest.raises(OSError, match=r"not enough disk space .*0\.0 MiB free in .*needs room for two"):
        check_free_space(tmp_path, 1000)
    with caplog.at_level(logging.WARNING, logger="animevq.runs"):
        check_free_space(tmp_path, 500)
    assert "little disk space" in caplog.text
    check_free_space(tmp_path, 100)


# ---------------------------------------------------------------------------- 8. checkpoint contents
def test_vqgan_checkpoint_holds_only_tensors_and_plain_values(tmp_path: Path) -> None:
    # VQ-VAE (a CLI fit): tests/runs/test_resume_exact.py::test_cli_checkpoint_holds_only_tensors_and_plain_values.
    model = tiny_model(lambda_gan=0.1, adversarial={"disc_start": 0, "lecam_weight": 0.1}, log_images_every_n_steps=1000)
    fit(model, [LastCheckpoint(tmp_path, every_n_steps=2), ExactResume()], max_steps=4)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert_plain(saved)
    assert any(k.startswith("objective.discriminator.") for k in saved["state_dict"])
    assert len(saved["optimizer_states"]) == 2
    assert "rng" in saved["callbacks"]["ExactResume"]


def test_rng_states_round_trip() -> None:
    import random

    import numpy as np

    state = capture_rng_state()
    assert_plain(state)
    first = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    restore_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]
