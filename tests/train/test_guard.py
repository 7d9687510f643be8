"""The non-finite guard (docs/reliability.md, 3): a NaN/inf batch changes nothing, is
counted and logged, and too many in a row stop the run with the last good checkpoint kept."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import tiny_model
from recording import CaptureLogger, PoisonBatches, clone_tree, equal_tree, fit, logging_model

from animevq.nn.quantizers import VectorQuantizerEMA
from animevq.runs.last import LastCheckpoint
from animevq.train.guard import NonFiniteGuard, NonFiniteLossError


def test_nonfinite_guard_contract() -> None:
    """On the host: a bad batch is put back (what it changed is restored), counted, handed to
    the caller's bookkeeping; one too many raises."""
    quantizer = VectorQuantizerEMA(4, 2).train()
    guard = NonFiniteGuard(10, [quantizer])
    skipped: list[int] = []
    before = quantizer.training_snapshot()
    guard.snapshot()
    quantizer(torch.randn(2, 2, 2, 2))  # a forward moves the EMA state before the loss is known
    assert not torch.equal(quantizer.embedding, before.buffers[0])
    assert not guard.check(torch.tensor(float("nan")), 0, skipped=lambda: skipped.append(0))
    assert all(torch.equal(b, s) for b, s in zip(quantizer.buffers(), before.buffers))  # put back
    assert guard.check(torch.tensor(1.0), 1) and guard.streak == 0
    guard.snapshot()
    assert not guard.check(torch.tensor(float("nan")), 2, skipped=lambda: skipped.append(2))
    assert not guard.check(torch.tensor([1.0, float("inf")]), 3, skipped=lambda: skipped.append(3))
    assert (guard.streak, guard.total, guard.last_skipped_batch, skipped) == (2, 3, 3, [0, 2, 3])
    assert guard.check(torch.tensor(0.5), 4)
    assert (guard.streak, guard.total) == (0, 3)
    strict = NonFiniteGuard(1, [])
    assert not strict.check(torch.tensor(float("-inf")), 0)
    message = r"2 training batches in a row \(batches 0–1; max_nonfinite_steps=1\)"
    with pytest.raises(NonFiniteLossError, match=message):
        strict.check(torch.tensor(float("nan")), 1)
    unguarded = NonFiniteGuard(None, [quantizer])
    assert unguarded.check(torch.tensor(float("nan")), 0) and unguarded.total == 0
    with pytest.raises(ValueError, match="max_nonfinite_steps"):
        NonFiniteGuard(-1, [])
    with pytest.raises(ValueError, match="max_nonfinite_steps"):
        tiny_model(safety={"max_nonfinite_steps": -1})


def test_a_pending_kmeans_initialisation_is_decided_on_the_host() -> None:
    """k-means sets a host-side flag that a device-side skip could not put back: the guard asks."""
    quantizer = VectorQuantizerEMA(4, 2, kmeans_init=True).train()
    guard = NonFiniteGuard(10, [quantizer])
    guard.on_device = True  # as chosen at training start for fused Adam
    guard.snapshot()
    quantizer(torch.randn(4, 2, 2, 2))  # initialises the codebook from this batch
    assert bool(quantizer.initialized) and not quantizer.decides_on_host
    assert not guard.check(torch.tensor(float("nan")), 0)  # decided at once, on the host
    assert not bool(quantizer.initialized) and quantizer.decides_on_host  # initialises again next batch


class _Mode(pl.Callback):
    """Records whether the guard decided on the device (no host synchronisation) or on the host."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.on_device = pl_module.guard.on_device


@pytest.mark.parametrize("clip", [None, 1e6], ids=["device", "host"])  # clipping forgoes fused Adam
def test_nonfinite_steps_are_skipped_counted_and_logged(clip: float | None, tmp_path: Path) -> None:
    model = logging_model(optimization={"grad_clip_norm": clip})
    poison, logger, mode = PoisonBatches({3, 4}), CaptureLogger(), _Mode()

    class _AfterPoison(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if pl_module.batches_seen == 5:  # both poisoned batches skipped: nothing moved
                self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}
                self.adam = clone_tree(trainer.optimizers[0].state_dict()["state"])

    after = _AfterPoison()
    fit(model, [poison, after, mode, LastCheckpoint(tmp_path, every_n_steps=1)], max_steps=8, logger=logger)
    assert mode.on_device == (clip is None)
    assert poison.before is not None and equal_tree(after.state, poison.before)  # weights and EMA codebook
    assert equal_tree(after.adam, poison.adam_before)
    assert (model.batches_seen, model.guard.total, model.guard.streak) == (8, 2, 0)
    skipped = [(step, m["train/skipped_nonfinite"]) for step, m in logger.metrics if "train/skipped_nonfinite" in m]
    assert (4, 1.0) in skipped and (5, 2.0) in skipped and skipped[-1][1] == 2.0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["animevq"]["nonfinite_total"] == 2 and saved["animevq"]["batches_seen"] == 8


def test_device_guard_reports_on_logging_steps(caplog: pytest.LogCaptureFixture) -> None:
    """Decided on the device, skipped batches change nothing at once; the count, warning
    and log entry wait for the next logging step (batch 4), where they are exact."""
    model = tiny_model(log_every_n_steps=4)
    poison, logger, mode = PoisonBatches({1, 2}), CaptureLogger(), _Mode()

    class _After(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if pl_module.batches_seen == 3:
                self.unsettled = pl_module.guard.total
                self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}
                self.adam = clone_tree(trainer.optimizers[0].state_dict()["state"])

    after = _After()
    with caplog.at_level(logging.WARNING, logger="animevq"):
        fit(model, [poison, after, mode], max_steps=6, logger=logger)
    assert mode.on_device and after.unsettled == 0  # nothing read back yet
    assert equal_tree(after.state, poison.before) and equal_tree(after.adam, poison.adam_before)
    assert model.guard.total == 2 and model.guard.last_skipped_batch == 2
    skipped = [(step, m["train/skipped_nonfinite"]) for step, m in logger.metrics if "train/skipped_nonfinite" in m]
    assert (5, 2.0) in skipped and all(value == 0.0 for step, value in skipped if step < 5)  # settled at batch 4
    assert "non-finite loss in 2 batches up to batch 2 (0 in a row, 2 in all): steps skipped" in caplog.text
    losses = [step for step, m in logger.metrics if "train/total_loss" in m]
    assert losses == [1, 5] and all(math.isfinite(m.get("train/total_loss", 0.0)) for _, m in logger.metrics)


def test_device_guard_stops_a_long_streak_at_the_next_logging_step() -> None:
    model = tiny_model(safety={"max_nonfinite_steps": 2}, log_every_n_steps=4, log_images_every_n_steps=1000)
    poison, mode = PoisonBatches(set(range(1, 100))), _Mode()
    with pytest.raises(NonFiniteLossError, match=r"3 training batches in a row \(batches 1–3;"):
        fit(model, [poison, mode], max_steps=8)
    assert mode.on_device and model.batches_seen == 5  # found when batch 4 logged
    assert equal_tree(model.state_dict(), poison.before)


def test_too_many_nonfinite_steps_stop_with_the_checkpoint_from_before(tmp_path: Path) -> None:
    model = tiny_model(safety={"max_nonfinite_steps": 2}, log_images_every_n_steps=1000)
    poison = PoisonBatches(set(range(3, 100)))
    with pytest.raises(NonFiniteLossError, match=r"3 training batches in a row \(batches 3–5.*last good "
                                                 r"checkpoint is .*last\.ckpt \(batch 3\)"):
        fit(model, [poison, LastCheckpoint(tmp_path, every_n_steps=1)], max_steps=8)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["animevq"]["batches_seen"] == 3  # not overwritten during the streak
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in poison.before.items() if "lpips" not in k)
    assert equal_tree(model.state_dict(), poison.before)  # the skipped steps changed nothing


def test_nonfinite_weights_are_never_written_over_a_good_checkpoint(tmp_path: Path) -> None:
    model = logging_model()

    class _BreakWeights(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if pl_module.batches_seen == 3:  # an overflowing step with a finite loss
                with torch.no_grad():
                    pl_module.tokenizer.decoder.last_layer.fill_(float("inf"))

    last = LastCheckpoint(tmp_path, every_n_steps=1)
    with pytest.raises(NonFiniteLossError):
        fit(model, [_BreakWeights(), last], max_steps=16)
    assert last.last_saved_batch == 2
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())
