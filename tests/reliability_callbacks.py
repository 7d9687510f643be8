"""Test-only callbacks that `animevq fit` subprocesses load through --trainer.callbacks
(tests/ is put on PYTHONPATH): a SIGTERM at a chosen batch, a recorder of what each batch
saw, a NaN injector, a failure or a SIGTERM on one DDP rank, and where each rank stopped."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys

import lightning.pytorch as pl
import numpy as np
import torch


class SigtermAt(pl.Callback):
    """Send this process SIGTERM as training batch ``batch`` (0-based count) starts."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.batches_seen == self.batch:
            os.kill(os.getpid(), signal.SIGTERM)


class Recorder(pl.Callback):
    """Append one JSON line per training batch: counters, a digest of the batch, and one
    draw from each global RNG (as augmentation or dropout code would draw)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        record = {
            "batches_seen": pl_module.batches_seen,
            "epoch": trainer.current_epoch,
            "batch_idx": batch_idx,
            "batch": hashlib.sha1(batch.detach().cpu().contiguous().numpy().tobytes()).hexdigest(),
            "torch": torch.rand(()).item(),
            "numpy": float(np.random.rand()),
            "python": random.random(),
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class RaiseOnRank(pl.Callback):
    """Raise on one DDP rank at one batch: the other ranks must not hang."""

    def __init__(self, rank: int, batch: int) -> None:
        self.rank, self.batch = rank, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and batch_idx == self.batch:
            raise RuntimeError(f"injected failure on rank {self.rank} at batch {self.batch}")


class DiskFullOnRank(pl.Callback):
    """From batch ``batch`` on, every checkpoint write on one rank fails as a full disk does."""

    def __init__(self, rank: int, batch: int) -> None:
        self.rank, self.batch = rank, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank != self.rank or pl_module.batches_seen != self.batch:
            return

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, f"No space left on device (injected on rank {self.rank})")

        trainer.strategy.checkpoint_io.save_checkpoint = full


class NanOnRank(pl.Callback):
    """Fill one rank's images with NaN at one batch: every rank must skip that step together."""

    def __init__(self, rank: int, batch: int) -> None:
        self.rank, self.batch = rank, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and batch_idx == self.batch and trainer.current_epoch == 0:
            batch.fill_(float("nan"))


class SigtermFlagOnRank(pl.Callback):
    """Record SIGTERM on one DDP rank as epoch ``epoch`` starts, between two batches.

    Sets the flag Lightning's signal handler sets, without the handler's own broadcast from
    rank 0 (which, run on one rank only, no other rank would join).
    """

    def __init__(self, rank: int, epoch: int) -> None:
        self.rank, self.epoch = rank, epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.global_rank == self.rank and trainer.current_epoch == self.epoch:
            trainer._signal_connector.received_sigterm = True


class SigtermFlagInValidation(SigtermFlagOnRank):
    """Record SIGTERM on one DDP rank as the first validation batch of epoch ``epoch`` starts."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        pass

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if (trainer.global_rank == self.rank and trainer.current_epoch == self.epoch and batch_idx == 0
                and not trainer.sanity_checking):
            trainer._signal_connector.received_sigterm = True


class StopRecorder(pl.Callback):
    """Append ``rank batches_seen exception`` to ``path`` when fitting stops with an exception."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_exception(self, trainer, pl_module, exception) -> None:
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_rank} {pl_module.batches_seen} {type(exception).__name__}\n")


class SigtermGroupAt(pl.Callback):
    """As training batch ``batch`` starts (rank 0 only), have another process send SIGTERM
    to this process's whole process group: every rank and every DataLoader worker, as
    ``kill -TERM -PGID``, ``timeout`` or a batch scheduler do."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == 0 and pl_module.batches_seen == self.batch:
            group = os.getpgid(0)
            assert group != os.getpgid(os.getppid()), "run the CLI in its own process group (clirun does)"
            code = f"import os, signal; os.killpg({group}, signal.SIGTERM)"  # the sender is in the group too
            subprocess.run([sys.executable, "-c", code], check=False)


class SigtermAfterBatch(pl.Callback):
    """Send SIGTERM to one DDP rank's own process at the end of training batch ``batch``,
    after the CLI's callbacks have run their end-of-batch hooks (config callbacks come later)."""

    def __init__(self, rank: int, batch: int) -> None:
        self.rank, self.batch = rank, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and pl_module.batches_seen == self.batch + 1:
            os.kill(os.getpid(), signal.SIGTERM)


class SigintWhileSaving(pl.Callback):
    """Send this process SIGINT (Ctrl-C) from inside the first checkpoint save after a SIGTERM."""

    def __init__(self) -> None:
        self.sent = False

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.received_sigterm and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)
