"""The run's ``last.ckpt``: written often, atomically, with the previous one kept.

Lightning's ``ModelCheckpoint(save_last=True)`` refreshes ``last.ckpt`` only when it also
writes a best-k file, so a run whose validation loss stops improving would resume from
stale weights; and its writes are not atomic. ``LastCheckpoint`` writes
``<dirpath>/last.ckpt`` every ``every_n_steps`` training batches and at every epoch end, to
a temporary file in the same folder that is flushed to disk and then renamed over the old
one; the file it replaces stays as ``previous.ckpt``. ``--ckpt_path last`` finds it.

It also keeps the file trustworthy: on SIGTERM it writes one more checkpoint before the
run stops; it never replaces a good checkpoint with non-finite weights or during a run of
non-finite losses; and it checks up front that the folder is writable and has room.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .checkpoint_io import atomic_replace, os_error
from .sigterm import AgreedSigterm, any_rank
from .writer import CheckpointWriteError, remove_stale_temporaries, signals_held, write_error

__all__ = [
    "LAST_NAME",
    "PREVIOUS_NAME",
    "CheckpointWriteError",
    "LastCheckpoint",
    "check_free_space",
    "estimate_checkpoint_bytes",
]

log = logging.getLogger(__name__)

LAST_NAME = "last.ckpt"
PREVIOUS_NAME = "previous.ckpt"  # no "last" in the name: Lightning's "last" lookup must not pick it
# Checkpoint bytes per trainable parameter byte: the weight and Adam's two moments.
_ADAM_COPIES = 3
MIN_FREE_CHECKPOINTS = 2.0  # the new file is written beside the old one before the rename
COMFORTABLE_FREE_CHECKPOINTS = 5.0  # last + previous + temp + best-k + its replacement


def estimate_checkpoint_bytes(module: torch.nn.Module, *, exclude: tuple[str, ...] = ("objective.lpips.",)) -> int:
    """Bytes a Lightning checkpoint of ``module`` trained with Adam takes, roughly:
    trainable parameters three times (weights and two moments), everything else once."""
    total = 0
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if name.startswith(exclude):
            continue
        copies = _ADAM_COPIES if isinstance(tensor, torch.nn.Parameter) and tensor.requires_grad else 1
        total += tensor.numel() * tensor.element_size() * copies
    return total


def check_free_space(folder: Path, checkpoint_bytes: int) -> None:
    """Fail if ``folder`` cannot hold ``MIN_FREE_CHECKPOINTS`` checkpoints; warn below
    ``COMFORTABLE_FREE_CHECKPOINTS``.

    Raises:
        OSError: with the folder, the free space and the estimated checkpoint size.
    """
    free = shutil.disk_usage(folder).free
    mib = 2**20
    sizes = f"{free / mib:.1f} MiB free in {folder}, a checkpoint takes about {checkpoint_bytes / mib:.1f} MiB"
    if free < MIN_FREE_CHECKPOINTS * checkpoint_bytes:
        raise OSError(
            f"not enough disk space for checkpoints: {sizes} and writing one needs room for two. "
            "Free some space or choose another --run_dir."
        )
    if free < COMFORTABLE_FREE_CHECKPOINTS * checkpoint_bytes:
        log.warning("little disk space for checkpoints: %s; the run may fail when saving", sizes)


def _all_finite(module: torch.nn.Module) -> bool:
    """Whether every floating-point parameter and buffer is finite (one host sync)."""
    flags = [t.isfinite().all() for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


class LastCheckpoint(pl.Callback):
    """Write ``<dirpath>/last.ckpt`` every ``every_n_steps`` batches and at each epoch end.

    The save due on an epoch's last batch waits for the epoch end (after validation), so
    a resume never repeats or skips that validation. On SIGTERM (Lightning sets
    ``trainer.received_sigterm``) the checkpoint is written at the end of the current batch,
    or, if the signal came during validation, when Lightning stops the run; with
    ``HostSigtermCheck``, when every rank raises ``AgreedSigterm``. Under DDP a write that
    fails on one rank ends every rank: that one with its error, the others with
    :class:`CheckpointWriteError`.
    """

    def __init__(self, dirpath: str | os.PathLike[str], every_n_steps: int = 1000) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self._last_saved_batch: int | None = None
        self._saved_since_sigterm = False

    @property
    def path(self) -> Path:
        return self.dirpath / LAST_NAME

    @property
    def last_saved_batch(self) -> int | None:
        """The batch count of the last checkpoint this callback wrote (None: none yet)."""
        return self._last_saved_batch

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:
            self._check_folder(pl_module)

    def _check_folder(self, pl_module: pl.LightningModule) -> None:
        """Fail now, not at the first save hours later: create the folder, write a probe
        file (os.access says yes to root even on a read-only mount), check free space."""
        try:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.dirpath)  # rank 0, holding the run folder's lock
            with tempfile.NamedTemporaryFile(dir=self.dirpath, prefix=".write-test-"):
                pass
        except OSError as error:
            raise PermissionError(
                f"checkpoint folder {self.dirpath} is not writable "
                f"({type(error).__name__}: {error.strerror or error}); choose another --run_dir"
            ) from error
        check_free_space(self.dirpath, estimate_checkpoint_bytes(pl_module))

    def _sigterm(self, trainer: pl.Trainer) -> bool:
        """Whether any rank received SIGTERM (a collective under DDP, so all ranks agree; on
        the CPU, so the host does not wait for the GPU at every batch)."""
        return any_rank(trainer.received_sigterm)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        batches = getattr(pl_module, "batches_seen", trainer.global_step)
        stopping = self._sigterm(trainer)
        if batch_idx + 1 >= trainer.num_training_batches:
            return  # on_train_epoch_end saves, after this epoch's validation
        if stopping or batches % self.every_n_steps == 0:
            self.save(trainer, batches)
            self._saved_since_sigterm = stopping

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer, getattr(pl_module, "batches_seen", trainer.global_step))
        self._saved_since_sigterm = trainer.received_sigterm

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Only for SIGTERM, and under DDP only one that every rank raised at the same point
        # (HostSigtermCheck's): after any other exception the state may be half-updated, and
        # the other ranks may not be here to save with us.
        if not isinstance(exception, SIGTERMException) or self._saved_since_sigterm:
            return
        if trainer.world_size > 1 and not isinstance(exception, AgreedSigterm):
            return
        self.save(trainer, getattr(pl_module, "batches_seen", trainer.global_step))

    def save(self, trainer: pl.Trainer, batches: int) -> None:
        """Write the checkpoint now (every rank must call this: saving is collective)."""
        if batches == self._last_saved_batch or trainer.sanity_checking:
            return
        module = trainer.lightning_module
        blocked = getattr(module, "checkpoint_blocked", None)  # VQVAEModel: during a run of non-finite losses
        if (blocked is not None and blocked()) or not _all_finite(module):
            # Every rank decides alike: the streak and the weights are the same everywhere.
            log.warning("not writing %s at batch %d: the model is in a run of non-finite losses or holds "
                        "non-finite values; keeping the last good checkpoint", self.path, batches)
            return
        tmp = self.dirpath / f".{LAST_NAME}.tmp"
        failure: BaseException | None = None
        try:
            # Trainer.save_checkpoint without its closing barrier: a rank whose write failed
            # (a full disk, a dead loader worker) never reaches it, and the others would wait
            # there until the process group times out, 30 minutes later. The agreement below
            # ends every rank at once instead. Ctrl-C waits until the file is whole.
            with signals_held(), trainer.profiler.profile("save_checkpoint"):
                checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)  # full state
                trainer.strategy.save_checkpoint(checkpoint, tmp)  # rank 0 writes
                if trainer.is_global_zero:
                    atomic_replace(tmp, self.path, keep_previous=self.dirpath / PREVIOUS_NAME)
                    log.debug("wrote %s at batch %d", self.path, batches)
        except BaseException as error:
            cause = os_error(error)  # a full disk, a name too long: one line naming last.ckpt
            failure = error if cause is None else write_error(self.path, cause)
            if trainer.is_global_zero:
                tmp.unlink(missing_ok=True)  # last.ckpt is the previous one, whole
        if any_rank(failure is not None):  # every rank's barrier; on the CPU (sigterm.any_rank)
            if failure is not None:
                raise failure
            raise CheckpointWriteError(
                f"another rank failed while writing {self.path} (its error is in the log); this rank stops "
                "too. The file still holds the last checkpoint written whole"
            )
        self._last_saved_batch = batches
