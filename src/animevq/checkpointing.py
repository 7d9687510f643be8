"""The run's ``last.ckpt``: written often, atomically, with the previous one kept.

Lightning's ``ModelCheckpoint(save_last=True)`` refreshes ``last.ckpt`` only when it also
writes a best-k file, so a run whose validation loss stops improving would resume from
stale weights; and its writes are not atomic. ``LastCheckpoint`` writes
``<dirpath>/last.ckpt`` every ``every_n_steps`` training batches and at every epoch end, to
a temporary file in the same folder that is flushed to disk and then renamed over the old
one; the file it replaces stays as ``previous.ckpt``. ``--ckpt_path last`` finds it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning.pytorch as pl

__all__ = ["LastCheckpoint", "atomic_replace", "LAST_NAME", "PREVIOUS_NAME"]

log = logging.getLogger(__name__)

LAST_NAME = "last.ckpt"
PREVIOUS_NAME = "previous.ckpt"  # no "last" in the name: Lightning's "last" lookup must not pick it


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_replace(tmp: Path, final: Path, *, keep_previous: Path | None = None) -> None:
    """Flush ``tmp`` to disk and rename it over ``final`` (same folder, so the rename is atomic).

    With ``keep_previous``, the file ``final`` held before survives under that name: it is
    hard-linked there first, so at every instant one of the two names holds a whole file.
    """
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    if keep_previous is not None and final.exists():
        staging = keep_previous.with_name(keep_previous.name + ".tmp")
        staging.unlink(missing_ok=True)
        os.link(final, staging)
        os.replace(staging, keep_previous)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


class LastCheckpoint(pl.Callback):
    """Write ``<dirpath>/last.ckpt`` every ``every_n_steps`` batches and at each epoch end."""

    def __init__(self, dirpath: str | os.PathLike[str], every_n_steps: int = 1000) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self._last_saved_batch: int | None = None

    @property
    def path(self) -> Path:
        return self.dirpath / LAST_NAME

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            if not os.access(self.dirpath, os.W_OK):
                raise PermissionError(f"checkpoint folder {self.dirpath} is not writable; choose another --run_dir")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        batches = getattr(pl_module, "batches_seen", trainer.global_step)
        if batches % self.every_n_steps == 0:
            self.save(trainer, batches)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer, getattr(pl_module, "batches_seen", trainer.global_step))

    def save(self, trainer: pl.Trainer, batches: int) -> None:
        """Write the checkpoint now (every rank must call this: saving is collective)."""
        if batches == self._last_saved_batch or trainer.sanity_checking:
            return
        tmp = self.dirpath / f".{LAST_NAME}.tmp"
        trainer.save_checkpoint(tmp)  # rank 0 writes
        if trainer.is_global_zero:
            atomic_replace(tmp, self.path, keep_previous=self.dirpath / PREVIOUS_NAME)
            log.debug("wrote %s at batch %d", self.path, batches)
        trainer.strategy.barrier("last_checkpoint")
        self._last_saved_batch = batches
