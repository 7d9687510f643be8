"""SIGTERM under DDP: a signal on any rank stops every rank at the same batch.

- :func:`any_rank` or-s a flag over every rank through a CPU (gloo) all-reduce, so asking
  never makes the host wait for the GPU.
- :class:`HostSigtermCheck` (a callback the CLI adds) asks it around each batch in place of
  Lightning's per-batch NCCL broadcast, and every rank raises :class:`AgreedSigterm` together.

docs/reliability.md lists every promise and the test that proves it.
"""

from __future__ import annotations

import functools
import logging
import signal
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["EXIT_SIGTERM", "AgreedSigterm", "HostSigtermCheck", "any_rank"]

log = logging.getLogger(__name__)

EXIT_SIGTERM = 128 + 15  # what a shell reports for a process ended by SIGTERM


_host_group: tuple[Any, Any] | None = None  # (the default group it belongs to, a gloo group)


def _cpu_group() -> Any:
    """A process group that reduces CPU tensors: the default one when it has gloo, else a
    gloo group over every rank, made once per default group (collectively: the first
    :func:`any_rank` call of each rank makes it)."""
    global _host_group
    if "gloo" in str(dist.get_backend()):
        return None  # the default group (gloo, or "cpu:gloo,cuda:nccl")
    if _host_group is None or _host_group[0] is not dist.group.WORLD:
        _host_group = (dist.group.WORLD, dist.new_group(backend="gloo"))
    return _host_group[1]


def any_rank(flag: bool) -> bool:
    """``flag`` or-ed over every rank of ``torch.distributed`` (``flag`` itself without it).

    A collective: every rank must call it at the same point. It reduces a CPU tensor over
    gloo, so it waits for the other ranks' hosts but never for a GPU; the same question
    asked through NCCL and read back with ``.item()`` would make the host wait until the
    GPU has drained its queue, every time it is asked.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return bool(flag)
    value = torch.tensor([int(bool(flag))], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_cpu_group())
    return bool(value.item())


class AgreedSigterm(SIGTERMException):
    """SIGTERM that every rank raises at the same point, after agreeing on it (so a
    collective, such as writing a checkpoint, is still safe in ``on_exception``)."""


class HostSigtermCheck(pl.Callback):
    """Under DDP: every rank stops at the same batch when any rank receives SIGTERM, and
    agreeing on it costs no GPU synchronisation.

    Lightning 2.6 does it differently, in two places this callback replaces for the length
    of each ``fit``:

    - Before every training batch it broadcasts rank 0's flag through NCCL and reads it back
      with ``.item()``: the host waits for the GPU to finish the previous batch before it
      may queue the next, so the host's launch time is added to every step (two H100s:
      66 ms per step against 57 ms of GPU work; BENCHMARKS.md). Here :func:`any_rank`
      (a CPU all-reduce over gloo) asks every rank instead, before and after each training
      batch and after each validation batch, and all ranks raise :class:`AgreedSigterm`
      together (Lightning's loops would each stop at their own batch).
    - Its SIGTERM handler broadcasts too, from inside the handler, wherever each rank
      happens to be, which need not pair with any collective of the other ranks. Here the
      handler only records the signal, where Lightning's own per-rank tests do not see it
      (and, under Lightning's subprocess launcher, passes it on to the other local ranks,
      as Lightning's does).

    Under one process it does nothing; a piece that Lightning lacks is left alone. The CLI
    adds it; add it to a ``Trainer`` of your own for multi-GPU runs.
    """

    def __init__(self) -> None:
        self._active = False
        self._received = False  # set by the swapped handler; only the agreements read it
        self._loop: Any = None
        self._handler: tuple[list[Any], int, Any] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._active = trainer.world_size > 1
        self._received = False
        if not self._active:
            return
        loop = trainer.fit_loop.epoch_loop
        if callable(getattr(type(loop), "_broadcast_sigterm_tensor", None)):
            loop._broadcast_sigterm_tensor = functools.partial(self._stop_if_any, trainer)  # shadows the method
            self._loop = loop
        self._quiet_signal_handler(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._active:
            self._stop_if_any(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._active:
            self._stop_if_any(trainer)

    def _stop_if_any(self, trainer: pl.Trainer) -> None:
        if any_rank(self._received or trainer.received_sigterm):
            raise AgreedSigterm()

    def _quiet_signal_handler(self, trainer: pl.Trainer) -> None:
        """Swap Lightning's SIGTERM notifier, inside the handler it registered, for one that
        records the signal without a collective, where only this callback's agreements read
        it: Lightning's loops test the flag it keeps (``trainer.received_sigterm``) on each
        rank alone, and would stop a rank the others are not stopping with."""
        try:
            from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector
        except ImportError:  # another Lightning layout: leave its handler alone
            return
        handlers = getattr(signal.getsignal(signal.SIGTERM), "signal_handlers", None)
        notifier = getattr(_SignalConnector, "_sigterm_notifier_fn", None)
        if not isinstance(handlers, list) or notifier is None:
            return

        def record(signum: int, frame: Any) -> None:
            log.info("rank %d received SIGTERM", trainer.global_rank)
            if not self._received and trainer.strategy.launcher is not None:
                trainer.strategy.launcher.kill(signum)  # Lightning's subprocess launcher: the other local ranks
            self._received = True

        for i, handler in enumerate(handlers):
            if getattr(handler, "__func__", None) is notifier:
                self._handler = (handlers, i, handler)
                handlers[i] = record
                return

    def _restore(self) -> None:
        self._active = False
        if self._loop is not None:
            self._loop.__dict__.pop("_broadcast_sigterm_tensor", None)
            self._loop = None
        if self._handler is not None:
            handlers, i, handler = self._handler
            handlers[i] = handler
            self._handler = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()
