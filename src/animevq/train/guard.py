"""The non-finite guard: a training batch whose loss is NaN or infinite changes nothing, and
too many of them in a row stop the run (:class:`NonFiniteLossError`).

Two ways to skip, chosen when training starts, alike in what a skipped batch changes
(nothing: weights, optimiser state, codebook and every buffer stay as they were):

* On the device, without a host synchronisation (when every optimiser is fused Adam, no float16
  loss scaler is in use and gradients are not accumulated; the usual GPU run). The batch runs to
  the end; each optimiser gets the verdict as ``found_inf`` (fused Adam then leaves parameters
  and moments untouched) and the buffers the batch changed are put back with ``torch.where``.
  Streaks and counts live on the device and are read by :meth:`NonFiniteGuard.settle` on logging
  steps, before checkpoints and at epoch ends: the warning, ``train/skipped_nonfinite`` and the
  stop after too many bad batches in a row come there, up to ``log_every_n_steps`` batches
  late, and a skipped batch counts as a step of the learning-rate schedule.
* On the host otherwise: :meth:`NonFiniteGuard.check` reads the verdict at once, and the caller
  skips the backward and the optimiser steps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist

__all__ = ["NonFiniteGuard", "NonFiniteLossError", "Stateful"]

log = logging.getLogger(__name__)


def _no_checkpoint_yet() -> str:
    return "no checkpoint was written yet"


class NonFiniteLossError(RuntimeError):
    """The loss was NaN or infinite for more training batches in a row than allowed."""


class Stateful(Protocol):
    """Something whose state a training batch changes before its loss is known."""

    def training_snapshot(self) -> Any: ...

    def restore_training_snapshot(self, snapshot: Any, skip: torch.Tensor | None = None) -> None: ...


class NonFiniteGuard:
    """Skips training batches whose loss is NaN or infinite.

    Args:
        max_steps: bad batches in a row that are skipped; one more raises. None: no guard.
        stateful: what a batch changes before its loss is known (the quantizer, the objective),
            snapshot by :meth:`snapshot` and put back for a skipped batch. One whose
            ``decides_on_host`` is true (a quantizer about to initialise its codebook) makes a
            host-side decision that a device-side skip could not undo: the guard then decides
            that batch on the host.

    Per batch: :meth:`snapshot`, the forward, :meth:`check` (before any backward), and, for a
    batch decided on the device, :meth:`finish` once its statistics are known.
    """

    def __init__(self, max_steps: int | None, stateful: Sequence[Stateful]) -> None:
        if max_steps is not None and max_steps < 0:
            raise ValueError(f"max_nonfinite_steps must be >= 0 or None (no guard), got {max_steps}")
        self.max_steps = max_steps
        self.stateful = list(stateful)
        self.streak = 0  # batches in a row whose loss was NaN/inf
        self.total = 0  # such batches skipped in this run, resumes included
        self.last_skipped_batch = -1  # as far as settled
        self.skip_optimizer_step = False  # a host-skipped batch of automatic optimisation
        self.on_device = False  # the guard decides on the device (see the module docstring)
        self._snapshot: list[Any] | None = None
        self._host_decision = False
        self._verdict: torch.Tensor | None = None  # this batch's: 1.0 skip, 0.0 step (on the device)
        # This batch's verdict decided on the device (True: skipped), kept past finish() until the
        # next batch for what runs after the optimiser step (the weight EMA); None on the host.
        self.device_skip: torch.Tensor | None = None
        self._counts: dict[str, torch.Tensor] = {}
        self._optimizers: list[torch.optim.Optimizer] = []
        self._agree: Callable[[bool], bool] = bool
        self._distributed = False
        self._report: Callable[[str], None] = log.warning
        self._where_to_resume: Callable[[], str] = _no_checkpoint_yet

    @property
    def enabled(self) -> bool:
        return self.max_steps is not None

    def start(self, optimizers: Sequence[torch.optim.Optimizer], *, loss_scaler: Any, accumulate_grad_batches: int,
              device: torch.device, agree: Callable[[bool], bool] = bool, distributed: bool = False,
              report: Callable[[str], None] | None = None,
              where_to_resume: Callable[[], str] | None = None) -> None:
        """Choose how to skip (see the module docstring); called when training starts.

        ``agree`` and-s a host verdict over every rank; ``distributed`` makes the device verdict
        an all-reduce; ``report`` shows a skip; ``where_to_resume`` names the last good checkpoint.
        """
        self.on_device = (
            self.enabled
            and all(getattr(o, "defaults", {}).get("fused") for o in optimizers)
            and loss_scaler is None
            and accumulate_grad_batches == 1
        )
        if self.on_device:
            self._counts = {
                "streak": torch.zeros((), dtype=torch.long, device=device),
                "pending": torch.zeros((), dtype=torch.long, device=device),  # bad since the last settle
                "last_bad": torch.full((), -1, dtype=torch.long, device=device),
                "over_at": torch.full((), -1, dtype=torch.long, device=device),  # batch that broke the limit
            }
        self._optimizers = list(optimizers)
        self._agree, self._distributed = agree, distributed
        self._report = report or log.warning
        if where_to_resume is not None:
            self._where_to_resume = where_to_resume

    def stop(self) -> None:
        """Read what the device counted, and take the verdict off the optimisers."""
        try:
            self.settle()
        finally:
            self._clear_found_inf()
            self.on_device = False

    def _clear_found_inf(self) -> None:
        for opt in self._optimizers:
            if hasattr(opt, "found_inf"):
                del opt.found_inf

    def snapshot(self) -> None:
        """Copy the state the coming batch changes: its forward does so before the loss is known."""
        self.device_skip = None
        if not self.enabled:
            return
        self._host_decision = any(getattr(part, "decides_on_host", False) for part in self.stateful)
        self._snapshot = [s.training_snapshot() for s in self.stateful]

    def _restore(self, skip: torch.Tensor | None = None) -> None:
        if self._snapshot is not None:
            for part, saved in zip(self.stateful, self._snapshot):
                part.restore_training_snapshot(saved, skip)

    def check(self, loss: torch.Tensor, batch: int, *, skipped: Callable[[], None] | None = None) -> bool:
        """True if batch ``batch``'s step may proceed: ``loss`` is finite on every rank, or the
        verdict is left to the device.

        On the host, False means the batch is accounted for: what it changed is put back,
        ``skipped()`` has run (the caller's bookkeeping of a skipped batch) and the skip is
        reported; the caller must skip backward, optimiser steps and its logging. After more
        than ``max_steps`` such batches in a row it raises :class:`NonFiniteLossError` instead
        (the last good checkpoint stays: ``LastCheckpoint`` writes nothing during a run of them).
        On the host it costs one synchronisation (and, under DDP, one tiny all-reduce so every
        rank decides alike); with ``max_steps=None`` it returns True at no cost.
        """
        if not self.enabled:
            return True
        if self.on_device and not self._host_decision:
            self._record_verdict(loss, batch)
            return True
        finite = self._agree(bool(torch.isfinite(loss.detach()).all()))
        self._verdict = None
        self._clear_found_inf()
        if finite:
            self.streak = 0
            return True
        self._restore()
        self.streak += 1
        self.total += 1
        self.last_skipped_batch = batch
        if skipped is not None:
            skipped()
        if self.streak > self.max_steps:
            raise NonFiniteLossError(self._message(batch, self.streak))
        self._report(f"non-finite loss at batch {batch} ({self.streak} in a row, {self.total} in all): step skipped")
        return False

    def _record_verdict(self, loss: torch.Tensor, batch: int) -> None:
        """The device half of the guard: no host synchronisation (NCCL's all-reduce neither)."""
        bad = (~torch.isfinite(loss.detach()).all()).to(torch.float32)
        if self._distributed and dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank alike
        for opt in self._optimizers:
            opt.found_inf = bad  # fused Adam: no update, step count unchanged
        self._verdict = bad
        self.device_skip = skip = bad.bool()
        c = self._counts
        c["streak"] = torch.where(skip, c["streak"] + 1, 0)
        c["pending"] += skip
        c["last_bad"] = torch.where(skip, batch, c["last_bad"])
        c["over_at"] = torch.where((c["over_at"] < 0) & (c["streak"] > self.max_steps), batch, c["over_at"])

    def finish(self, counts: torch.Tensor) -> torch.Tensor:
        """After a batch decided on the device: put back what a skipped batch changed.
        Returns the batch's code counts for the usage window (zeros if it was skipped)."""
        if self._verdict is None:
            return counts
        skip = self._verdict.bool()
        self._restore(skip)
        self._verdict = None
        return torch.where(skip, 0.0, counts)

    def settle(self) -> None:
        """Read the device's counts (one host synchronisation): report skipped batches, and
        raise :class:`NonFiniteLossError` after too many in a row."""
        if not self.on_device:
            return
        c = self._counts
        streak, pending, last_bad, over_at = torch.stack([c["streak"], c["pending"], c["last_bad"],
                                                          c["over_at"]]).tolist()
        c["pending"].zero_()
        self.streak = streak
        if pending == 0:
            return
        self.total += pending
        self.last_skipped_batch = last_bad
        if over_at >= 0:
            raise NonFiniteLossError(self._message(over_at, self.max_steps + 1))
        where = f"at batch {last_bad}" if pending == 1 else f"in {pending} batches up to batch {last_bad}"
        self._report(f"non-finite loss {where} ({streak} in a row, {self.total} in all): "
                     f"step{'' if pending == 1 else 's'} skipped")

    @staticmethod
    def zero_gradient_loss(params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
        """A loss whose gradient is exactly zero for every parameter in ``params``, so DDP's
        all-reduce runs as usual and accumulated gradients are unchanged."""
        return torch.stack([(p.reshape(-1)[:1] * 0.0).sum() for p in params]).sum()

    def _message(self, batch: int, streak: int) -> str:
        first = batch - streak + 1
        return (
            f"the loss was NaN or infinite for {streak} training batches in a row "
            f"(batches {first}–{batch}; max_nonfinite_steps={self.max_steps}), so the run stops; "
            f"{self._where_to_resume()}. Lower learning_rate, set grad_clip_norm, train in precision 32 or "
            "bf16-mixed, or check the data, then resume with --ckpt_path."
        )
