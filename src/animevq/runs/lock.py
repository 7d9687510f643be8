"""One fit per run folder: a lock that a second fit finds at once, and that a killed run leaves
behind only as a stale file (the kernel drops the lock itself with the process).

Two fits writing one run folder race: one dies on a rename, and ``last.ckpt`` and
``previous.ckpt`` end up from different runs. :class:`RunFolderLock` (a callback the CLI adds)
takes an exclusive ``flock`` on ``<run_dir>/.animevq.lock`` in ``setup``, before anything is
written, and holds it until the fit ends. The file records who holds it, for the message.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

try:
    import fcntl
except ImportError:  # Windows: no flock; the folder is not locked there
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "RunFolderBusy", "RunFolderLock"]

log = logging.getLogger(__name__)

LOCK_NAME = ".animevq.lock"


class RunFolderBusy(RuntimeError):
    """Another process is fitting into the same run folder."""


class RunFolderLock(pl.Callback):
    """Hold ``<run_dir>/.animevq.lock`` for the length of a fit (rank 0 only: under DDP the other
    ranks write no run files)."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunFolderBusy` naming its holder."""
        if fcntl is None or self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read(fd)
            os.close(fd)
            who = f"PID {holder.get('pid', '?')} on {holder.get('host', '?')} (since {holder.get('started', '?')})"
            raise RunFolderBusy(f"run folder {self.path.parent} is in use by {who}; wait for that fit to end, "
                                "or choose another --run_dir") from None
        stale = _read(fd)
        if stale:
            log.warning("replaced a stale lock in %s left by PID %s, which has ended", self.path.parent, stale.get("pid"))
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:
            self.acquire()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.release()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.release()


def _read(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
