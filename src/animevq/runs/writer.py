"""Every checkpoint write is atomic inside its own folder, and a signal cannot cut it short.

Lightning's ``TorchCheckpointIO`` serialises a checkpoint into memory and hands it to fsspec,
whose local "transaction" writes it to ``tempfile.mkstemp()`` (``$TMPDIR``) and then moves
it into place. Across file systems that move is a copy: a full run folder leaves a
half-written ``best-*.ckpt``, a small ``$TMPDIR`` fails the save with an ``OSError`` that
names no path, and SIGKILL leaves megabytes in ``/tmp``.

:class:`AtomicCheckpointIO` writes each file to a temporary name in the folder of the file
(``.<name>.<pid>.tmp``), flushes it to disk and renames it over the target: at every
instant the target is the old file or the new one, whole. A failed write removes its
temporary file and raises :class:`CheckpointWriteError` naming the path. The CLI installs it;
with a ``Trainer`` of your own, pass ``plugins=[AtomicCheckpointIO()]``.

:func:`signals_held` holds SIGINT for the length of a write: Ctrl-C (or a scheduler's
second signal) during the save that SIGTERM asked for would otherwise abort it and leave no
checkpoint of the last batches. The signal takes effect once the file is whole.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .checkpoint_io import fsync_dir, os_error

__all__ = ["TEMPORARY_SUFFIX", "AtomicCheckpointIO", "CheckpointWriteError", "remove_stale_temporaries",
           "signals_held", "write_atomically", "write_error"]

log = logging.getLogger(__name__)

TEMPORARY_SUFFIX = ".tmp"  # ".<name>.<pid>.tmp": hidden, and never taken for a checkpoint
_HELD_SIGNALS = (signal.SIGINT,)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (or, under DDP, another rank's write failed); the
    message names the file, and the file on disk is the one from before, whole."""

    def __str__(self) -> str:
        return self.strerror if self.errno is not None and self.strerror else super().__str__()


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT until the block ends, then deliver it as if it arrived then.

    Only the main thread can change signal handlers; elsewhere (and where a handler was
    installed outside Python) the block runs unprotected.
    """
    previous = {signum: signal.getsignal(signum) for signum in _HELD_SIGNALS}
    if threading.current_thread() is not threading.main_thread() or None in previous.values():
        yield
        return
    pending: list[tuple[int, Any]] = []

    def hold(signum: int, frame: Any) -> None:
        if not pending:
            log.warning("signal %d arrived while a checkpoint was being written; it takes effect once the "
                        "file is whole", signum)
        pending.append((signum, frame))

    for signum in previous:
        signal.signal(signum, hold)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if pending:
            signum, frame = pending[0]
            handler = previous[signum]
            if callable(handler):
                handler(signum, frame)  # Python's default for SIGINT raises KeyboardInterrupt here
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)


def write_atomically(checkpoint: dict[str, Any], path: Path) -> None:
    """``torch.save`` ``checkpoint`` to ``path`` through a temporary file beside it.

    Raises:
        CheckpointWriteError: naming ``path`` (a full disk, a name too long, a read-only
            folder); ``path`` still holds what it held before.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TEMPORARY_SUFFIX}")
    try:
        with signals_held():
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
    except BaseException as error:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        cause = os_error(error)
        if cause is not None:
            raise write_error(path, cause) from error
        raise  # also a Ctrl-C that signals_held delivered after the rename: the file is whole


def write_error(path: Path, error: OSError) -> CheckpointWriteError:
    """The one-line error for a failed write of ``path`` (``error`` itself if it already is one)."""
    while isinstance(error, CheckpointWriteError) and os_error(error.__cause__) is not None:
        error = os_error(error.__cause__)  # the OS's own error, told of ``path`` (what the temporary became)
    if isinstance(error, CheckpointWriteError):
        return error
    reason = error.strerror or str(error) or type(error).__name__
    failure = CheckpointWriteError(
        error.errno, f"could not write checkpoint {path}: {reason}; the file still holds the checkpoint written "
        "before, if any. Free some space or choose another --run_dir, then resume with --ckpt_path last")
    failure.__cause__ = error
    return failure


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary files that writes killed mid-way left in ``folder`` (call it only
    while no other process writes there: the CLI holds the run folder's lock)."""
    removed = []
    if not folder.is_dir():
        return removed
    for candidate in folder.glob(f".*{TEMPORARY_SUFFIX}"):
        if candidate.is_file() and ".ckpt" in candidate.name:
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    if removed:
        log.warning("removed %d temporary file(s) left in %s by an interrupted save: %s", len(removed), folder,
                    ", ".join(p.name for p in removed))
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, atomic inside the checkpoint's folder (module docstring).

    Remote paths (``s3://``, ...) are left to Lightning's fsspec writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        write_atomically(checkpoint, Path(path))
