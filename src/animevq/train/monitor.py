"""What a training run logs (SPEC §5): scalars, code usage over a window and over a whole
validation pass, reconstruction grids and the usage histogram.

Under DDP every rank takes part in the reductions; only rank 0 sends to the loggers.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from ..nn.quantizers import code_stats
from ..tracking.images import code_usage_plot, make_reconstruction_grid
from ..tracking.media import log_image

__all__ = ["NUM_LOGGED_IMAGES", "CodeUsage", "TrainingMonitor", "log_grid", "log_usage_histogram", "report"]

log = logging.getLogger(__name__)

NUM_LOGGED_IMAGES = 8  # images per reconstruction grid


class CodeUsage(nn.Module):
    """The code histograms behind the logged usage and perplexity: one row per training batch
    over the last ``window`` batches (``train/``), and the sum over a validation pass (``val/``).
    Buffers, so they follow the model's device, but not in its state dict."""

    history: torch.Tensor
    val_counts: torch.Tensor

    def __init__(self, window: int, codebook_size: int) -> None:
        super().__init__()
        self.window = window
        self.register_buffer("history", torch.zeros(window, codebook_size), persistent=False)
        self.register_buffer("val_counts", torch.zeros(codebook_size), persistent=False)

    def record(self, batch: int, counts: torch.Tensor | float) -> None:
        """Training batch ``batch`` used these (K,) counts (0: a skipped batch, which used none)."""
        self.history[batch % self.window] = counts

    def window_counts(self) -> torch.Tensor:
        """(K,) histogram of the window."""
        return self.history.sum(0)


class TrainingMonitor:
    """Logs the training scalars at their cadence, with the images per second between logs."""

    def __init__(self) -> None:
        self._images_at_log = 0
        self._time_at_log: float | None = None

    def log_train_scalars(self, module: pl.LightningModule, usage: CodeUsage, *, batches_seen: int, batch_size: int,
                          values: dict[str, torch.Tensor], extra: dict[str, float]) -> None:
        """Send ``values`` (tensors, read back in one sync) and ``extra`` with the window's usage
        and perplexity, the learning rates and the throughput, at step ``batches_seen``."""
        trainer = module.trainer
        window = usage.window_counts()
        if trainer.world_size > 1:  # every rank logs on the same batches: a safe collective
            window = trainer.strategy.reduce(window, reduce_op="sum")
        perplexity, rate = code_stats(window)
        values = {**values, "train/perplexity": perplexity, "train/code_usage_rate": rate}
        numbers = torch.stack([v.detach().float().reshape(()) for v in values.values()]).tolist()  # one sync
        metrics = {**dict(zip(values, numbers)), **extra}
        opts = module.optimizers()
        for i, opt in enumerate(opts if isinstance(opts, (list, tuple)) else [opts]):
            metrics[f"train/lr{'' if i == 0 else '_disc'}"] = opt.param_groups[0]["lr"]
        now = time.perf_counter()
        images = batches_seen * batch_size * trainer.world_size
        if self._time_at_log is not None and now > self._time_at_log:
            metrics["train/images_per_sec"] = (images - self._images_at_log) / (now - self._time_at_log)
        self._time_at_log, self._images_at_log = now, images
        # A host tensor: Lightning keeps a logged value on its tensor's device and reads the
        # progress bar's values back after every batch — from the GPU, a host sync per step.
        module.log("train/total_loss", torch.tensor(metrics["train/total_loss"]), prog_bar=True, logger=False,
                   batch_size=batch_size)
        if trainer.is_global_zero:
            for logger in module.loggers:
                logger.log_metrics(metrics, step=batches_seen)


def log_grid(module: pl.LightningModule, key: str, x: torch.Tensor, x_rec: torch.Tensor, step: int) -> None:
    """Inputs above reconstructions, from rank 0."""
    if not module.trainer.is_global_zero or not module.loggers:
        return
    grid = make_reconstruction_grid(x[:NUM_LOGGED_IMAGES], x_rec[:NUM_LOGGED_IMAGES].detach())
    for logger in module.loggers:
        log_image(logger, key, grid, step=step)


def log_usage_histogram(module: pl.LightningModule, counts: torch.Tensor, step: int) -> None:
    """The validation pass's code histogram as ``val/code_usage``, from rank 0."""
    if not module.trainer.is_global_zero or not module.loggers:
        return
    plot = code_usage_plot(counts.detach().cpu())
    for logger in module.loggers:
        log_image(logger, "val/code_usage", plot, step=step)


def report(module: pl.LightningModule, message: str, metrics: dict[str, Any], step: int) -> None:
    """A warning and its metrics from rank 0."""
    if module._trainer is not None and module.trainer.is_global_zero:
        log.warning(message)
        for logger in module.loggers:
            logger.log_metrics(metrics, step=step)
