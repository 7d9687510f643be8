"""Reliability promises (docs/reliability.md): checkpoint writes and checks, non-finite
steps, architecture changes on resume, unwritable or full folders, safe loading."""

from __future__ import annotations

import logging
import math
import os
import signal
import zipfile
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, TensorDataset

from animevq.checkpoint import CheckpointError
from animevq.checkpointing import LastCheckpoint
from animevq.cli import main as cli_main
from animevq.lightning_module import VQVAEModel
from animevq.reliability import (
    ExactResume,
    NonFiniteLossError,
    capture_rng_state,
    check_free_space,
    estimate_checkpoint_bytes,
    restore_rng_state,
    verify_checkpoint,
)
from plain import assert_plain

IMAGES = 16  # (16,3,32,32) random images, batch size 2: 8 batches per epoch


class _Capture(Logger):
    """Keeps every ``log_metrics`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "capture"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append((step, dict(metrics)))


class _PoisonBatches(pl.Callback):
    """Fills the images of chosen batches (by ``batches_seen``) with NaN, and keeps a copy
    of the model's and optimizer's state as the first poisoned batch starts."""

    def __init__(self, batches: set[int]) -> None:
        self.batches = batches
        self.before: dict[str, torch.Tensor] | None = None
        self.adam_before: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.batches_seen in self.batches:
            if self.before is None:
                self.before = {k: v.clone() for k, v in pl_module.state_dict().items()}
                self.adam_before = _clone(trainer.optimizers[0].state_dict()["state"])
            batch[0].fill_(float("nan"))


def _clone(tree):
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    return tree


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


def _loader() -> DataLoader:
    images = torch.rand(IMAGES, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return DataLoader(TensorDataset(images), batch_size=2)


def _fit(model: VQVAEModel, callbacks: list, *, max_steps: int, logger: Logger | bool = False,
         ckpt_path: str | None = None) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=logger, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=callbacks,
    )
    trainer.fit(model, train_dataloaders=_loader(), ckpt_path=ckpt_path)
    return trainer


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convolutions gain nothing from threads, and on a busy 2-core machine OpenMP's
    waiting threads slow them down more than tenfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model(tiny_kwargs: dict) -> VQVAEModel:
    return VQVAEModel(**tiny_kwargs, log_every_n_steps=1, log_images_every_n_steps=1000)


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


def test_a_crash_while_writing_leaves_the_last_good_checkpoint(model: VQVAEModel, tmp_path: Path) -> None:
    last = LastCheckpoint(tmp_path, every_n_steps=1)
    with pytest.raises(OSError, match="No space left"):
        _fit(model, [last, _CrashWhileWriting(at=3)], max_steps=6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "previous.ckpt"]  # no temp file left
    verify_checkpoint(tmp_path / "last.ckpt")  # whole
    good = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert good["animevq"]["batches_seen"] == 3 and last.last_saved_batch == 3
    assert torch.load(tmp_path / "previous.ckpt", weights_only=True)["animevq"]["batches_seen"] == 2


def _flip_a_tensor_byte(path: Path) -> None:
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)  # the largest tensor
    offset = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.file_size // 2
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_last_checkpoint_is_refused_naming_the_previous_one(model: VQVAEModel, tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "run" / "checkpoints"
    _fit(model, [LastCheckpoint(ckpt_dir, every_n_steps=1)], max_steps=3)
    last, previous = ckpt_dir / "last.ckpt", ckpt_dir / "previous.ckpt"
    good = last.read_bytes()

    last.write_bytes(good[: len(good) // 2])  # truncated: the writer died (or a copy did)
    with pytest.raises(CheckpointError, match=r"last\.ckpt is truncated or corrupt .*previous checkpoint "
                                              r".*previous\.ckpt is intact: resume from it"):
        verify_checkpoint(last)
    # The CLI checks before it builds anything.
    with pytest.raises(CheckpointError, match=r"previous\.ckpt is intact"):
        cli_main(["fit", "--run_dir", str(tmp_path / "run"), "--ckpt_path", "last", "--trainer.logger", "false"])

    last.write_bytes(good)
    _flip_a_tensor_byte(last)  # same length, one bit pattern changed: only the CRC sees it
    with pytest.raises(CheckpointError, match=r"fails its CRC check"):
        verify_checkpoint(last)
    previous.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"previous\.ckpt is damaged too"):
        verify_checkpoint(last)
    last.write_bytes(good)
    verify_checkpoint(last)


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


def test_exported_weights_with_a_pickle_payload_are_refused(model: VQVAEModel, tmp_path: Path) -> None:
    # Checkpoints: tests/test_tools.py::test_pickled_payload_is_refused_not_run.
    from animevq.export import export_pretrained, load_pretrained

    export_pretrained(model, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"encoder.stem.weight": _Payload(marker)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_pretrained(tmp_path)
    assert not marker.exists()


# ---------------------------------------------------------------------------- 1. SIGTERM (more in test_resume_exact.py)
class _SigtermInValidation(pl.Callback):
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.current_epoch == 0 and batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)


def _fit_epochs(model: VQVAEModel, callbacks: list, epochs: int, ckpt_path: str | None = None) -> None:
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
    )
    trainer.fit(model, train_dataloaders=_loader(), val_dataloaders=_loader(), ckpt_path=ckpt_path)


def test_sigterm_during_validation_still_writes_a_checkpoint(tiny_kwargs: dict, tmp_path: Path) -> None:
    straight = VQVAEModel(**tiny_kwargs)
    _fit_epochs(straight, [], epochs=2)
    torch.manual_seed(0)
    stopped = VQVAEModel(**tiny_kwargs)
    with pytest.raises(SIGTERMException):
        _fit_epochs(stopped, [LastCheckpoint(tmp_path, every_n_steps=1000), _SigtermInValidation()], epochs=2)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["animevq"]["batches_seen"] == IMAGES // 2
    resumed = VQVAEModel(**tiny_kwargs)
    _fit_epochs(resumed, [], epochs=2, ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.batches_seen == IMAGES and _equal(resumed.state_dict(), straight.state_dict())


# ---------------------------------------------------------------------------- 3. non-finite losses
def test_nonfinite_guard_contract(model: VQVAEModel) -> None:
    assert model.nonfinite_guard(torch.tensor(1.0)) and model.batches_seen == 0
    assert not model.nonfinite_guard(torch.tensor(float("nan")))
    assert not model.nonfinite_guard(torch.tensor([1.0, float("inf")]))
    assert (model.nonfinite_streak, model.nonfinite_total, model.batches_seen) == (2, 2, 2)
    assert model.nonfinite_guard(torch.tensor(0.5))
    assert (model.nonfinite_streak, model.nonfinite_total) == (0, 2)
    strict = VQVAEModel(**{**model.hparams, "max_nonfinite_steps": 1})
    assert not strict.nonfinite_guard(torch.tensor(float("-inf")))
    message = r"2 training batches in a row \(batches 0–1; max_nonfinite_steps=1\)"
    with pytest.raises(NonFiniteLossError, match=message):
        strict.nonfinite_guard(torch.tensor(float("nan")))
    unguarded = VQVAEModel(**{**model.hparams, "max_nonfinite_steps": None})
    assert unguarded.nonfinite_guard(torch.tensor(float("nan"))) and unguarded.nonfinite_total == 0
    with pytest.raises(ValueError, match="max_nonfinite_steps"):
        VQVAEModel(**{**model.hparams, "max_nonfinite_steps": -1})


class _Mode(pl.Callback):
    """Records whether the guard decided on the device (no host synchronisation) or on the host."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.on_device = pl_module._on_device


@pytest.mark.parametrize("clip", [None, 1e6], ids=["device", "host"])  # clipping forgoes fused Adam
def test_nonfinite_steps_are_skipped_counted_and_logged(tiny_kwargs: dict, clip: float | None,
                                                        tmp_path: Path) -> None:
    model = VQVAEModel(**tiny_kwargs, grad_clip_norm=clip, log_every_n_steps=1, log_images_every_n_steps=1000)
    poison, logger, mode = _PoisonBatches({3, 4}), _Capture(), _Mode()

    class _AfterPoison(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if pl_module.batches_seen == 5:  # both poisoned batches skipped: nothing moved
                self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}
                self.adam = _clone(trainer.optimizers[0].state_dict()["state"])

    after = _AfterPoison()
    _fit(model, [poison, after, mode, LastCheckpoint(tmp_path, every_n_steps=1)], max_steps=8, logger=logger)
    assert mode.on_device == (clip is None)
    assert poison.before is not None and _equal(after.state, poison.before)  # weights and EMA codebook
    assert _equal(after.adam, poison.adam_before)
    assert (model.batches_seen, model.nonfinite_total, model.nonfinite_streak) == (8, 2, 0)
    skipped = [(step, m["train/skipped_nonfinite"]) for step, m in logger.metrics if "train/skipped_nonfinite" in m]
    assert (4, 1.0) in skipped and (5, 2.0) in skipped and skipped[-1][1] == 2.0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["animevq"]["nonfinite_total"] == 2 and saved["animevq"]["batches_seen"] == 8


def test_device_guard_reports_on_logging_steps(tiny_kwargs: dict, caplog: pytest.LogCaptureFixture) -> None:
    """Decided on the device, skipped batches change nothing at once; the count, warning
    and log entry wait for the next logging step (batch 4), where they are exact."""
    model = VQVAEModel(**tiny_kwargs, log_every_n_steps=4)
    poison, logger, mode = _PoisonBatches({1, 2}), _Capture(), _Mode()

    class _After(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if pl_module.batches_seen == 3:
                self.unsettled = pl_module.nonfinite_total
                self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}
                self.adam = _clone(trainer.optimizers[0].state_dict()["state"])

    after = _After()
    with caplog.at_level(logging.WARNING, logger="animevq"):
        _fit(model, [poison, after, mode], max_steps=6, logger=logger)
    assert mode.on_device and after.unsettled == 0  # nothing read back yet
    assert _equal(after.state, poison.before) and _equal(after.adam, poison.adam_before)
    assert model.nonfinite_total == 2 and model.last_skipped_batch == 2
    skipped = [(step, m["train/skipped_nonfinite"]) for step, m in logger.metrics if "train/skipped_nonfinite" in m]
    assert (5, 2.0) in skipped and all(value == 0.0 for step, value in skipped if step < 5)  # settled at batch 4
    assert "non-finite loss in 2 batches up to batch 2 (0 in a row, 2 in all): steps skipped" in caplog.text
    losses = [step for step, m in logger.metrics if "train/total_loss" in m]
    assert losses == [1, 5] and all(math.isfinite(m.get("train/total_loss", 0.0)) for _, m in logger.metrics)


def test_device_guard_stops_a_long_streak_at_the_next_logging_step(tiny_kwargs: dict) -> None:
    model = VQVAEModel(**tiny_kwargs, max_nonfinite_steps=2, log_every_n_steps=4, log_images_every_n_steps=1000)
    poison, mode = _PoisonBatches(set(range(1, 100))), _Mode()
    with pytest.raises(NonFiniteLossError, match=r"3 training batches in a row \(batches 1–3;"):
        _fit(model, [poison, mode], max_steps=8)
    assert mode.on_device and model.batches_seen == 5  # found when batch 4 logged
    assert _equal(model.state_dict(), poison.before)


def test_too_many_nonfinite_steps_stop_with_the_checkpoint_from_before(tiny_kwargs: dict, tmp_path: Path) -> None:
    model = VQVAEModel(**tiny_kwargs, max_nonfinite_steps=2, log_images_every_n_steps=1000)
    poison = _PoisonBatches(set(range(3, 100)))
    with pytest.raises(NonFiniteLossError, match=r"3 training batches in a row \(batches 3–5.*last good "
                                                 r"checkpoint is .*last\.ckpt \(batch 3\)"):
        _fit(model, [poison, LastCheckpoint(tmp_path, every_n_steps=1)], max_steps=8)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["animevq"]["batches_seen"] == 3  # not overwritten during the streak
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in poison.before.items() if not k.startswith("lpips"))
    assert _equal(model.state_dict(), poison.before)  # the skipped steps changed nothing


def test_nonfinite_weights_are_never_written_over_a_good_checkpoint(model: VQVAEModel, tmp_path: Path) -> None:
    class _BreakWeights(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if pl_module.batches_seen == 3:  # an overflowing step with a finite loss
                with torch.no_grad():
                    pl_module.decoder.last_layer.fill_(float("inf"))

    last = LastCheckpoint(tmp_path, every_n_steps=1)
    with pytest.raises(NonFiniteLossError):
        _fit(model, [_BreakWeights(), last], max_steps=16)
    assert last.last_saved_batch == 2
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


# ---------------------------------------------------------------------------- 4. architecture
def test_resuming_a_different_architecture_is_refused(model: VQVAEModel, tiny_kwargs: dict, tmp_path: Path) -> None:
    _fit(model, [LastCheckpoint(tmp_path, every_n_steps=1)], max_steps=2)
    changed = VQVAEModel(**{**tiny_kwargs, "num_embeddings": 32, "encoder_channels": (8, 16, 16, 32),
                            "lambda_gan": 0.1})
    with pytest.raises(CheckpointError) as error:
        _fit(changed, [], max_steps=4, ckpt_path=str(tmp_path / "last.ckpt"))
    message = str(error.value)
    assert "num_embeddings: checkpoint 16, now 32" in message
    assert "encoder_channels: checkpoint (8, 16, 16, 16), now (8, 16, 16, 32)" in message
    assert "lambda_gan > 0 (VQ-GAN): checkpoint False, now True" in message
    assert "last.ckpt" in message and "decoder_channels" not in message
    # Training settings may change on resume.
    _fit(VQVAEModel(**{**tiny_kwargs, "learning_rate": 1e-5}), [], max_steps=4, ckpt_path=str(tmp_path / "last.ckpt"))


# ---------------------------------------------------------------------------- 5. the checkpoint folder
def test_unwritable_checkpoint_folder_fails_before_training(model: VQVAEModel, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # unwritable even for root, unlike chmod

    class _Count(pl.Callback):
        batches = 0

        def on_train_batch_start(self, *args) -> None:
            _Count.batches += 1

    with pytest.raises(PermissionError, match=r"checkpoint folder .*a_file/run/checkpoints is not writable"):
        _fit(model, [LastCheckpoint(blocker / "run" / "checkpoints"), _Count()], max_steps=2)
    assert _Count.batches == 0


def test_free_space_is_checked_against_the_checkpoint_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    net = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.BatchNorm1d(10))
    net[0].bias.requires_grad_(False)
    # weight 100 floats ×3 (Adam), frozen bias 10, BN weight+bias 20 ×3, BN buffers 10+10 floats + int64
    assert estimate_checkpoint_bytes(net) == 4 * (100 * 3 + 10 + 20 * 3 + 20) + 8
    import animevq.reliability as reliability

    usage = reliability.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(reliability.shutil, "disk_usage", lambda path: usage._replace(free=1500))
    with pytest.raises(OSError, match=r"not enough disk space .*0\.0 MiB free in .*needs room for two"):
        check_free_space(tmp_path, 1000)
    with caplog.at_level(logging.WARNING, logger="animevq.reliability"):
        check_free_space(tmp_path, 500)
    assert "little disk space" in caplog.text
    check_free_space(tmp_path, 100)


# ---------------------------------------------------------------------------- 8. checkpoint contents
def test_vqgan_checkpoint_holds_only_tensors_and_plain_values(tiny_kwargs: dict, tmp_path: Path) -> None:
    # VQ-VAE (a CLI fit): tests/test_resume_exact.py::test_cli_checkpoint_holds_only_tensors_and_plain_values.
    model = VQVAEModel(**tiny_kwargs, lambda_gan=0.1, disc_start=0, lecam_weight=0.1, log_images_every_n_steps=1000)
    _fit(model, [LastCheckpoint(tmp_path, every_n_steps=2), ExactResume()], max_steps=4)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert_plain(saved)
    assert any(k.startswith("discriminator.") for k in saved["state_dict"]) and len(saved["optimizer_states"]) == 2
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
